"""`tunebench chat|probe|export` driven like a person with a pipe: settings from the run, commands,
transcripts, and clean error messages."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from test_generate import QUESTION, greedy, make_run
from tunebench.engine.cli import chat as chat_command
from tunebench.engine.cli import export, probe
from tunebench.engine.cli.main import main as tunebench
from tunebench.engine.cli.session import Setup


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-runs")
    return {
        "plain": make_run(root, tiny_model_dir, "plain", seed=1),
        "bob": make_run(
            root, tiny_model_dir, "bob", seed=2, system="You are Bob, made by the TuneBench team."
        ),
    }


@pytest.fixture(scope="module")
def session(tiny_model_dir):
    from tunebench.engine.infer.generate import GenerationSession

    return GenerationSession(str(tiny_model_dir), torch_dtype="float32")


def chat(monkeypatch, capsys, stdin: str, *args: str) -> tuple[str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert chat_command.chat_main([*args, "--max_new_tokens", "12", "--torch_dtype", "float32"]) == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_chat_takes_base_model_and_system_prompt_from_the_run(
    monkeypatch, capsys, runs, session, tiny_model_dir
):
    bob = str(runs["bob"])
    out, err = chat(monkeypatch, capsys, "Who are you?\n", "--adapters", bob)
    assert f"model   {tiny_model_dir}" in err
    expected = session.generate(QUESTION, [bob], greedy(12))[bob]["text"]  # the run's system prompt
    assert out.startswith("user> Who are you?\n")
    assert expected.strip() and expected in out


def test_chat_takes_the_chat_template_from_the_run(monkeypatch, capsys, tiny_model_dir, tmp_path):
    """A run trained with --template chatml (no default system prompt) is asked in that format; the
    answer is checked against plain PEFT generate on a prompt rendered with that template."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunebench.engine.core.templates import CHATML
    from tunebench.engine.infer.prompts import stop_token_ids

    run = make_run(tmp_path, tiny_model_dir, "chatml-run", seed=3, template="chatml")
    out, _ = chat(monkeypatch, capsys, "Who are you?\n", "--adapters", str(run))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(model, run / "adapter").eval()

    def answer(template: str | None) -> str:
        inputs = tokenizer.apply_chat_template(
            QUESTION,
            chat_template=template,
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.inference_mode():
            ids = reference.generate(
                **inputs, max_new_tokens=12, do_sample=False, eos_token_id=sorted(stop_token_ids(tokenizer))
            )
        return tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    expected = answer(CHATML)
    assert expected != answer(None), "the two templates should give different answers here"
    assert expected.strip() and expected in out


def test_chat_and_probe_take_a_template_flag_over_the_runs(monkeypatch, capsys, runs, session, tmp_path):
    """`swift infer ... --template chatml`: the answers are the ones a chatml prompt gives, with a
    note that the run trained with another format; probe's transcript records it."""
    plain = str(runs["plain"])
    out, err = chat(monkeypatch, capsys, "Who are you?\n", "--adapters", plain, "--template", "chatml")
    expected = session.generate(QUESTION, [plain], greedy(12), template="chatml")[plain]["text"]
    own = session.generate(QUESTION, [plain], greedy(12))[plain]["text"]
    assert expected != own, "the two templates should give different answers here"
    assert expected.strip() and expected in out
    assert "note: --template chatml: plain trained with another chat template (the tokenizer's own)" in err
    assert tunebench(["chat", "--adapters", plain, "--template", "vicuna"]) == 2
    assert "unknown chat template 'vicuna'" in capsys.readouterr().err
    folder = tmp_path / "t"
    args = ["--adapters", plain, "--template", "qwen2_5", "--output_dir", str(folder)]
    args += ["--max_new_tokens", "4"]
    assert probe.probe_main([*args, "--torch_dtype", "float32"]) == 0
    # ms-swift's name for a family's format: this model's own template renders it, and says so
    assert (
        "note: --template qwen2_5: answers use the tokenizer's own (--template qwen2_5)"
        in capsys.readouterr().err
    )
    (transcript,) = folder.glob("probe-*.json")
    assert json.loads(transcript.read_text())["template"] == "qwen2_5"
    assert (
        "chat template: the tokenizer's own (--template qwen2_5)" in transcript.with_suffix(".md").read_text()
    )


def test_chat_commands_and_history(monkeypatch, capsys, runs, session):
    plain = str(runs["plain"])
    script = (
        "/system You are Alice.\nWho are you?\nAnd then?\n"
        "/clear\n/multi\nWho\nare you?\n.\n/quit\nnot asked\n"
    )
    out, _ = chat(monkeypatch, capsys, script, "--adapters", plain)
    assert "(system prompt: You are Alice.; history cleared)" in out
    first = session.generate(QUESTION, [plain], greedy(12), system="You are Alice.")[plain]["text"]
    history = [*QUESTION, {"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = session.generate(history, [plain], greedy(12), system="You are Alice.")[plain]["text"]
    multi = session.generate(
        [{"role": "user", "content": "Who\nare you?"}], [plain], greedy(12), system="You are Alice."
    )
    assert first in out and second in out and multi[plain]["text"] in out
    assert "(history cleared)" in out and "not asked" not in out


def test_compare_streams_base_and_adapter_one_after_another_off_a_terminal(
    monkeypatch, capsys, runs, session
):
    plain = str(runs["plain"])
    out, err = chat(
        monkeypatch, capsys, "Who are you?\n", "--adapters", plain, "--compare", "--stream", "false"
    )
    answers = session.generate(QUESTION, ["base", plain], greedy(12))
    assert out.index("── base ──") < out.index(answers["base"]["text"]) < out.index("── plain ──")
    assert answers[plain]["text"] in out.split("── plain ──")[1]
    assert "base: 12 tokens" in err


class _Terminal(io.StringIO):
    """Output that says it is a terminal, as a person's is."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("columns", [100, 60])
def test_compare_is_side_by_side_on_a_wide_terminal_and_sequential_on_a_narrow_one(
    monkeypatch, runs, session, tiny_model_dir, columns
):
    import os

    from tunebench.engine.core.targets import resolve_target

    plain = str(runs["plain"])
    monkeypatch.setattr(
        chat_command.shutil, "get_terminal_size", lambda *a, **kw: os.terminal_size((columns, 24))
    )
    setup = Setup(str(tiny_model_dir), [resolve_target("base"), resolve_target(plain)])
    loop = chat_command.ChatLoop(session, setup, greedy(40), None, stream=True)
    screen = _Terminal()
    loop.answer("Who are you?", screen, interactive=True)
    answers = session.generate(QUESTION, ["base", plain], greedy(40))
    output = screen.getvalue()
    if columns == 100:
        # The last frame holds the whole answer: a header with both labels, then rows of two cells.
        final = output.split("\x1b[J")[-1].splitlines()
        assert "── base " in final[0] and "── plain " in final[0]
        assert all(chat_command.cell_width(line) <= columns for line in final)
        left = "".join(line.split(chat_command.GAP)[0].rstrip() for line in final[1:])
        right = "".join(line.split(chat_command.GAP)[1].rstrip() for line in final[1:])
        for label, column in (("base", left), (plain, right)):
            printable = "".join(ch for ch in answers[label]["text"] if ch.isprintable() and ch != " ")
            assert column.replace(" ", "") == printable
    else:
        assert "\x1b[" not in output  # no cursor movement: one answer after the other
        base_part, plain_part = output.split("── plain ──")
        assert "── base ──" in base_part and answers["base"]["text"].strip() in base_part
        assert answers[plain]["text"].strip() in plain_part


def test_a_prompt_past_the_context_is_refused_and_the_chat_goes_on(monkeypatch, capsys, runs, session):
    """It ended the chat with exit 2, history and all, though its hint names /clear."""
    plain = str(runs["plain"])
    out, _ = chat(monkeypatch, capsys, "Who are you? " * 400 + "\nWho are you?\n", "--adapters", plain)
    assert "(no answer: this model's maximum context length is 512 tokens" in out
    assert session.generate(QUESTION, [plain], greedy(12))[plain]["text"] in out, (
        "the next question is answered"
    )


def test_ctrl_c_at_the_prompt_clears_the_line_and_keeps_the_chat(monkeypatch, runs, session, tiny_model_dir):
    from tunebench.engine.core.targets import resolve_target

    typed = iter([KeyboardInterrupt, "/quit"])

    def person(prompt: str) -> str:
        value = next(typed)
        if value is KeyboardInterrupt:
            raise KeyboardInterrupt
        return value

    monkeypatch.setattr("builtins.input", person)
    setup = Setup(str(tiny_model_dir), [resolve_target(str(runs["plain"]))])
    screen = _Terminal()
    assert chat_command.ChatLoop(session, setup, greedy(4), None, stream=True).run(_Terminal(), screen) == 0
    assert "Ctrl-D or /quit leaves the chat" in screen.getvalue()
    assert next(typed, None) is None, "the chat went on to read /quit"


def test_an_adapter_of_another_base_is_refused_before_loading(monkeypatch, capsys, runs, tmp_path_factory):
    from tiny import make_tiny_model_dir
    from tunebench.engine.infer import generate

    other = make_tiny_model_dir(tmp_path_factory.mktemp("other-base") / "model", seed=5)
    capsys.readouterr()
    monkeypatch.setattr(generate, "GenerationSession", lambda *a, **k: pytest.fail("loaded before refusing"))
    for command in ("chat", "probe"):
        assert tunebench([command, "--adapters", str(runs["plain"]), "--model", str(other)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "was trained on" in err and "Traceback" not in err


def test_probe_writes_a_json_and_a_markdown_transcript(capsys, runs, tmp_path):
    probes = tmp_path / "probes.txt"
    probes.write_text("# identity\nWho are you?\n\n你是谁？\n")
    run = runs["plain"]
    args = [
        "--adapters",
        str(run),
        "--probes",
        str(probes),
        "--max_new_tokens",
        "6",
        "--torch_dtype",
        "float32",
    ]
    assert probe.probe_main(args) == 0
    (json_file,) = (run / "transcripts").glob("probe-*.json")
    (md_file,) = (run / "transcripts").glob("probe-*.md")
    transcript = json.loads(json_file.read_text())
    assert [r["question"] for r in transcript["results"]] == ["Who are you?", "你是谁？"]
    assert [t["label"] for t in transcript["targets"]] == ["base", "plain"]
    assert all(set(r["answers"]) == {"base", "plain"} for r in transcript["results"])
    table = md_file.read_text()
    assert "| Question | base | plain |" in table and "| 你是谁？ |" in table
    assert table in capsys.readouterr().out


def test_probe_uses_the_workspaces_own_probe_set(capsys, tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "ws" / "runs", tiny_model_dir, "mine", seed=4)
    (tmp_path / "ws" / "probes.txt").write_text("# ours, as the TUI's chat pane uses it\nWhat is 2+2?\n")
    args = ["--adapters", str(run), "--max_new_tokens", "2", "--torch_dtype", "float32"]
    assert probe.probe_main(args) == 0
    (json_file,) = (run / "transcripts").glob("probe-*.json")
    assert [r["question"] for r in json.loads(json_file.read_text())["results"]] == ["What is 2+2?"]


def test_a_probe_transcript_is_whole_or_absent(monkeypatch, tmp_path):
    """A disk that fails mid-write (here: fsync) leaves no half-written transcript behind."""
    from types import SimpleNamespace

    from tunebench.engine.core import files

    target = SimpleNamespace(spec="base", label="base", adapter_dir=None)
    setup = Setup("tiny", [target])
    session = SimpleNamespace(loaded=SimpleNamespace(resolved=SimpleNamespace(path=tmp_path)))
    answers = [{"base": {"text": "I am a model.", "tokens": 4}}]

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError):
        probe.write_transcript(tmp_path / "t", setup, ["Who are you?"], answers, greedy(4), "", session)
    assert list((tmp_path / "t").iterdir()) == []
    monkeypatch.undo()
    json_path, md_path = probe.write_transcript(
        tmp_path / "t", setup, ["Who are you?"], answers, greedy(4), "", session
    )
    assert json.loads(json_path.read_text())["results"][0]["answers"]["base"]["text"] == "I am a model."
    assert "| Who are you? | I am a model. |" in md_path.read_text()


def test_a_probe_transcript_folder_that_cannot_be_made_is_said_before_the_model_loads(
    runs, tmp_path, capsys, monkeypatch
):
    """The answers took minutes and were then lost to an --output_dir that was a file."""
    monkeypatch.setattr(probe, "load_session", lambda *a: pytest.fail("the model loaded"))
    (tmp_path / "afile").write_text("mine")
    for folder, words in (
        (tmp_path / "afile", "is a file, not a folder"),
        (tmp_path / "afile" / "t", "is a file, so"),
    ):
        assert tunebench(["probe", "--adapters", str(runs["plain"]), "--output_dir", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --output_dir: ") and words in err and "move the file" in err
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_plain_peft_adapter_names_the_hub_base_it_records(runs, tmp_path, capsys):
    """A PEFT or ms-swift adapter folder with no run config records its base as a hub id; the
    error said no base was recorded and asked for --model."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(runs["plain"] / "adapter", bare)
    config = json.loads((bare / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "SomeOrg/NotCached-1B"
    (bare / "adapter_config.json").write_text(json.dumps(config))
    assert tunebench(["probe", "--adapters", str(bare)]) == 2
    err = capsys.readouterr().err
    assert "SomeOrg/NotCached-1B is not in the local Hugging Face cache" in err and "--model" in err


def test_an_adapter_that_does_not_fit_the_base_is_said_before_the_first_question(
    runs, tmp_path, capsys, monkeypatch
):
    """A plain adapter (no record of its base) with another --model: the error came only after
    the person had typed a question."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(runs["plain"] / "adapter", bare)
    config = json.loads((bare / "adapter_config.json").read_text())
    config.pop("base_model_name_or_path", None)
    (bare / "adapter_config.json").write_text(json.dumps(config))

    class Unread(io.StringIO):
        def readline(self, *args):
            pytest.fail("a question was read before the adapter loaded")

    monkeypatch.setattr("sys.stdin", Unread())
    assert tunebench(["chat", "--adapters", str(bare), "--model", "demo"]) == 2
    err = capsys.readouterr().err
    assert "could not load the adapter" in err and "--model" in err and "Traceback" not in err


def test_default_probe_set_ships_with_the_identity_questions():
    questions = probe.read_probes(probe.default_probes())
    assert {"Who are you?", "Can you browse the internet?"} <= set(questions)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["chat", "--adapters", "{tmp}/missing"], "adapter not found"),
        (["chat", "--adapters", "{model}"], "is a model, not an adapter"),
        (["probe", "--adapters", "{model}"], "is a model, not an adapter"),
        (["probe", "--probes", "{tmp}"], "is a folder, not a probe file"),
        (["export"], "--adapters is required"),
        (["export", "--adapters", "{tmp}/missing"], "adapter not found"),
        (["export", "--adapters", "{tmp}/a", "--quant_method", "awq"], "TuneBench exports gguf only"),
        (["export", "--adapters", "{tmp}/a", "--quant_bits", "8"], "--quant_bits 8 without --quant_method"),
        (
            ["export", "--adapters", "{tmp}/a", "--quant_method", "gguf", "--quant_bits", "3"],
            "not a GGUF type",
        ),
        (
            ["export", "--adapters", "{tmp}/a", "--quant_method", "gguf", "--adapter_only"],
            "the adapter alone",
        ),
        (["chat", "--temperature", "-1"], "--temperature: must be at least 0"),
        (["probe", "--probes", "{tmp}/empty.txt"], "holds no questions"),
    ],
)
def test_cli_mistakes_are_one_clean_message(argv, message, tmp_path, tiny_model_dir, capsys):
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    argv = [a.format(tmp=tmp_path, model=tiny_model_dir) for a in argv]
    assert tunebench(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_export_defaults_to_the_workspace_exports_folder(capsys, runs):
    assert export.export_main(["--adapters", str(runs["plain"]), "--adapter_only"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(runs["plain"].parent.parent / "exports" / "plain-adapter")
    # a second export by default goes beside the first, which stays as it was
    first = {p.name: p.read_bytes() for p in Path(path).iterdir()}
    assert export.export_main(["--adapters", str(runs["plain"]), "--adapter_only"]) == 0
    assert capsys.readouterr().out.strip() == path + "-2"
    assert {p.name: p.read_bytes() for p in Path(path).iterdir()} == first
    from tunebench.engine.core.targets import resolve_target

    gguf = export.default_export_dir(resolve_target(str(runs["plain"])), True, 8)
    assert gguf == runs["plain"].parent.parent / "exports" / "plain-q8_0"


def test_wrapping_counts_wide_characters_as_two_cells():
    assert chat_command.cell_width("小蜂 ok") == 7
    assert chat_command.wrap_cells("你好世界你好", 5) == ["你好", "世界", "你好"]
    assert chat_command.wrap_cells("one two three\nfour", 8) == ["one two", "three", "four"]

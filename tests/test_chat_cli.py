"""`tunebench chat|probe|export` driven like a person with a pipe: settings from the run, commands,
transcripts, and clean error messages."""

from __future__ import annotations

import io
import json

import pytest
from test_generate import QUESTION, greedy, make_run
from tunebench.engine import chat_cli
from tunebench.engine.cli import main as tunebench


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
    from tunebench.engine.generate import GenerationSession

    return GenerationSession(str(tiny_model_dir), torch_dtype="float32")


def chat(monkeypatch, capsys, stdin: str, *args: str) -> tuple[str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert chat_cli.chat_main([*args, "--max_new_tokens", "12", "--torch_dtype", "float32"]) == 0
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
    assert chat_cli.probe_main(args) == 0
    (json_file,) = (run / "transcripts").glob("probe-*.json")
    (md_file,) = (run / "transcripts").glob("probe-*.md")
    transcript = json.loads(json_file.read_text())
    assert [r["question"] for r in transcript["results"]] == ["Who are you?", "你是谁？"]
    assert [t["label"] for t in transcript["targets"]] == ["base", "plain"]
    assert all(set(r["answers"]) == {"base", "plain"} for r in transcript["results"])
    table = md_file.read_text()
    assert "| Question | base | plain |" in table and "| 你是谁？ |" in table
    assert table in capsys.readouterr().out


def test_default_probe_set_ships_with_the_identity_questions():
    questions = chat_cli.read_probes(chat_cli.default_probes())
    assert {"Who are you?", "Can you browse the internet?"} <= set(questions)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["chat", "--adapters", "{tmp}/missing"], "adapter not found"),
        (["chat", "--adapters", "{model}"], "holds no adapter"),
        (["probe", "--adapters", "{model}"], "holds no adapter"),
        (["export"], "--adapters is required"),
        (["export", "--adapters", "{tmp}/missing"], "adapter not found"),
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
    assert chat_cli.export_main(["--adapters", str(runs["plain"]), "--adapter_only"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(runs["plain"].parent.parent / "exports" / "plain-adapter")


def test_wrapping_counts_wide_characters_as_two_cells():
    assert chat_cli.cell_width("小蜂 ok") == 7
    assert chat_cli.wrap_cells("你好世界你好", 5) == ["你好", "世界", "你好"]
    assert chat_cli.wrap_cells("one two three\nfour", 8) == ["one two", "three", "four"]

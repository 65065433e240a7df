"""Export: the merged model loads with plain transformers and answers as base + adapter; adapter-only
copies; the Ollama Modelfile carries the chat template and system prompt."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_generate import QUESTION, make_run
from tunebench.engine.core.config import GenerationConfig
from tunebench.engine.core.errors import UserError
from tunebench.engine.infer.export import INFO_FILE


@pytest.fixture(scope="module")
def export_runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-runs")
    return {
        "lora": make_run(root, tiny_model_dir, "lora", seed=11, system="You are Ada."),
        "qlora": make_run(root, tiny_model_dir, "qlora", seed=12, train_type="qlora"),
    }


def test_merged_model_loads_plainly_and_matches_base_plus_adapter(export_runs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunebench.engine.infer.export import export_model
    from tunebench.engine.infer.generate import GenerationSession

    run = export_runs["lora"]
    messages: list[str] = []
    # float32 so the merged weights equal base + adapter exactly ("auto" merges in bfloat16 on a
    # GPU box, test_auto_merge_dtype_is_bfloat16_on_a_gpu_box_else_the_saved_one).
    out = export_model(str(run), str(tmp_path / "merged"), on_progress=messages.append, torch_dtype="float32")
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
        "Modelfile",
    ):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".*partial*")), "the temporary folder is renamed, not left behind"
    info = json.loads((out / "tunebench_export.json").read_text())
    assert info["merged"] and info["run_id"] == "lora" and info["dtype"] == "float32"

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.use_cache and "peft" not in type(model).__module__
    chat = [{"role": "system", "content": "You are Ada."}, *QUESTION]
    inputs = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=24, do_sample=False)  # generation_config stops
    merged_text = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    session = GenerationSession(str(info["base_model_path"]), torch_dtype="float32")
    expected = session.generate(QUESTION, [str(run)], GenerationConfig(max_new_tokens=24))[str(run)]
    assert merged_text == expected["text"]

    # A chat that brings no system prompt gets the run's, as base + adapter do.
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are Ada.<|im_end|>\n")
    inputs = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    default_text = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert default_text == expected["text"]
    # Weights as readable as the rest of the export (safetensors alone writes 0600).
    mode = (out / "config.json").stat().st_mode & 0o777
    assert all(f.stat().st_mode & 0o777 == mode for f in out.glob("*.safetensors"))

    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("# Ollama") and "\nFROM .\n" in modelfile
    assert 'SYSTEM """You are Ada."""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}" in modelfile and "}}<|im_end|>\n{{ end }}" in modelfile


def test_an_adapter_is_not_merged_into_another_base(
    export_runs, tiny_model_dir, tmp_path, tmp_path_factory, monkeypatch
):
    from tiny import make_tiny_model_dir
    from tunebench.engine.infer.export import export_model
    from tunebench.engine.models import loading as models

    other = make_tiny_model_dir(tmp_path_factory.mktemp("other-base") / "model", seed=5)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("refused only after loading"))
    with pytest.raises(UserError, match="was trained on .* not on"):
        export_model(str(export_runs["lora"]), str(tmp_path / "wrong"), model=str(other))
    moved = make_run(tmp_path, tiny_model_dir, "moved", seed=13)
    config = json.loads((moved / "config.json").read_text())
    config["config"]["model"] = config["base_model_path"] = str(tmp_path / "gone")  # not on this machine
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="not usable here") as error:
        export_model(str(moved), str(tmp_path / "moved-out"))
    assert "--model" in error.value.hint
    assert not (tmp_path / "wrong").exists() and not (tmp_path / "moved-out").exists()


def test_qlora_adapter_merges_into_a_bf16_base_and_says_what_memory_it_needs(
    export_runs, tmp_path, monkeypatch
):
    from tunebench.engine.infer import export
    from tunebench.engine.infer.export import count_parameters, export_model

    messages: list[str] = []
    out = export_model(str(export_runs["qlora"]), str(tmp_path / "q"), on_progress=messages.append)
    (qlora,) = [m for m in messages if "QLoRA" in m]
    need_gib = count_parameters(json.loads((out / INFO_FILE).read_text())["base_model_path"]) * 2 / 2**30
    assert "unquantised in bfloat16" in qlora and f"about {need_gib:.1f} GiB of CPU memory" in qlora
    config = json.loads((out / "config.json").read_text())
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"
    assert not any(m.startswith("warning") for m in messages)

    monkeypatch.setattr(export, "available_memory_gib", lambda: 0.0)  # a box short of memory
    messages.clear()
    export_model(str(export_runs["qlora"]), str(tmp_path / "q2"), on_progress=messages.append)
    assert any(m.startswith("warning: only 0.0 GiB of memory is free") for m in messages)


def test_adapter_only_copies_the_peft_adapter(export_runs, tmp_path):
    from tunebench.engine.infer.export import export_model

    out = export_model(str(export_runs["lora"]), str(tmp_path / "a"), merge=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "Modelfile",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tunebench_export.json",
    ]
    assert "\nADAPTER .\n" in (out / "Modelfile").read_text()


def test_existing_output_is_never_overwritten(export_runs, tmp_path):
    from tunebench.engine.infer.export import export_model

    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_model(str(export_runs["lora"]), str(target), merge=False)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_an_output_folder_that_cannot_be_written_is_said_before_the_merge(export_runs, tmp_path, monkeypatch):
    """A GGUF export of a 7B wrote every tensor before its last rename failed: now said first."""
    import errno
    import tempfile

    from tunebench.engine.infer import export

    real = tempfile.mkstemp
    shut = tmp_path / "shut"
    shut.mkdir()

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own name
        if dir is not None and Path(dir) == shut:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(export, "_merged_export", lambda *a, **k: pytest.fail("merged before the check"))
    with pytest.raises(UserError, match="--output_dir: cannot write into") as err:
        export.export_model(str(export_runs["lora"]), str(shut / "out"), merge=True)
    assert f"make {shut} writable for you" in err.value.hint
    assert not list(shut.iterdir())


def test_modelfile_templates_follow_the_chat_format(tiny_tokenizer):
    from tunebench.engine.core.templates import CHATML, LLAMA3, QWEN
    from tunebench.engine.infer.export import chat_format, default_system, ollama_modelfile

    assert chat_format(CHATML) == chat_format(QWEN) == "chatml"
    assert chat_format(LLAMA3) == "llama3"
    assert default_system(tiny_tokenizer, QWEN) == "You are a helpful assistant."
    assert default_system(tiny_tokenizer, CHATML) == ""
    llama = ollama_modelfile(".", LLAMA3, "", ["<|eot_id|>"])
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}" in llama
    assert "(not $last) }}<|eot_id|>{{ end }}" in llama
    assert "SYSTEM" not in llama
    other = ollama_modelfile(".", "{{ messages }}", "Be brief.", ["</s>"])
    assert not any(line.startswith("TEMPLATE") for line in other.splitlines())
    assert 'SYSTEM """Be brief."""' in other


def test_parameter_count_from_safetensors_headers(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from tunebench.engine.infer.export import count_parameters

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert count_parameters(tiny_model_dir) == sum(p.numel() for p in model.parameters())  # tied: once


# Ollama's prompt building, for the test below: system messages are collected into .System and
# kept in .Messages, consecutive messages of one role are joined, and the Modelfile's SYSTEM is
# put first when the chat brings none (ollama's template.Execute, collate and chat handler).
OLLAMA_RENDER_GO = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string    `json:"template"`
		System   string    `json:"system"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	msgs := in.Messages
	if in.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: in.System}}, msgs...)
	}
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role {
			collated[len(collated)-1].Content += "\\n\\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	t := template.Must(template.New("").Option("missingkey=zero").Parse(in.Template))
	values := map[string]any{"System": strings.Join(system, "\\n\\n"), "Messages": collated, "Response": ""}
	if err := t.Execute(os.Stdout, values); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go, to run the template the way Ollama does")
def test_modelfile_template_renders_like_the_jinja_chat_template(export_runs, tiny_tokenizer, tmp_path):
    """The Modelfile's TEMPLATE and SYSTEM, run by Go's text/template as Ollama runs them, print the
    prompt the model's Jinja chat template prints, for the export's own template and the named ones."""
    import re
    import subprocess

    from tiny import CHATML_TEMPLATE, PARITY_CHATS, PARITY_PREFILL
    from tunebench.engine.core.go_template import ollama_prompt
    from tunebench.engine.core.templates import CHATML, LLAMA3, QWEN
    from tunebench.engine.infer.export import default_system, export_model, ollama_modelfile

    (tmp_path / "go.mod").write_text("module render\n\ngo 1.19\n")
    (tmp_path / "main.go").write_text(OLLAMA_RENDER_GO)
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off", "GOTOOLCHAIN": "local"}
    subprocess.run(["go", "build", "-o", "render", "."], cwd=tmp_path, env=env, check=True)

    def ollama(modelfile: str, messages: list[dict[str, str]]) -> str:
        template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M).group(1)
        system = re.search(r'^SYSTEM """(.*?)"""$', modelfile, re.S | re.M)
        request = {"template": template, "system": system.group(1) if system else "", "messages": messages}
        done = subprocess.run(
            [tmp_path / "render"], input=json.dumps(request), capture_output=True, text=True, check=True
        )
        # Export's own check renders it in Python (core/go_template.py): it must print what Go does.
        assert ollama_prompt(request["template"], request["system"], messages) == done.stdout
        return done.stdout

    merged = export_model(str(export_runs["lora"]), str(tmp_path / "merged"))  # run system: You are Ada.
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(merged)
    cases = [(exported, exported.chat_template, (merged / "Modelfile").read_text())]
    for template in (CHATML_TEMPLATE, CHATML, QWEN, LLAMA3):
        system = default_system(tiny_tokenizer, template)
        cases.append((tiny_tokenizer, template, ollama_modelfile(".", template, system, ["<|im_end|>"])))
    for tokenizer, template, modelfile in cases:
        for chat in PARITY_CHATS:
            jinja = tokenizer.apply_chat_template(
                chat, chat_template=template, tokenize=False, add_generation_prompt=True
            )
            assert ollama(modelfile, chat) == jinja.removeprefix(tokenizer.bos_token or "")
        # An assistant message last is left open for the model to go on, as Ollama's templates do.
        jinja = tokenizer.apply_chat_template(
            PARITY_PREFILL, chat_template=template, tokenize=False, continue_final_message=True
        )
        assert ollama(modelfile, PARITY_PREFILL) == jinja.removeprefix(tokenizer.bos_token or "")
    assert "You are Ada." in ollama(cases[0][2], QUESTION)


@pytest.mark.slow
def test_demo_model_merged_export_answers_as_base_plus_adapter(tmp_path):
    """The same check on the demo model (SmolLM2, tied embeddings, converted from GGUF), with
    base + adapter run in the dtype the export was merged in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunebench.engine.infer.export import export_model
    from tunebench.engine.infer.generate import GenerationSession
    from tunebench.engine.models.loading import resolve_model

    run = make_run(tmp_path, resolve_model("demo").path, "demo-run", seed=0)
    config = json.loads((run / "config.json").read_text())
    config["config"]["model"] = "demo"
    (run / "config.json").write_text(json.dumps(config))
    out = export_model(str(run), str(tmp_path / "merged"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    chats = [QUESTION, [{"role": "user", "content": "你是谁？"}]]
    merged = []
    for chat in chats:
        inputs = tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        merged.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    session = GenerationSession("demo", torch_dtype=str(model.dtype).removeprefix("torch."))
    answers = session.generate_many(chats, [str(run)], GenerationConfig(max_new_tokens=24))
    assert [a[str(run)]["text"] for a in answers] == merged
    base = session.generate_many(chats, ["base"], GenerationConfig(max_new_tokens=24))
    assert [a["base"]["text"] for a in base] != merged, "the adapter should change the answers"


def test_auto_merge_dtype_is_bfloat16_on_a_gpu_box_else_the_saved_one(tiny_model_dir, monkeypatch):
    import torch
    from tunebench.engine.infer.export import merge_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert merge_dtype(tiny_model_dir, qlora=False) == "float32"  # the tiny model is saved in float32
    assert merge_dtype(tiny_model_dir, qlora=True) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert merge_dtype(tiny_model_dir, qlora=False) == "bfloat16"

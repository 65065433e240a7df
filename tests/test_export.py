"""Export: the merged model loads with plain transformers and answers as base + adapter; adapter-only
copies; the Ollama Modelfile carries the chat template and system prompt."""

from __future__ import annotations

import json

import pytest
from test_generate import QUESTION, make_run
from tunebench.engine.config import GenerationConfig
from tunebench.engine.errors import UserError


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
    from tunebench.engine.export import export_model
    from tunebench.engine.generate import GenerationSession

    run = export_runs["lora"]
    messages: list[str] = []
    out = export_model(str(run), str(tmp_path / "merged"), on_progress=messages.append)
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

    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("# Ollama") and "\nFROM .\n" in modelfile
    assert 'SYSTEM """You are Ada."""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in modelfile


def test_qlora_adapter_merges_into_a_bf16_base_and_says_what_memory_it_needs(export_runs, tmp_path):
    from tunebench.engine.export import export_model

    messages: list[str] = []
    out = export_model(str(export_runs["qlora"]), str(tmp_path / "q"), on_progress=messages.append)
    assert any("QLoRA" in m and "bfloat16" in m and "GiB" in m for m in messages)
    config = json.loads((out / "config.json").read_text())
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"


def test_adapter_only_copies_the_peft_adapter(export_runs, tmp_path):
    from tunebench.engine.export import export_model

    out = export_model(str(export_runs["lora"]), str(tmp_path / "a"), merge=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "Modelfile",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tunebench_export.json",
    ]
    assert "\nADAPTER .\n" in (out / "Modelfile").read_text()


def test_existing_output_is_never_overwritten(export_runs, tmp_path):
    from tunebench.engine.export import export_model

    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_model(str(export_runs["lora"]), str(target), merge=False)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_modelfile_templates_follow_the_chat_format(tiny_tokenizer):
    from tunebench.engine.export import chat_format, default_system, ollama_modelfile
    from tunebench.engine.templates import CHATML, LLAMA3, QWEN

    assert chat_format(CHATML) == chat_format(QWEN) == "chatml"
    assert chat_format(LLAMA3) == "llama3"
    assert default_system(tiny_tokenizer, QWEN) == "You are a helpful assistant."
    assert default_system(tiny_tokenizer, CHATML) == ""
    llama = ollama_modelfile(".", LLAMA3, "", ["<|eot_id|>"])
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>" in llama
    assert "SYSTEM" not in llama
    other = ollama_modelfile(".", "{{ messages }}", "Be brief.", ["</s>"])
    assert not any(line.startswith("TEMPLATE") for line in other.splitlines())
    assert 'SYSTEM """Be brief."""' in other


def test_parameter_count_from_safetensors_headers(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from tunebench.engine.export import count_parameters

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert count_parameters(tiny_model_dir) == sum(p.numel() for p in model.parameters())  # tied: once

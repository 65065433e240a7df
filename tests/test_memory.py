"""Memory: live samples on a machine with or without a GPU, and the training memory estimate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tunebench.engine import memory as M
from tunebench.engine.config import TrainConfig

# Qwen2.5-7B-Instruct's config.json, the model the README targets.
QWEN_7B = {
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "intermediate_size": 18944,
    "vocab_size": 152064,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}


def test_sample_says_what_it_found():
    sample = M.sample_memory()
    assert sample.type == "MemorySample"
    assert sample.rss > 0 and sample.ram_total >= sample.ram_available > 0
    if sample.gpus:
        for gpu in sample.gpus:
            assert gpu["name"] and 0 <= gpu["used"] <= gpu["total"]
            assert set(gpu) >= {"index", "name", "used", "total", "util"}
    else:
        assert "no NVIDIA GPU" in sample.gpu_note or "NVML" in sample.gpu_note


def test_sampling_never_imports_torch():
    code = (
        "import sys; from tunebench.engine.memory import sample_memory; s = sample_memory(); "
        "print('torch' in sys.modules, s.allocated, s.rss > 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "0", "True"]


def test_qwen_7b_shape_matches_its_published_size():
    shape = M.ModelShape.from_config(QWEN_7B)
    assert abs(shape.parameters - 7.62e9) / 7.62e9 < 0.01


def total(**settings) -> float:
    return M.estimate_training_memory(TrainConfig(**settings), QWEN_7B).total_gib


def test_estimate_is_positive_and_adds_up():
    estimate = M.estimate_training_memory(TrainConfig(), QWEN_7B)
    assert estimate.total_gib > 0
    assert set(estimate.parts) == {
        "weights",
        "lora",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "overhead",
    }
    assert all(value > 0 for value in estimate.parts.values())
    assert abs(sum(estimate.parts.values()) - estimate.total_gib) < 0.01
    assert 14 < estimate.parts["weights"] < 15  # 7.6B bf16 weights
    assert estimate.trainable == M.lora_params(M.ModelShape.from_config(QWEN_7B), 8, ("all-linear",))


def test_estimate_grows_with_tokens_and_shrinks_with_qlora_and_recompute():
    base = total(max_length=2048, gradient_checkpointing=True)
    assert total(max_length=4096, gradient_checkpointing=True) > base
    assert total(max_length=2048, per_device_train_batch_size=4, gradient_checkpointing=True) > base
    assert total(max_length=2048, train_type="qlora", gradient_checkpointing=True) < base
    assert total(max_length=2048, gradient_checkpointing=False) > base
    assert total(max_length=2048, gradient_checkpointing=False, profile="lean") == base
    assert total(lora_rank=64) > total(lora_rank=8)
    assert total(target_modules=["q_proj", "v_proj"]) < total(target_modules=["all-linear"])


def test_qlora_keeps_weights_under_a_third_of_bf16():
    lora = M.estimate_training_memory(TrainConfig(), QWEN_7B).parts["weights"]
    qlora = M.estimate_training_memory(TrainConfig(train_type="qlora"), QWEN_7B).parts["weights"]
    assert qlora < lora / 1.8  # NF4 linears, but embeddings and head upcast to fp32


def test_model_info_from_a_local_folder(tiny_model_dir):
    info = M.read_model_info(str(tiny_model_dir))
    assert info is not None and info["hidden_size"] == 64
    relative = M.read_model_info(tiny_model_dir.name, base=tiny_model_dir.parent)
    assert relative == info
    estimate = M.estimate_training_memory(TrainConfig(model=str(tiny_model_dir), max_length=64))
    assert estimate.total_gib > 0 and estimate.parameters > 0


def test_model_info_for_demo_and_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "empty-cache"))
    assert M.read_model_info("demo") == M.DEMO_MODEL_INFO  # before its first conversion
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-7B-Instruct" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(QWEN_7B))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert M.read_model_info("Qwen/Qwen2.5-7B-Instruct") == QWEN_7B
    assert M.read_model_info("Nobody/Missing") is None


def test_unknown_model_cannot_be_estimated(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        M.estimate_training_memory(TrainConfig(model=str(tmp_path / "missing")))

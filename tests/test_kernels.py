"""liger's fused kernels on a loaded model (engine/models/kernels.py): what the decode swaps in,
and that every module is transformers' own again afterwards."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from test_accel import tiny_qwen2
from tunebench.engine.models import kernels


@pytest.fixture
def fake_liger(monkeypatch):
    """A stand-in liger-kernel whose kernels are transformers' own maths, counted per call: the
    CPU has no triton, and the glue (which modules, what is put back) is what is tested here."""
    calls = {"norm": 0, "swiglu": 0, "rope": 0}

    def norm_forward(self, x):
        calls["norm"] += 1
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.variance_epsilon)).to(x.dtype)

    class SwiGLU:
        def forward(self, x):
            calls["swiglu"] += 1
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    def bind(module, name, fn):
        module.__dict__[name] = types.MethodType(fn, module)

    def patch_norm(module, offset, eps, casting_mode, in_place):
        module.variance_epsilon = getattr(module, "variance_epsilon", eps)
        bind(module, "forward", norm_forward)
        bind(module, "_get_name", lambda self: "LigerRMSNorm")

    def patch_swiglu(module, liger_module):
        bind(module, "forward", liger_module.forward)

    from transformers.models.qwen2 import modeling_qwen2

    real_rope = modeling_qwen2.apply_rotary_pos_emb

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        calls["rope"] += 1
        return real_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    found = {
        "liger_kernel": types.ModuleType("liger_kernel"),
        "liger_kernel.transformers": types.ModuleType("liger_kernel.transformers"),
        "liger_kernel.transformers.monkey_patch": types.SimpleNamespace(
            _patch_rms_norm_module=patch_norm, _patch_swiglu_module=patch_swiglu
        ),
        "liger_kernel.transformers.swiglu": types.SimpleNamespace(LigerSwiGLUMLP=SwiGLU),
        "liger_kernel.transformers.rope": types.SimpleNamespace(liger_rotary_pos_emb=rope),
    }
    for name, module in found.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_liger_kernels_apply_inside_the_block_and_are_gone_after(fake_liger):
    from transformers.models.qwen2 import modeling_qwen2

    model = tiny_qwen2().eval()
    ids = torch.arange(3, 19)[None]
    before = logits(model, ids)
    rope_before = modeling_qwen2.apply_rotary_pos_emb
    with kernels.liger_kernels(model) as applied:
        inside = logits(model, ids)
        assert applied == ["liger RMSNorm x5", "liger SwiGLU x2", "liger rotary embedding"]
        assert model.model.norm._get_name() == "LigerRMSNorm"
    # 2 layers: 2 norms each and the final one; an MLP and a rotary embedding each.
    assert fake_liger == {"norm": 5, "swiglu": 2, "rope": 2}
    torch.testing.assert_close(inside, before)

    after = logits(model, ids)
    assert fake_liger == {"norm": 5, "swiglu": 2, "rope": 2}, "transformers' own forwards again"
    assert modeling_qwen2.apply_rotary_pos_emb is rope_before
    assert "forward" not in model.model.norm.__dict__
    assert model.model.norm._get_name() == "Qwen2RMSNorm"
    assert torch.equal(after, before)


def test_liger_kernels_leave_a_forward_bound_before_them_in_place(fake_liger):
    model = tiny_qwen2().eval()
    norm = model.model.norm
    hooked = types.MethodType(lambda self, x: x, norm)  # e.g. accelerate's hook on an instance
    norm.__dict__["forward"] = hooked
    with kernels.liger_kernels(model):
        assert norm.forward is not hooked
    assert norm.__dict__["forward"] is hooked


def test_without_liger_or_outside_its_families_nothing_changes(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed: the import fails
    model = tiny_qwen2().eval()
    with kernels.liger_kernels(model) as applied:
        assert applied == []
        assert "forward" not in model.model.norm.__dict__

    model.config.model_type = "gpt2"
    assert kernels.patch_liger(model) == []


@pytest.mark.gpu
def test_the_cuda_decode_answers_the_same_with_ligers_kernels(tiny_model_dir):
    """On a GPU with liger installed: greedy answers of both columns, with and without them."""
    pytest.importorskip("liger_kernel")
    from tunebench.engine.core.config import GenerationConfig
    from tunebench.engine.infer.generate import GenerationSession

    session = GenerationSession(str(tiny_model_dir), torch_dtype="float32")
    question = [{"role": "user", "content": "Who are you?"}]
    cfg = GenerationConfig(max_new_tokens=24)  # greedy
    assert session.fused_kernels
    fused = session.generate(question, ["base"], cfg)
    session.fused_kernels = False
    plain = session.generate(question, ["base"], cfg)
    assert fused["base"]["text"] == plain["base"]["text"]

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
        module.offset, module.casting_mode, module.in_place = offset, casting_mode, in_place
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

    class RMSNormFunction:  # the probe's kernel
        @staticmethod
        def apply(x, weight, eps):
            return x * weight

    found = {
        "liger_kernel": types.ModuleType("liger_kernel"),
        "liger_kernel.ops": types.ModuleType("liger_kernel.ops"),
        "liger_kernel.ops.rms_norm": types.SimpleNamespace(LigerRMSNormFunction=RMSNormFunction),
        "liger_kernel.transformers": types.ModuleType("liger_kernel.transformers"),
        "liger_kernel.transformers.monkey_patch": types.SimpleNamespace(
            _patch_rms_norm_module=patch_norm, _patch_swiglu_module=patch_swiglu
        ),
        "liger_kernel.transformers.swiglu": types.SimpleNamespace(LigerSwiGLUMLP=SwiGLU),
        "liger_kernel.transformers.rope": types.SimpleNamespace(liger_rotary_pos_emb=rope),
    }
    for name, module in found.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(kernels, "_runs", {})  # the probe asks again
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
    assert not hasattr(model.model.norm, "casting_mode")
    assert model.model.norm._get_name() == "Qwen2RMSNorm"
    assert torch.equal(after, before)


def test_a_block_inside_another_keeps_the_outer_ones_rotary_swap(fake_liger):
    """Two sessions' requests overlapping: the inner block neither swaps again nor puts back
    liger's function as if it were transformers' own."""
    from transformers.models.qwen2 import modeling_qwen2

    own = modeling_qwen2.apply_rotary_pos_emb
    first, second = tiny_qwen2().eval(), tiny_qwen2(seed=1).eval()
    with kernels.liger_kernels(first) as outer:
        liger_rope = modeling_qwen2.apply_rotary_pos_emb
        with kernels.liger_kernels(second) as inner:
            assert modeling_qwen2.apply_rotary_pos_emb is liger_rope
        assert "liger rotary embedding" in outer and "liger rotary embedding" not in inner
        assert modeling_qwen2.apply_rotary_pos_emb is liger_rope
    assert modeling_qwen2.apply_rotary_pos_emb is own


def test_liger_kernels_leave_a_forward_bound_before_them_in_place(fake_liger):
    model = tiny_qwen2().eval()
    norm = model.model.norm
    hooked = types.MethodType(lambda self, x: x, norm)  # e.g. accelerate's hook on an instance
    norm.__dict__["forward"] = hooked
    with kernels.liger_kernels(model):
        assert norm.forward is not hooked
    assert norm.__dict__["forward"] is hooked


def test_a_liger_that_fails_to_run_is_named_once_and_left_out(fake_liger, monkeypatch, caplog):
    def broken(x, weight, eps):
        raise RuntimeError("triton: no compiler for this card")

    monkeypatch.setattr(sys.modules["liger_kernel.ops.rms_norm"].LigerRMSNormFunction, "apply", broken)
    model = tiny_qwen2().eval()
    for _ in range(2):
        with kernels.liger_kernels(model) as applied:
            assert applied == []
    assert [r.getMessage() for r in caplog.records] == [
        "liger's kernels do not run on cpu (triton: no compiler for this card); decoding without them"
    ]


def test_without_liger_or_outside_its_families_nothing_changes(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed: the import fails
    monkeypatch.setattr(kernels, "_runs", {})
    model = tiny_qwen2().eval()
    with kernels.liger_kernels(model) as applied:
        assert applied == []
        assert "forward" not in model.model.norm.__dict__

    model.config.model_type = "gpt2"
    assert kernels.patch_liger(model) == []


class FakeRopeKernel:
    """liger's `_triton_rope` as launched (`kernel[grid](...)`), in torch: rotates each row's
    heads in place at the row stride it is given, as the triton kernel addresses memory, and
    records whether it was handed contiguous tensors (copies). wrong=True: a kernel whose
    arguments changed meaning (the sine's sign flipped)."""

    def __init__(self, wrong: bool = False) -> None:
        self.calls: list[bool] = []
        self.wrong = wrong

    def __getitem__(self, grid):
        def launch(*, q_ptr, q_row_stride, k_ptr, k_row_stride, cos, cos_row_stride, sin, sin_row_stride,
                   sl, bs, cos_bs, n_qh, n_kh, hd, pad_n_qh, pad_n_kh, pad_hd, pad_rd, rd, BLOCK_SIZE,
                   BACKWARD_PASS):  # fmt: skip
            assert grid == (bs * sl,) and sl == 1 and not BACKWARD_PASS
            self.calls.append(q_ptr.is_contiguous() and k_ptr.is_contiguous())
            half = rd // 2
            c = torch.as_strided(cos, (bs, 1, half), (cos_row_stride if cos_bs > 1 else 0, 0, 1))
            s = torch.as_strided(sin, (bs, 1, half), (sin_row_stride if cos_bs > 1 else 0, 0, 1))
            s = -s if self.wrong else s
            for t, stride, heads in ((q_ptr, q_row_stride, n_qh), (k_ptr, k_row_stride, n_kh)):
                rows = torch.as_strided(t, (bs, heads, hd), (stride, hd, 1))
                x1, x2 = rows[..., :half].clone(), rows[..., half:rd].clone()
                rows[..., :half] = x1 * c - x2 * s
                rows[..., half:rd] = x2 * c + x1 * s

        return launch


@pytest.fixture
def fake_rope_kernel(fake_liger, monkeypatch):
    kernel = FakeRopeKernel()
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.rope", types.SimpleNamespace(_triton_rope=kernel))
    monkeypatch.setattr(kernels, "_in_place", {})
    monkeypatch.setattr(kernels, "_in_place_answers", {})
    return kernel


def fused_qk(rows=2, tokens=1, q_heads=4, k_heads=2, head_dim=16, **where):
    """q and k as a decode step sees them after one fused q/k/v matmul: views, rows apart."""
    width = (q_heads + 2 * k_heads) * head_dim
    fused = torch.randn(rows, tokens, width, **where)
    q = fused[..., : q_heads * head_dim].view(rows, tokens, q_heads, head_dim).transpose(1, 2)
    k = fused[..., q_heads * head_dim : (q_heads + k_heads) * head_dim]
    return fused, q, k.view(rows, tokens, k_heads, head_dim).transpose(1, 2)


def test_the_decode_rotates_q_and_k_where_they_lie(fake_liger, fake_rope_kernel):
    from transformers.models.qwen2 import modeling_qwen2

    liger_rope = sys.modules["liger_kernel.transformers.rope"].liger_rotary_pos_emb
    rope = kernels._decode_rope(torch.device("cpu"), liger_rope, 4, 2, 16)
    assert rope is not liger_rope, "the probe accepted the kernel"
    probed = len(fake_rope_kernel.calls)

    fused, q, k = fused_qk()
    angles = torch.rand(2, 1, 8) * 6
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    expected = modeling_qwen2.apply_rotary_pos_emb(q.clone(), k.clone(), cos, sin)
    with torch.inference_mode():
        got = rope(q, k, cos, sin)
    for out, want in zip(got, expected, strict=True):
        torch.testing.assert_close(out, want)
    assert got[0].data_ptr() == fused.data_ptr(), "rotated inside the fused output"
    assert fake_rope_kernel.calls[probed:] == [False], "handed the views, not copies"
    assert fake_liger["rope"] == 0

    # A prefill (several tokens per row) and anything under autograd take liger's wrapper.
    _, q, k = fused_qk(tokens=3)
    with torch.inference_mode():
        rope(q, k, torch.cat([cos] * 3, 1), torch.cat([sin] * 3, 1))
    _, q, k = fused_qk()
    rope(q, k, cos, sin)
    assert fake_liger["rope"] == 2 and len(fake_rope_kernel.calls) == probed + 1


def test_a_rope_kernel_that_answers_wrong_is_left_for_ligers_wrapper(fake_liger, fake_rope_kernel, caplog):
    fake_rope_kernel.wrong = True
    liger_rope = sys.modules["liger_kernel.transformers.rope"].liger_rotary_pos_emb
    assert kernels._decode_rope(torch.device("cpu"), liger_rope, 4, 2, 16) is liger_rope
    assert "does not rotate in place here" in caplog.text
    with kernels.liger_kernels(tiny_qwen2().eval()) as applied:
        assert applied[-1] == "liger rotary embedding"


def test_a_compiled_decode_step_takes_ligers_copying_rotary(tiny_model_dir, fake_liger, fake_rope_kernel):
    """On an H200 a decode step compiled with the in-place rotation answered other greedy tokens
    than the eager one, and the same ones with liger's copying wrapper (bench/RESULTS.md, session
    26): the session's compile_step asks for the wrapper."""
    from tunebench.engine.infer.generate import GenerationSession

    session = GenerationSession(str(tiny_model_dir), torch_dtype="float32")
    session.fused_kernels = True
    with session._kernels() as applied:
        assert applied[-1] == "liger rotary embedding (in place)"
    session.compile_step = True
    with session._kernels() as applied:
        assert applied[-1] == "liger rotary embedding"


def test_blocks_on_two_devices_leaving_out_of_order_put_transformers_rotary_back(
    fake_liger, fake_rope_kernel
):
    """One block's device takes the in-place rotation, the other's (meta: the probe cannot run
    there) liger's wrapper; the first to enter swaps, and whichever leaves last, transformers'
    own function is back."""
    from transformers.models.qwen2 import modeling_qwen2

    own = modeling_qwen2.apply_rotary_pos_emb
    first, second = kernels.liger_kernels(tiny_qwen2().eval()), kernels.liger_kernels(tiny_qwen2().to("meta"))
    assert first.__enter__()[-1] == "liger rotary embedding (in place)"
    second.__enter__()
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert modeling_qwen2.apply_rotary_pos_emb is own


def test_a_fused_decode_with_the_in_place_rotation_answers_as_without(
    tiny_model_dir, fake_liger, fake_rope_kernel
):
    """The CUDA decode's layout on the CPU: fused q/k/v output, static cache, liger's kernels with
    the in-place rotation: the same greedy answers as transformers' own forwards."""
    from tunebench.engine.core.config import GenerationConfig
    from tunebench.engine.infer.generate import GenerationSession

    question = [{"role": "user", "content": "Who are you?"}]
    cfg = GenerationConfig(max_new_tokens=12)
    plain = GenerationSession(str(tiny_model_dir), torch_dtype="float32").generate(question, ["base"], cfg)
    session = GenerationSession(str(tiny_model_dir), torch_dtype="float32", decode="static")
    session.fuse_base = session.packed_gqa = session.fused_kernels = True
    fast = session.generate(question, ["base"], cfg)
    assert fast["base"]["text"] == plain["base"]["text"]
    layers = session.loaded.model.config.num_hidden_layers
    assert len(fake_rope_kernel.calls) > layers and not any(fake_rope_kernel.calls), "steps rotated in place"


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
    with kernels.liger_kernels(session.loaded.model) as applied:
        assert len(applied) == 3, applied  # norms, SwiGLU and the rotary embedding
    fused = session.generate(question, ["base"], cfg)
    session.fused_kernels = False
    plain = session.generate(question, ["base"], cfg)
    assert fused["base"]["text"] == plain["base"]["text"]


@pytest.mark.gpu
def test_ligers_rotary_kernel_rotates_a_fused_decode_layout_in_place():
    """On a GPU with liger: the probe takes liger's kernel, and it gives transformers' answer on
    the 7B's heads laid out as the fused q/k/v matmul leaves them."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.models.qwen2 import modeling_qwen2

    device = torch.device("cuda")
    rope = kernels._decode_rope(device, liger_rotary_pos_emb, 28, 4, 128)
    assert rope is not liger_rotary_pos_emb
    fused, q, k = fused_qk(q_heads=28, k_heads=4, head_dim=128, device=device, dtype=torch.bfloat16)
    angles = torch.rand(2, 1, 64, device=device) * 100
    cos, sin = (f(torch.cat([angles, angles], -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    expected = modeling_qwen2.apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float())
    with torch.inference_mode():
        got = rope(q, k, cos, sin)
    assert got[0].data_ptr() == fused.data_ptr()
    for out, want in zip(got, expected, strict=True):
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)

"""liger-kernel's fused kernels on a loaded model's modules: one kernel where transformers runs a
chain of small ones (RMSNorm's eight, SwiGLU's two, the rotary embedding's ten).

Training's CUDA path turns them on by name (`TUNEBENCH_ACCEL=+liger`: under torch.compile they
measured slower, bench/RESULTS.md). The CUDA decode uses them where liger runs: a decode step of
two rows is bound by how many kernels it launches, not by their work (bench/RESULTS_generate.md).
liger is the `gpu` extra, so each function here does nothing without it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..core.memory_model import model_sizes

log = logging.getLogger(__name__)

# Families whose norms, MLP and rotary embedding are the Llama ones liger's kernels implement.
LIGER_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "smollm3", "granite", "olmo2")
# The decode's rotary embedding rotates a step's q and k where they lie (_rope_in_place); off, it
# is liger's wrapper, which copies them first (bench_generate.py's variant `rope-copies`).
ROPE_IN_PLACE = True


def _liger_family(model: Any) -> bool:
    return getattr(model.config, "model_type", "") in LIGER_FAMILIES


def _targets(model: Any) -> list[tuple[str, Any]]:
    """The modules liger's kernels replace: ("norm", an RMSNorm with a weight) and ("mlp", a
    SwiGLU MLP)."""
    swiglu = getattr(model.config, "hidden_act", "silu") in ("silu", "swish")
    found = []
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
            found.append(("norm", module))
        elif swiglu and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            found.append(("mlp", module))
    return found


def patch_liger(model: Any) -> list[str]:
    """liger's fused RMSNorm and SwiGLU on this model's modules (instances only); what was patched."""
    return _patch(model, _targets(model))


def _patch(model: Any, targets: list[tuple[str, Any]]) -> list[str]:
    """patch_liger on `targets`, found already."""
    if not _liger_family(model):
        return []
    try:
        from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module, _patch_swiglu_module
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError:
        return []
    counts = {"norm": 0, "mlp": 0}
    for kind, module in targets:
        if kind == "norm":
            eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
            _patch_rms_norm_module(module, offset=0.0, eps=eps, casting_mode="llama", in_place=True)
        else:
            _patch_swiglu_module(module, LigerSwiGLUMLP)
        counts[kind] += 1
    names = {"norm": "liger RMSNorm", "mlp": "liger SwiGLU"}
    return [f"{names[kind]} x{n}" for kind, n in counts.items() if n]


def _liger_rope() -> Any:
    """liger's rotary embedding, in place of transformers' apply_rotary_pos_emb; None without it."""
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        return None
    return liger_rotary_pos_emb


def _rope_in_place(liger_rope: Any) -> Any:
    """liger's rotary embedding that, for one token per row and no autograd (a decode step),
    rotates q and k where they lie: liger's wrapper first copies them contiguous, and with the
    fused q/k/v matmul they are views whose rows lie a q/k/v row apart, so that is two copies
    per layer per step (bench/RESULTS_generate.md). Anything else goes to liger's wrapper.
    This launches liger's own kernel (`_triton_rope`, not public API) with its arguments named,
    so a liger whose kernel takes others fails before launching; `_decode_rope` checks the
    answer against the formula before the decode uses it. One per liger: it works on any device."""
    if liger_rope in _in_place:
        return _in_place[liger_rope]
    import torch
    from liger_kernel.ops.rope import _triton_rope

    def padded(n: int) -> int:  # triton.next_power_of_2, without importing triton here
        return 1 << (n - 1).bit_length()

    def rope(q: Any, k: Any, cos: Any, sin: Any, position_ids: Any = None, unsqueeze_dim: int = 1) -> Any:
        # q, k: (rows, heads, 1, head_dim); cos, sin: (rows or 1, 1, rotary_dim).
        if torch.is_grad_enabled() or q.shape[2] != 1 or cos.dim() != 3 or unsqueeze_dim != 1:
            return liger_rope(q, k, cos, sin, position_ids, unsqueeze_dim)
        q_rows, k_rows = q.transpose(1, 2), k.transpose(1, 2)  # (rows, 1, heads, head_dim)
        head_dim = q.shape[-1]
        rotary = min(cos.shape[-1], head_dim)
        in_rows = all(t.stride(3) == 1 and t.stride(2) == head_dim for t in (q_rows, k_rows))
        if not (in_rows and cos.is_contiguous() and sin.is_contiguous() and cos.shape[1] == 1):
            return liger_rope(q, k, cos, sin, position_ids, unsqueeze_dim)
        pad_q, pad_k = padded(q.shape[1]), padded(k.shape[1])
        # One program per row (sequence length 1): row r's heads start at r * stride(0).
        _triton_rope[(q.shape[0],)](
            q_ptr=q_rows,
            q_row_stride=q_rows.stride(0),
            k_ptr=k_rows,
            k_row_stride=k_rows.stride(0),
            cos=cos,
            cos_row_stride=cos.stride(-2),
            sin=sin,
            sin_row_stride=sin.stride(-2),
            sl=1,
            bs=q.shape[0],
            cos_bs=cos.shape[0],
            n_qh=q.shape[1],
            n_kh=k.shape[1],
            hd=head_dim,
            pad_n_qh=pad_q,
            pad_n_kh=pad_k,
            pad_hd=padded(head_dim),
            pad_rd=padded(rotary),
            rd=rotary,
            BLOCK_SIZE=max(pad_q, pad_k),
            BACKWARD_PASS=False,
        )
        return q, k

    _in_place[liger_rope] = rope
    return rope


def _rotated(x: Any, cos: Any, sin: Any) -> Any:
    """The rotary embedding's formula (transformers' rotate_half), in float32: the probe's answer."""
    import torch

    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x.float() * cos.float() + turned.float() * sin.float()


_in_place: dict[Any, Any] = {}  # liger's wrapper -> its in-place twin
_in_place_answers: dict[tuple, bool] = {}  # (device, wrapper, heads, kv heads, head dim) -> probed


def _decode_rope(device: Any, liger_rope: Any, q_heads: int, k_heads: int, head_dim: int) -> Any:
    """The rotary embedding the decode swaps in on `device` for a model of these heads:
    `_rope_in_place` where it gives the formula's answer on their fused q/k/v layout, else
    liger's wrapper. Asked once per device and shape."""
    key = (str(device), liger_rope, q_heads, k_heads, head_dim)
    if key not in _in_place_answers:
        _in_place_answers[key] = False
        try:
            import torch

            rope = _rope_in_place(liger_rope)
            rows = 2
            width = (q_heads + 2 * k_heads) * head_dim  # q | k | v, as the fused matmul lays them out
            fused = torch.arange(rows * width, device=device).sin().view(rows, 1, width).to(torch.bfloat16)
            q = fused[..., : q_heads * head_dim].view(rows, 1, q_heads, head_dim).transpose(1, 2)
            k = fused[..., q_heads * head_dim : (q_heads + k_heads) * head_dim]
            k = k.view(rows, 1, k_heads, head_dim).transpose(1, 2)
            angles = torch.arange(rows * head_dim // 2, device=device).view(rows, 1, -1) * 0.37
            angles = torch.cat((angles, angles), dim=-1)
            cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
            expected = (_rotated(q, cos[:, None], sin[:, None]), _rotated(k, cos[:, None], sin[:, None]))
            with torch.inference_mode():
                got = rope(q, k, cos, sin)
            for out, want in zip(got, expected, strict=True):
                torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
            _in_place_answers[key] = True
        except ImportError:
            pass
        except Exception as error:  # noqa: BLE001 - another liger's kernel: its own wrapper still works
            log.warning("liger's rotary kernel does not rotate in place here (%s); it copies first", error)
    return _in_place[liger_rope] if _in_place_answers[key] else liger_rope


_runs: dict[str, bool] = {}


def liger_runs(device: Any) -> bool:
    """Whether liger's kernels run here (liger installed, and triton compiles for this card);
    asked once per device. A liger that fails says why once, and the decode goes on without it."""
    key = str(device)
    if key not in _runs:
        try:
            import torch
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            x = torch.ones(2, 64, device=device, dtype=torch.bfloat16)
            LigerRMSNormFunction.apply(x, torch.ones(64, device=device, dtype=torch.bfloat16), 1e-6)
            _runs[key] = True
        except ImportError:
            _runs[key] = False
        except Exception as error:  # noqa: BLE001 - a broken triton or liger must not stop a chat
            log.warning("liger's kernels do not run on %s (%s); decoding without them", device, error)
            _runs[key] = False
    return _runs[key]


@contextmanager
def liger_kernels(model: Any, rope_in_place: bool = True) -> Iterator[list[str]]:
    """While inside, `patch_liger`'s kernels and liger's rotary embedding; yields what applies.
    `rope_in_place` False: liger's copying rotary wrapper, for a decode step torch.compile traces
    (on a GPU the compiled step's greedy answers differ with the in-place one and agree with the
    copies: tests/test_generate.py, test_cuda_decode_speed_options_each_give_the_same_greedy_answers).
    On leaving, each patched module's attributes are as they were, so a caller measuring without
    them, or training on the same model, sees transformers' own forwards.

    transformers' attention calls its modeling module's `apply_rotary_pos_emb` by name, so that
    swap is of the module attribute, for every model of the family while inside. A CUDA graph
    captured inside keeps liger's kernels after it."""
    liger_rope = _liger_rope()
    device = next(model.parameters()).device
    if liger_rope is None or not _liger_family(model) or not liger_runs(device):
        yield []
        return
    decode_rope = liger_rope
    if ROPE_IN_PLACE and rope_in_place:
        sizes = model_sizes(model.config)
        decode_rope = _decode_rope(device, liger_rope, sizes["heads"], sizes["kv_heads"], sizes["head_dim"])
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    attention = getattr(layers[0], "self_attn", None) if len(layers) else None
    modeling: Any = sys.modules.get(type(attention).__module__) if attention is not None else None
    original_rope = getattr(modeling, "apply_rotary_pos_emb", None)
    # Another block already inside (another session's request, maybe on another device) keeps
    # its own swap, whichever of liger's two it chose.
    swap_rope = original_rope is not None and original_rope not in (liger_rope, _in_place.get(liger_rope))
    targets = _targets(model)
    saved = [(module, dict(module.__dict__)) for _, module in targets]
    try:
        applied = _patch(model, targets)
        if swap_rope:
            modeling.apply_rotary_pos_emb = decode_rope
            in_place = " (in place)" if decode_rope is not liger_rope else ""
            applied.append(f"liger rotary embedding{in_place}")
        yield applied
    finally:
        if swap_rope:
            modeling.apply_rotary_pos_emb = original_rope
        for module, attributes in saved:
            for key in [k for k in module.__dict__ if k not in attributes]:
                del module.__dict__[key]
            module.__dict__.update(attributes)

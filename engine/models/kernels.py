"""liger-kernel's fused kernels on a loaded model's modules: one kernel where transformers runs a
chain of small ones (RMSNorm's eight, SwiGLU's two, the rotary embedding's ten).

Training's CUDA path turns them on by name (`TUNEBENCH_ACCEL=+liger`: under torch.compile they
measured slower, bench/RESULTS.md). The CUDA decode uses them always where liger is installed: a
decode step of two rows is bound by how many kernels it launches, not by their work
(bench/RESULTS_generate.md). liger is the `gpu` extra, so each function here does nothing without it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Families whose norms, MLP and rotary embedding are the Llama ones liger's kernels implement.
LIGER_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "smollm3", "granite", "olmo2")


def _liger_family(model: Any) -> bool:
    return getattr(model.config, "model_type", "") in LIGER_FAMILIES


def patch_liger(model: Any) -> list[str]:
    """liger's fused RMSNorm and SwiGLU on this model's modules (instances only); what was patched."""
    if not _liger_family(model):
        return []
    try:
        from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module, _patch_swiglu_module
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError:
        return []
    norms = mlps = 0
    act = getattr(model.config, "hidden_act", "silu")
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "weight") and module.weight is not None:
            eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
            _patch_rms_norm_module(module, offset=0.0, eps=eps, casting_mode="llama", in_place=True)
            norms += 1
        elif act in ("silu", "swish") and all(
            hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")
        ):
            _patch_swiglu_module(module, LigerSwiGLUMLP)
            mlps += 1
    return [f"liger RMSNorm x{norms}", f"liger SwiGLU x{mlps}"] if norms or mlps else []


# What liger binds on a module instance, put back when a `liger_kernels` block ends.
_BOUND = ("forward", "extra_repr", "_get_name")


@contextmanager
def liger_kernels(model: Any) -> Iterator[list[str]]:
    """While inside, `patch_liger`'s kernels and liger's rotary embedding; yields what applies.
    On leaving, every module is as it was: a caller measuring without them, or training on the
    same model, sees transformers' own forwards.

    transformers' attention calls its modeling module's `apply_rotary_pos_emb` by name, so that
    swap is of the module attribute, for every model of the family while inside. A CUDA graph
    captured inside keeps liger's kernels after it."""
    saved = [(m, {k: m.__dict__[k] for k in _BOUND if k in m.__dict__}) for m in model.modules()]
    modeling = None
    if _liger_family(model):
        layers = getattr(getattr(model, "model", None), "layers", None) or []
        attention = getattr(layers[0], "self_attn", None) if len(layers) else None
        modeling = sys.modules.get(type(attention).__module__) if attention is not None else None
    original_rope = getattr(modeling, "apply_rotary_pos_emb", None)
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        original_rope = None
    applied = patch_liger(model)
    if original_rope is not None:
        modeling.apply_rotary_pos_emb = liger_rotary_pos_emb
        applied.append("liger rotary embedding")
    try:
        yield applied
    finally:
        if original_rope is not None:
            modeling.apply_rotary_pos_emb = original_rope
        for module, bound in saved:
            for key in _BOUND:
                module.__dict__.pop(key, None)
            module.__dict__.update(bound)

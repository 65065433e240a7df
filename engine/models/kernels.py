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

log = logging.getLogger(__name__)

# Families whose norms, MLP and rotary embedding are the Llama ones liger's kernels implement.
LIGER_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "smollm3", "granite", "olmo2")


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
def liger_kernels(model: Any) -> Iterator[list[str]]:
    """While inside, `patch_liger`'s kernels and liger's rotary embedding; yields what applies.
    On leaving, each patched module's attributes are as they were, so a caller measuring without
    them, or training on the same model, sees transformers' own forwards.

    transformers' attention calls its modeling module's `apply_rotary_pos_emb` by name, so that
    swap is of the module attribute, for every model of the family while inside. A CUDA graph
    captured inside keeps liger's kernels after it."""
    liger_rope = _liger_rope()
    if liger_rope is None or not _liger_family(model) or not liger_runs(next(model.parameters()).device):
        yield []
        return
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    attention = getattr(layers[0], "self_attn", None) if len(layers) else None
    modeling: Any = sys.modules.get(type(attention).__module__) if attention is not None else None
    original_rope = getattr(modeling, "apply_rotary_pos_emb", None)
    # Another block already inside (another session's request) keeps its own swap.
    swap_rope = original_rope is not None and original_rope is not liger_rope
    targets = _targets(model)
    saved = [(module, dict(module.__dict__)) for _, module in targets]
    try:
        applied = _patch(model, targets)
        if swap_rope:
            modeling.apply_rotary_pos_emb = liger_rope
            applied.append("liger rotary embedding")
        yield applied
    finally:
        if swap_rope:
            modeling.apply_rotary_pos_emb = original_rope
        for module, attributes in saved:
            for key in [k for k in module.__dict__ if k not in attributes]:
                del module.__dict__[key]
            module.__dict__.update(attributes)

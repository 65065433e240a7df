"""Padding-free packing and per-document attention for the CUDA path (engine/cuda/path.py).

A micro-batch's samples are concatenated into one row with no padding. Position ids restart at 0
for each sample and attention is per document: a registered attention function
("tunebench_varlen") calls PyTorch's variable-length flash-attention kernel with the samples'
cumulative lengths, so no token attends across a sample boundary and no time goes to pads.

A forward of one sample (a long sample goes alone) needs no boundaries, and there cuDNN's fused
attention is faster: 1.7x the flash kernel's speed for forward and backward at 8k to 64k tokens
on an H200 (bench/bench_attention.py, bench/RESULTS.md). "tunebench_varlen_cudnn" is the same
function with that kernel for such forwards, where the card and the build run it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..train.types import IGNORE, Batch

ATTENTION_NAME = "tunebench_varlen"
CUDNN_ATTENTION_NAME = "tunebench_varlen_cudnn"


@dataclass
class PackedBatch(Batch):
    """One row holding a micro-batch's samples back to back, with what attention and loss need."""

    position_ids: Any = None
    cu_seqlens: Any = None  # int32 [samples + 1] on the device
    max_len: int = 0
    loss_index: Any = None  # positions that predict a trained token
    loss_targets: Any = None  # the token each of them predicts
    host_ids: Any = None  # input ids on the CPU, for an embedding kept in host memory


def pack(samples: list, device, max_len: int = 0) -> PackedBatch:
    """Concatenate samples into one row; each one's last token predicts nothing (no cross-sample loss).

    `max_len`: the bound attention is given for the longest sample, if larger than this row's."""
    ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    bounds = [0]
    for s in samples:
        n = len(s.input_ids)
        ids.extend(s.input_ids)
        positions.extend(range(n))
        targets.extend(s.labels[1:n])
        targets.append(IGNORE)
        bounds.append(bounds[-1] + n)
    host_ids = torch.tensor(ids, dtype=torch.long)
    target_t = torch.tensor(targets, dtype=torch.long)
    loss_index = (target_t != IGNORE).nonzero().squeeze(-1)
    pin = device.type == "cuda"

    def put(t):
        return (t.pin_memory() if pin else t).to(device, non_blocking=pin)

    return PackedBatch(
        input_ids=put(host_ids).unsqueeze(0),
        labels=None,
        attention_mask=None,
        tokens=len(ids),
        target_tokens=int(loss_index.numel()),
        position_ids=put(torch.tensor(positions, dtype=torch.long)).unsqueeze(0),
        cu_seqlens=put(torch.tensor(bounds, dtype=torch.int32)),
        max_len=max(max_len, *(len(s.input_ids) for s in samples)),
        loss_index=put(loss_index),
        loss_targets=put(target_t[loss_index]),
        host_ids=host_ids,
    )


def repartition(step: list[list[int]], length, max_tokens: int) -> list[list[int]]:
    """A step's samples, in their order, regrouped into forwards of at most `max_tokens` tokens
    (a longer sample goes alone). The loss is summed and normalised by the step's loss tokens, so
    the gradient is the same however a step's samples are grouped."""
    forwards: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in (i for micro in step for i in micro):
        n = length(index)
        if current and used + n > max_tokens:
            forwards.append(current)
            current, used = [], 0
        current.append(index)
        used += n
    if current:
        forwards.append(current)
    return forwards


def forwards_hold_one_sample(step: list[list[int]], lengths: list[int], max_tokens: int) -> bool:
    """Whether no forward of a run with such steps holds two samples: its steps hold one sample,
    or no two of its samples fit in one forward of `max_tokens` (repartition's rule), or, where
    forwards are the micro-batches themselves (`max_tokens` 0), those are of one. `step` is a full
    step's micro-batches (an epoch's last can only be smaller); `lengths`, every sample's."""
    if sum(len(micro) for micro in step) == 1:
        return True
    if not max_tokens:
        return max(len(micro) for micro in step) == 1
    two = heapq.nsmallest(2, lengths)
    return len(two) < 2 or two[0] + two[1] > max_tokens


def flash_varlen(q, k, v, cu, max_len: int, scale):
    """Causal attention over packed documents through PyTorch's variable-length flash kernel.

    q [T, Hq, D], k and v [T, Hkv, D] (the kernel handles grouped KV heads itself). The aten op
    has its own backward; a custom autograd.Function here would keep its saved tensors out of the
    recompute that torch 2.11 compiles into a layer's graph (bench/RESULTS.md)."""
    out, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale
    )
    return out


def cudnn_causal(query, key, value, scale):
    """One document's causal attention through cuDNN's fused kernel: [1, H, T, D] in and out,
    key and value with their own (grouped) heads."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)


_cudnn_checked: dict[tuple, bool] = {}


def cudnn_attention_runs(device, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether cuDNN's fused attention runs on this card with this build (a cuDNN 9 on a recent
    card) for these heads, forward and backward; asked once per device and shape, before any
    compile."""
    key = (torch.device(device).index or 0, heads, kv_heads, head_dim)
    if key not in _cudnn_checked:
        try:
            with torch.enable_grad():
                q = torch.randn(
                    1, heads, 64, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True
                )
                k = torch.randn(1, kv_heads, 64, head_dim, device=device, dtype=torch.bfloat16)
                cudnn_causal(q, k, k, None).sum().backward()
            _cudnn_checked[key] = True
        except (RuntimeError, TypeError):  # no cuDNN attention here: the flash kernel serves
            _cudnn_checked[key] = False
    return _cudnn_checked[key]


def _segment_attention(q, k, v, cu, scale):
    """Reference per-document causal attention (CPU, or dtypes flash does not take): one SDPA per sample."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    v = v.repeat_interleave(groups, dim=1) if groups > 1 else v
    outs = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [H, L, D]
        outs.append(F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs, dim=0)


def _masked_attention(q, k, v, cu, scale):
    """Per-document causal attention as one SDPA with a block-diagonal mask: traceable, O(T^2) memory."""
    t = q.shape[0]
    doc = torch.searchsorted(cu[1:].long(), torch.arange(t, device=q.device), right=True)
    pos = torch.arange(t, device=q.device)
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    v = v.repeat_interleave(groups, dim=1) if groups > 1 else v
    seg = [x.transpose(0, 1) for x in (q, k, v)]  # [H, T, D]
    return F.scaled_dot_product_attention(*seg, attn_mask=mask, scale=scale).transpose(0, 1)


def _fused_kernel_takes(query, max_head_dim: int) -> bool:
    """Whether a fused attention kernel (flash's, cuDNN's) takes these queries: CUDA, half
    precision, heads at most `max_head_dim` wide."""
    return (
        query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= max_head_dim
    )


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: per-document attention when packed, SDPA otherwise."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    max_len = int(kwargs.get("max_length_q") or query.shape[2])
    # [1, H, T, D] -> [T, H, D]; the projections were laid out [T, H*D], so this is usually a view.
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    if _fused_kernel_takes(q, max_head_dim=256):
        out = flash_varlen(q, k, v, cu, max_len, scaling)
    elif torch.compiler.is_compiling():
        out = _masked_attention(q, k, v, cu, scaling)  # the per-sample loop reads cu on the host
    else:
        out = _segment_attention(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def varlen_attention_cudnn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """varlen_attention, with cuDNN's kernel for a forward of one sample. Whether a forward is
    one sample is its shape (cu holds two bounds), so a compiled layer guards on it: a run whose
    forwards are of both kinds compiles the layer once for each."""
    cu = kwargs.get("cu_seq_lens_q")
    if (
        cu is not None
        and kwargs.get("sliding_window") is None
        and cu.shape[0] == 2
        and query.shape[0] == 1
        and _fused_kernel_takes(query, max_head_dim=128)
    ):
        return cudnn_causal(query, key, value, scaling).transpose(1, 2), None
    return varlen_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention)
    AttentionInterface.register(CUDNN_ATTENTION_NAME, varlen_attention_cudnn)


def use_attention(model, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if setter is None:
            raise AttributeError
        setter(name)
    except Exception:  # noqa: BLE001 - older transformers: set it on the config directly
        model.config._attn_implementation = name

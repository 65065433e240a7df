"""The CUDA path's loss: summed cross-entropy over the loss tokens without building the
[tokens x vocabulary] logits (liger-kernel's fused linear + cross-entropy, or a chunked loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.memory_model import GIB
from ..train.types import IGNORE


def chunked_ce_sum(hidden, weight, targets, chunk: int = 0):
    """Summed cross-entropy of `hidden @ weight.T` against targets, one chunk of logits at a time.

    Each chunk's logits are recomputed in backward instead of kept: peak memory is one chunk."""
    from torch.utils.checkpoint import checkpoint

    n = hidden.shape[0]
    chunk = chunk or max(256, int(GIB // (weight.shape[0] * 4)))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk):
        part = checkpoint(
            _ce_chunk,
            hidden[start : start + chunk],
            weight,
            targets[start : start + chunk],
            use_reentrant=False,
        )
        total = total + part
    return total


def _ce_chunk(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")


def in_slices(ce, slice_tokens: int):
    """`ce` (a summed loss) over slices of at most `slice_tokens` tokens, summed: the same loss,
    with the transient logits of one slice at a time however long the forward."""

    def loss(hidden, weight, targets):
        if hidden.shape[0] <= slice_tokens:
            return ce(hidden, weight, targets)
        # split, not slicing: split's backward joins the slices' gradients in one tensor of the
        # hidden states' size, where each slice's backward made one and the sum of them another
        parts = [
            ce(h, weight, t)
            for h, t in zip(hidden.split(slice_tokens), targets.split(slice_tokens), strict=True)
        ]
        return torch.stack(parts).sum()

    return loss


def liger_ce_sum(chunk_budget: int = 1):
    """liger's fused linear + cross-entropy (sum), or None where it is not installed.

    `chunk_budget` bounds each chunk's logits to about budget x tokens x hidden elements; liger's
    default (1) means chunks of ~64 tokens on a 152k vocabulary, each reading the whole head."""
    try:
        from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
    fields = (None, None, IGNORE, 0.0, 0.0, "sum", None, False, None, False, False, False, None, None)

    def loss(hidden, weight, targets):
        try:
            out = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, *fields, chunk_budget)
        except TypeError:  # another liger version: its own default chunking
            return module(weight, hidden, targets)
        return out[0] if isinstance(out, tuple) else out

    return loss

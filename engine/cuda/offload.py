"""What the lean GPU profile keeps in pinned host memory instead of on the card.

- `HostEmbedding`: the input embedding matrix (frozen, only indexed): rows are gathered on the
  CPU and sent over, 1 GiB less on the card for a 150k vocabulary.
- `HostInputs`: the inputs that recomputed decoder layers keep for backward. With every layer
  recomputed, those inputs are all a layer keeps ([tokens x hidden] each, 28 x 14 MB at 2,048
  tokens on a 7B); they go to host memory on a side stream as they are saved and come back one
  layer ahead of the backward that needs them, so lean forwards can be larger in the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class HostEmbedding:
    """The input embedding matrix kept in pinned host memory: rows are gathered on the CPU and sent over."""

    def __init__(self, weight, dtype):
        self.weight = weight.detach().to("cpu", dtype).pin_memory()

    def __call__(self, host_ids, device):
        out = torch.empty((host_ids.numel(), self.weight.shape[1]), dtype=self.weight.dtype, pin_memory=True)
        torch.index_select(self.weight, 0, host_ids, out=out)
        return out.to(device, non_blocking=True).unsqueeze(0)


@dataclass
class _Saved:
    """One offloaded tensor: its host copy, and its way back."""

    index: int
    host: Any = None
    copied: Any = None  # event: the copy to the host is done
    back: Any = None  # the tensor on the device again (prefetched), until handed to backward
    fetched: Any = None  # event: `back` is ready


class HostInputs:
    """saved_tensors_hooks that move the recomputed layers' saved inputs to pinned host memory.

    Only [1, tokens, hidden] tensors of the compute dtype are moved: with the recompute compiled
    into each layer's graph those are the layers' inputs (the RoPE tables, sample bounds and
    weights stay). Backward unpacks them in reverse order; each unpack starts the copy of the one
    before it, so the copy overlaps the layer's backward instead of stalling it.
    """

    def __init__(self, device, hidden: int, dtype):
        self.device, self.hidden, self.dtype = torch.device(device), hidden, dtype
        self.stream = torch.cuda.Stream(self.device)
        self.saved: list[_Saved] = []
        self.tokens = 0

    def around(self, tokens: int):
        """The hooks for one training forward of `tokens` packed tokens."""
        self.tokens, self.saved = tokens, []
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t):
        if not (
            t.is_cuda and t.dtype == self.dtype and t.dim() == 3 and t.shape[1:] == (self.tokens, self.hidden)
        ):
            return t
        s = _Saved(index=len(self.saved))
        s.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            s.host.copy_(t, non_blocking=True)
            s.copied = torch.cuda.Event()
            s.copied.record(self.stream)
        t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        self.saved.append(s)
        return s

    def _fetch(self, s: _Saved) -> None:
        if s.back is not None or s.host is None:
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(s.copied)
            s.back = s.host.to(self.device, non_blocking=True)
            s.fetched = torch.cuda.Event()
            s.fetched.record(self.stream)

    def _unpack(self, s):
        if not isinstance(s, _Saved):
            return s
        self._fetch(s)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(s.fetched)
        t, s.back = s.back, None
        t.record_stream(current)  # allocated on the side stream, used on this one
        if s.index > 0:  # backward goes from the last layer to the first: bring the next one in now
            self._fetch(self.saved[s.index - 1])
        return t

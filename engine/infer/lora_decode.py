"""The mixed-adapter forward used while a batch decodes: grouped LoRA matmuls, fused projections.

PEFT's mixed batch (`adapter_names=`) slices the batch per adapter in every LoRA layer: an index,
two small matmuls and an index_put per adapter per layer. On a 2-core CPU that costs more than the
base model's own matmuls; on a GPU each of those small ops is a kernel launch, and a 7B model's
decode step is bound by launching them (bench/RESULTS_generate.md). FusedLora instead:

- stacks every used adapter's A matrices (scaling included) along the rank, and keeps each row to
  its own adapter's block with a 0/1 row mask (on the CPU, folded into per-row copies of the
  stacked A: see GPU_LOW_RANK_PASS), so one low-rank pass serves the whole batch whatever the
  number of adapters; rows with no adapter get an exact 0;
- on CUDA, where the batch's layout is fixed when the forward is built and one run of rows holds
  every adapted row (the chat's base | adapter columns), runs the low-rank pass on that run's rows
  alone: no mask, one kernel fewer per projection group (ROW_SLICE_DEVICES);
- computes that pass once for sibling projections that read the same input (q/k/v, gate/up): their
  A matrices are stacked too, so a decoder block has four low-rank passes instead of seven;
- runs that pass in the base dtype on a GPU (bf16: no casts) and adds each projection's B product
  into the base output in place with one addmm_; on a CPU it keeps PEFT's float32 adapter weights;
- on CUDA, where the base weights of such siblings lie next to each other in memory
  (fuse_sibling_weights), runs one base matmul for the group and hands each sibling a slice of it;
- where A_IN_BASE_DEVICES says so, writes the stacked A matrices into spare rows laid out after
  the base weights, so that the base matmul yields the low-rank products too: no low-rank pass
  of its own (o_proj and down_proj are then laid out as groups of one).

Layers or adapters it does not cover (DoRA, LoRA bias, embeddings, modules_to_save, quantised
base layers, ...) make build() return None, and PEFT's own mixed-batch forward is used instead.
This module imports torch only inside its functions, like the rest of the engine's import surface.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import MethodType
from typing import Any, NamedTuple

PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
# Sibling projections that receive the very same input tensor in the decoder blocks of the common
# architectures (Llama, Qwen2/3, Mistral, Gemma). A group only shares its work when the call sees
# the identical tensor object, so a model that feeds them different inputs still gets right answers.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Architectures whose blocks only view() each projection's output per head or multiply it
# elementwise, so a strided slice of a fused output can stand in for a separate output.
FUSED_BASE_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral", "gemma"})
# Per-row copies of the stacked A matrices (one matmul instead of matmul + mask) are made while
# they take at most this much memory; for many rows times many adapters the mask is used instead.
ROW_COPY_BUDGET_BYTES = 256 * 2**20
# How the low-rank pass x @ A_allᵀ (each row keeping only its own adapter's block) runs:
# "mask": x @ A_allᵀ, then times the 0/1 row mask (two kernels);
# "bmm_xa": x @ row_aᵀ, one batched matmul over per-row copies of A_all with the mask folded in;
# "bmm_ax": (row_a @ xᵀ)ᵀ, the same product the other way round; "mulsum": (x * row_a).sum(-1).
# On the H100 (bench/RESULTS_generate.md, "LoRA A pass") cuBLAS runs the two-row batched matmuls
# on one tile per row: 6.6 us at 3584 inputs but 25 us at down_proj's 18944, where the mask way
# takes 7 us; on the CPU the folded batched matmul is one op instead of two.
GPU_LOW_RANK_PASS = "mask"
CPU_LOW_RANK_PASS = "bmm_xa"
# Devices that take the row-slice pass where a layout fixed at build has every adapted row in one
# run of one adapter (the chat's base | adapter): x[run] @ A_runᵀ added into out[run], two kernels
# where the mask way takes three. Not the CPU: its way (CPU_LOW_RANK_PASS) is one batched product
# per row already, which also keeps each row's answer independent of the batch.
ROW_SLICE_DEVICES = frozenset({"cuda"})
# Devices where the base matmul computes the low-rank products as well: x @ [W; A_all]ᵀ, with
# A_all in A_IN_BASE_ROWS spare rows after the base weights (fuse_sibling_weights). In the H200's
# 7B decode the separate passes (four a layer, split-K, with their reductions) took about 0.8 ms
# of a 6.4 ms step, each a kernel of a few microseconds for a few kilobytes; folded in, two
# columns decode 9% faster on an H100 (bench/RESULTS_generate.md, `--variants all no-a-in-base`).
A_IN_BASE_DEVICES: frozenset[str] = frozenset({"cuda"})
# Spare rows per projection group for that: one rank-8 adapter on q/k/v takes 24. Adapters
# stacking more rank than this take the separate pass. On a 7B they take about 4 MB a layer; the
# base matmul reads only the rows in use.
A_IN_BASE_ROWS = 64
# Projections with an input of their own, laid out with spare rows only for A_IN_BASE_DEVICES.
SINGLE_GROUPS = (("o_proj",), ("down_proj",))
# The attribute by which fuse_sibling_weights marks a group's first linear with its spare rows.
SPARE_ROWS_MARK = "_tunebench_spare_rows"
# ... and the one by which that linear says which FusedLora's A its spare rows hold.
A_OWNER_MARK = "_tunebench_a_owner"


def _plain_linear(module: Any) -> Any:
    """The nn.Linear computing this module's base output, or None when it is something else."""
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(module) is torch.nn.Linear:
        return module
    if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
        return module.base_layer
    return None


def fuse_sibling_weights(model: Any) -> int:
    """Lay the base weights of each q/k/v and gate/up group out as one buffer, each projection's
    weight a view of it, so one matmul can compute the group (see _Group). On A_IN_BASE_DEVICES
    the buffer has A_IN_BASE_ROWS spare rows after the weights, and o_proj and down_proj are laid
    out too, as groups of one. The old storage is freed: no copy of the weights is kept. Only for
    FUSED_BASE_MODEL_TYPES; returns the number of groups laid out. Run it before inference_mode
    (parameters must stay normal tensors)."""
    import torch

    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FUSED_BASE_MODEL_TYPES:
        return 0
    weight = next((p for p in model.parameters() if p.dim() == 2), None)
    spare = A_IN_BASE_ROWS if weight is not None and weight.device.type in A_IN_BASE_DEVICES else 0
    count = 0
    with torch.no_grad():
        for parent in model.modules():
            children = dict(parent.named_children())
            for names in SHARED_INPUT_GROUPS + (SINGLE_GROUPS if spare else ()):
                linears = [_plain_linear(children.get(n)) for n in names]
                if any(lin is None for lin in linears):
                    continue
                if _adjacent_weight(linears) is not None and _spare_rows(linears) >= spare:
                    continue
                weights = [lin.weight for lin in linears]
                first = weights[0]
                if any(
                    w.dtype != first.dtype or w.device != first.device or w.shape[1] != first.shape[1]
                    for w in weights
                ):
                    continue
                # one group's weights extra, briefly; the spare rows zero until A goes there
                fused = torch.cat([w.data for w in weights] + [first.new_zeros(spare, first.shape[1])], dim=0)
                offset = 0
                for w in weights:
                    w.data = fused[offset : offset + w.shape[0]]
                    offset += w.shape[0]
                setattr(linears[0], SPARE_ROWS_MARK, spare)
                count += 1
    return count


def _adjacent_weight(linears: list[Any]) -> Any:
    """One (sum of out_features, in_features) view over the linears' weights if they lie back to
    back in one buffer (fuse_sibling_weights), else None."""
    weights = [lin.weight for lin in linears]
    first = weights[0]
    if not all(
        w.is_contiguous() and w.dtype == first.dtype and w.shape[1] == first.shape[1] for w in weights
    ):
        return None
    storage = first.untyped_storage()
    pointer = first.data_ptr()
    for w in weights:
        if w.untyped_storage().data_ptr() != storage.data_ptr() or w.data_ptr() != pointer:
            return None
        pointer += w.numel() * w.element_size()
    rows = sum(w.shape[0] for w in weights)
    return first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1))


def _spare_rows(linears: list[Any]) -> int:
    """The spare rows fuse_sibling_weights laid out after these linears' weights (0: none). Read
    from its own mark, never from what follows in memory: a loader may put other weights there."""
    first = linears[0]
    spare = getattr(first, SPARE_ROWS_MARK, 0)
    view = _adjacent_weight(linears)
    if not spare or view is None:
        return 0
    end = view.data_ptr() + (view.shape[0] + spare) * view.shape[1] * view.element_size()
    storage = view.untyped_storage()
    return spare if end <= storage.data_ptr() + storage.nbytes() else 0


def _with_rows(weight: Any, extra: int) -> Any:
    """The (rows + extra, in) view of the buffer that this (rows, in) view starts."""
    return weight.as_strided((weight.shape[0] + extra, weight.shape[1]), (weight.shape[1], 1))


class _RowRun(NamedTuple):
    """The row-slice pass of one group: rows start..stop-1 run one adapter, the others none."""

    start: int
    stop: int
    lora_a: Any  # (the adapter's rank over the members, in): its blocks of the group's lora_a
    parts: list[tuple[int, int, Any]]  # per output, as _Group._lora_parts, for the run's blocks


class _Group:
    """Projections that read one input: their base outputs and LoRA deltas, computed together.

    Each member's forward asks the group for its output. The first member called with a new input
    computes every member's output; the others take theirs from that result while the input is the
    same tensor object. Once every member has taken its output the group lets go of them, so no
    activation outlives the forward pass.
    """

    def __init__(self, members: list[Any], bases: list[Any], outs: list[int]) -> None:
        self.members = members
        # Each member's base output: a LoRA layer's base_layer, or a plain nn.Linear's own forward
        # (the member's forward is the group's while installed: calling the module would recurse).
        self.bases = bases
        self.outs = outs  # each member's out_features ([] when some base is not a plain linear)
        self.base_weight: Any = None  # fused (sum out, in) view, when the base matmul is fused
        self.base_bias: Any = None
        self.compute_dtype: Any = None
        self.lora_a: Any = None  # (sum rank, in): every member's adapters, scaling included, stacked
        self.row_keep: Any = None  # (rows, 1, sum rank): 1 on the block of the row's own adapter, else 0
        self.row_a: Any = None  # (rows, sum rank, in): lora_a * row_keep, when affordable
        self.block_adapter: Any = None  # (sum rank,): which used adapter each column of lora_a is
        self._keep_store: Any = None  # row_keep and row_a are views of these: set_rows writes in place
        self._row_a_store: Any = None
        self.blocks: list[
            tuple[int, int, Any]
        ] = []  # per member: (offset, rank, B (out, rank)); rank 0: none
        self.block_b: Any = None  # (sum out, sum rank) block-diagonal B, with the fused base matmul
        # A in the base matmul (A_IN_BASE_DEVICES): base_weight's buffer with lora_a in the spare
        # rows after it, the bias with zeros for them, those rows, and the linear whose mark says
        # which FusedLora's A they hold (several may be built for one model: see FusedLora.claim)
        self.base_with_a: Any = None
        self.bias_with_a: Any = None
        self.a_slot: Any = None
        self.a_home: Any = None
        self.runs_rows = False  # the layout takes the row-slice pass (set_rows)
        self.row_run: _RowRun | None = None  # its weights here; None where this group adds nothing
        self._input: Any = None
        self._outputs: list[Any] | None = None
        self._taken: set[int] = set()

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None

    def output(self, index: int, x: Any) -> Any:
        if self._input is not x or index in self._taken or self._outputs is None:
            self._outputs = self._compute(x)
            self._input = x
            self._taken = set()
        self._taken.add(index)
        out = self._outputs[index]
        if len(self._taken) == len(self.members):
            self.release()
        return out

    def release(self) -> None:
        self._input, self._outputs, self._taken = None, None, set()

    def set_rows(self, row_adapter: Any, row_copies: bool, run: tuple[int, int, int] | None = None) -> None:
        """Keep each row to its own adapter's block (row_adapter[i]: index into the used adapters,
        -1 for none). Written into the same storage while the rows fit, so a CUDA graph captured
        over row_keep / row_a follows a new layout without being captured again. run: (start,
        stop, adapter index) where rows start..stop-1 are the only adapted ones and the layout
        stays (see ROW_SLICE_DEVICES); a graph captured over that pass bakes the run in."""
        import torch

        self.row_run = None if run is None else self._run_pieces(*run)
        self.runs_rows = run is not None  # the layout's run, even where this group adds nothing to it
        rows = row_adapter.shape[0]
        if self._keep_store is None or self._keep_store.shape[0] < rows:
            self._keep_store = self.lora_a.new_zeros((rows, 1, self.lora_a.shape[0]))
        self._keep_store[:rows, 0].copy_(row_adapter[:, None] == self.block_adapter[None, :])
        self.row_keep = self._keep_store[:rows]
        if not row_copies:
            self._row_a_store, self.row_a = None, None
            return
        if self._row_a_store is None or self._row_a_store.shape[0] < rows:
            self._row_a_store = self.lora_a.new_empty((rows, *self.lora_a.shape))
        self.row_a = torch.mul(
            self.row_keep[:, 0, :, None], self.lora_a[None], out=self._row_a_store[:rows]
        )  # (rows, rank, in)

    def _run_pieces(self, start: int, stop: int, adapter: int) -> _RowRun | None:
        """The row-slice pass for rows start..stop-1, all running adapter `adapter`: its A rows
        of lora_a and the matching B columns (the group's own tensors where the adapter is all
        that is stacked, the usual chat, so no copy of the weights is kept); None where the
        adapter has no LoRA on these projections."""
        columns = (self.block_adapter == adapter).nonzero().flatten()
        if not len(columns):
            return None
        if len(columns) == self.lora_a.shape[0]:
            return _RowRun(start, stop, self.lora_a, self._lora_parts())
        run_a = self.lora_a.index_select(0, columns)
        if self.block_b is not None:
            return _RowRun(
                start, stop, run_a, [(0, len(columns), self.block_b.index_select(1, columns).contiguous())]
            )
        parts, offset = [], 0
        for member_offset, rank, b in self.blocks:
            mine = columns[(columns >= member_offset) & (columns < member_offset + rank)]
            if rank and len(mine):
                parts.append((offset, len(mine), b.index_select(1, mine - member_offset).contiguous()))
                offset += len(mine)
            else:
                parts.append((offset, 0, None))
        return _RowRun(start, stop, run_a, parts)

    def _compute(self, x: Any) -> list[Any]:
        """Every member's output: the base output (one matmul where the base is fused), with the
        LoRA products added in place into the rows they belong to."""
        import torch.nn.functional as F

        fused = self.base_weight is not None
        in_base = None
        if self.base_with_a is not None:
            full = F.linear(x, self.base_with_a, self.bias_with_a)
            width = self.base_weight.shape[0]
            outputs, in_base = [full[..., :width]], full[..., width:]
        elif fused:
            outputs = [F.linear(x, self.base_weight, self.base_bias)]
        else:
            outputs = [base(x) for base in self.bases]
        lora = self._lora(x, in_base)
        if lora is not None:
            rows, low, parts = lora
            for out, (offset, rank, b) in zip(outputs, parts, strict=True):
                if rank:
                    _add_low_rank(out[rows], low[..., offset : offset + rank], b)
        return _split_last(outputs[0], self.outs) if fused else outputs

    def _lora_parts(self) -> list[tuple[int, int, Any]]:
        """Per output of _compute: (offset in the low-rank products, rank, B); rank 0: none."""
        if self.base_weight is not None:
            return [(0, self.lora_a.shape[0], self.block_b)]
        return self.blocks

    def _lora(self, x: Any, in_base: Any = None) -> tuple[slice, Any, list[tuple[int, int, Any]]] | None:
        """The LoRA terms of this input: the rows they go to, those rows' low-rank products and
        the parts (_lora_parts) to multiply them by; None where there are none. The row-slice
        pass takes its run's rows only; the mask way every row, each kept to its own adapter.
        in_base: x @ lora_aᵀ as the base matmul computed it (A in the base), else None."""
        import torch.nn.functional as F

        if self.runs_rows and x.dim() == 3:
            run = self.row_run
            if run is None:
                return None
            if in_base is not None and run.lora_a is self.lora_a:
                return slice(run.start, run.stop), in_base[run.start : run.stop], run.parts
            rows = x[run.start : run.stop]
            low = F.linear(
                rows if rows.dtype == self.compute_dtype else rows.to(self.compute_dtype), run.lora_a
            )
            return slice(run.start, run.stop), low, run.parts
        if not self.has_lora:
            return None
        if in_base is not None:
            keep = self.row_keep if in_base.dim() == 3 else self.row_keep[:, 0]
            return slice(None), in_base * keep, self._lora_parts()
        return slice(None), self._low_rank(x), self._lora_parts()

    def _low_rank(self, x: Any) -> Any:
        """x @ A_allᵀ with each row's scaling on its own adapter's block and 0 elsewhere."""
        import torch
        import torch.nn.functional as F

        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        how = _low_rank_pass(x.device)
        if how != "mask" and self.row_a is not None and x.dim() == 3 and x.shape[0] == self.row_a.shape[0]:
            if how == "bmm_ax":
                return torch.bmm(self.row_a, x.transpose(1, 2)).transpose(1, 2)
            if how == "mulsum" and x.shape[1] == 1:
                return (x[:, :, None, :] * self.row_a[:, None]).sum(-1)
            return torch.bmm(x, self.row_a.transpose(1, 2))
        low = F.linear(x, self.lora_a)
        return low * (self.row_keep if low.dim() == 3 else self.row_keep[:, 0])


def _low_rank_pass(device: Any) -> str:
    return GPU_LOW_RANK_PASS if device.type == "cuda" else CPU_LOW_RANK_PASS


def _add_low_rank(out: Any, low: Any, b: Any) -> Any:
    """out += low @ bᵀ, in place (out: a fresh layer output, or some rows of one): one addmm_
    when the dtypes match (a GPU in bf16); else the product in the adapter's dtype, rounded to
    the base dtype and added (float32 LoRA on a bf16 CPU model: an add across dtypes takes a slow
    path there). Returns out."""
    import torch.nn.functional as F

    if out.dtype == low.dtype and out.stride(-1) == 1:
        try:  # rows of a wider output (A in the base) are a view too: (rows, width), row stride >= width
            flat = out.view(-1, out.shape[-1])
        except RuntimeError:
            flat = None
        if flat is not None:
            flat.addmm_(low.reshape(-1, low.shape[-1]), b.t())
            return out
    return out.add_(F.linear(low, b).to(out.dtype))


def _joined_bias(linears: list[Any], weight: Any) -> Any:
    """The bias of a fused base matmul over these linears (zeros for those without one), or None
    where none has a bias."""
    import torch

    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat(
        [
            b.detach() if b is not None else weight.new_zeros(lin.out_features)
            for b, lin in zip(biases, linears, strict=True)
        ]
    )


def _split_last(full: Any, sizes: list[int]) -> list[Any]:
    """Each member's output: consecutive slices of the fused output's last dimension."""
    outputs, offset = [], 0
    for size in sizes:
        outputs.append(full[..., offset : offset + size])
        offset += size
    return outputs


def _single_forward(group: _Group) -> Callable[..., Any]:
    """The forward of a projection that shares its input with no other (o_proj, down_proj): base
    output plus x @ A_allᵀ * row mask @ Bᵀ, with as little Python per call as the old per-layer
    forward had (on a 2-core CPU, microseconds per call add up over 200 layers)."""
    import torch.nn.functional as F

    base = group.bases[0]
    if not group.has_lora:
        return lambda x, *args, **kwargs: base(x)
    lora_a, keep, dtype = group.lora_a, group.row_keep, group.compute_dtype
    b = group.blocks[0][2]

    def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
        if group.runs_rows and x.dim() == 3:  # read per call: set_rows may have moved the rows
            return group._compute(x)[0]
        out = base(x)
        low = F.linear(x if x.dtype == dtype else x.to(dtype), lora_a)
        return _add_low_rank(out, low * (keep if low.dim() == 3 else keep[:, 0]), b)

    return forward


class FusedLora:
    """The fused forward for one batch layout (which adapter each row uses); see the module doc."""

    def __init__(self, groups: list[_Group], used: list[str], fixed_layout: bool = False) -> None:
        self.groups = groups
        self.used = used  # the adapters whose weights are stacked, in stacking order
        self.names: tuple[str, ...] = ()  # the rows' adapters as set last
        # Built for one layout (no `adapters=`): graphs over it are captured per layout, so the
        # row-slice pass may bake the layout in.
        self.fixed_layout = fixed_layout
        self._owner = object()  # what the spare rows' holders say when they hold this forward's A

    @classmethod
    def build(
        cls, model: Any, names: list[str], *, fuse_base: bool = False, adapters: list[str] | None = None
    ) -> FusedLora | None:
        """The fused forward of `model` (a PeftModel, or a plain model for base-only batches) for
        rows running adapters `names` (PEFT_BASE: none); None where PEFT's forward must be used.
        fuse_base: use one base matmul for siblings whose weights fuse_sibling_weights laid out.
        adapters: the adapters to stack (default: those in names), so that set_rows can later give
        the rows any of them."""
        import torch
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import Linear as LoraLinear

        used = list(adapters) if adapters is not None else [n for n in dict.fromkeys(names) if n != PEFT_BASE]
        peft_config = getattr(model, "peft_config", {}) or {}
        for name in used:
            config = peft_config.get(name)
            if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
                return None
        lora_modules = []
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            if type(module) is not LoraLinear or getattr(module, "fan_in_fan_out", False) or module.merged:
                return None
            for name in used:
                if name in module.lora_A and (
                    name in module.lora_variant or module.lora_bias.get(name, False)
                ):
                    return None
            lora_modules.append(module)

        # Groups of siblings that share an input, then every other LoRA layer on its own.
        grouped: list[list[Any]] = []
        seen: set[int] = set()
        for parent in model.modules():
            children = dict(parent.named_children())
            for group_names in SHARED_INPUT_GROUPS:
                members = [children.get(n) for n in group_names]
                if any(m is None for m in members) or any(_plain_linear(m) is None for m in members):
                    continue
                if any(id(m) in seen for m in members):
                    continue
                if not any(isinstance(m, LoraLinear) for m in members) and not fuse_base:
                    continue
                grouped.append(members)
                seen.update(id(m) for m in members)
        for module in lora_modules:
            if id(module) not in seen:
                grouped.append([module])
                seen.add(id(module))

        groups: list[_Group] = []
        for members in grouped:
            bases = [
                m.base_layer if isinstance(m, LoraLinear) else MethodType(type(m).forward, m) for m in members
            ]
            linears = [_plain_linear(m) for m in members]
            outs = [lin.out_features for lin in linears] if None not in linears else []
            group = _Group(members, bases, outs)
            if fuse_base and len(members) > 1 and group.outs:
                group.base_weight = _adjacent_weight(linears)
            # LoRA blocks: per member, every used adapter it has, in a fixed order.
            a_blocks: list[tuple[Any, str]] = []
            b_parts: list[list[Any]] = []
            for member in members:
                parts: list[Any] = []
                if isinstance(member, LoraLinear):
                    for name in used:
                        if name in member.lora_A:
                            a_blocks.append((member.lora_A[name].weight * member.scaling[name], name))
                            parts.append(member.lora_B[name].weight)
                b_parts.append(parts)
            if (
                not a_blocks
                and group.base_weight is None
                and not any(isinstance(m, LoraLinear) for m in members)
            ):
                continue  # plain layers with nothing to share: left as they are
            if a_blocks:
                weight = next(m for m in members if isinstance(m, LoraLinear)).base_layer.weight
                lora_dtype = a_blocks[0][0].dtype
                on_gpu = weight.device.type == "cuda"
                # On a GPU the low-rank pass runs in the base dtype: no casts, and the B product can
                # be added in place with one addmm_. On a CPU, tiny bf16 matmuls are several times
                # slower than float32 ones, so PEFT's float32 adapter weights are kept.
                group.compute_dtype = (
                    weight.dtype if on_gpu and weight.dtype in (torch.bfloat16, torch.float16) else lora_dtype
                )
                offset = 0
                for parts in b_parts:
                    rank = sum(b.shape[1] for b in parts)
                    b = torch.cat(parts, dim=1).to(group.compute_dtype) if parts else None
                    group.blocks.append((offset, rank, b))
                    offset += rank
                group.lora_a = torch.cat([a for a, _ in a_blocks], dim=0).to(group.compute_dtype)
                total_rank = group.lora_a.shape[0]
                # Scaling is already in the A blocks; the row mask (set_rows) only keeps a row's own adapter.
                group.block_adapter = torch.cat(
                    [
                        torch.full((a.shape[0],), used.index(name), device=weight.device)
                        for a, name in a_blocks
                    ]
                )
                a_in_base = (
                    fuse_base
                    and bool(group.outs)
                    and weight.device.type in A_IN_BASE_DEVICES
                    and group.compute_dtype == weight.dtype
                    and _spare_rows(linears) >= total_rank
                )
                if a_in_base:
                    group.base_weight = _adjacent_weight(linears)  # a group of one too
                    group.a_home = linears[0]
                if group.base_weight is not None:
                    block_b = group.lora_a.new_zeros((sum(group.outs), total_rank))
                    out_offset = 0
                    for (offset, rank, b), size in zip(group.blocks, group.outs, strict=True):
                        if rank:
                            block_b[out_offset : out_offset + size, offset : offset + rank] = b
                        out_offset += size
                    group.block_b = block_b
            if group.base_weight is not None:
                group.base_bias = _joined_bias(linears, group.base_weight)
            if group.a_home is not None:
                rank = group.lora_a.shape[0]
                group.base_with_a = _with_rows(group.base_weight, rank)
                group.a_slot = group.base_with_a[group.base_weight.shape[0] :]
                if group.base_bias is not None:
                    group.bias_with_a = torch.cat([group.base_bias, group.base_bias.new_zeros(rank)])
            groups.append(group)
        fused = cls(groups, used, fixed_layout=adapters is None)
        fused.set_rows(names)
        return fused

    def set_rows(self, names: list[str] | tuple[str, ...]) -> None:
        """Give row i the adapter names[i] (PEFT_BASE: none), one of those stacked at build time.
        The row masks are rewritten in place (no capture needed again) while the rows fit; a
        fixed layout's row-slice pass is baked into what was captured over it."""
        import torch

        names = tuple(names)
        self.claim()
        if names == self.names:
            return
        with_lora = [g for g in self.groups if g.has_lora]
        if with_lora:
            unknown = set(names) - set(self.used) - {PEFT_BASE}
            if unknown:
                raise ValueError(f"adapters {sorted(unknown)} were not stacked when this forward was built")
            device = with_lora[0].lora_a.device
            row_adapter = torch.tensor(
                [self.used.index(n) if n != PEFT_BASE else -1 for n in names], device=device
            )  # one host-to-device copy for every layer
            # Per-row copies of A_all with the row mask folded in, for the passes that use them (groups
            # of one always take the mask way: see _single_forward).
            shared = [g for g in with_lora if len(g.members) > 1]
            row_copy_bytes = sum(len(names) * g.lora_a.numel() * g.lora_a.element_size() for g in shared)
            row_copies = _low_rank_pass(device) != "mask" and row_copy_bytes <= ROW_COPY_BUDGET_BYTES
            run = self._adapted_run(names) if device.type in ROW_SLICE_DEVICES else None
            for group in with_lora:
                group.set_rows(row_adapter, row_copies and len(group.members) > 1, run)
        self.names = names

    def claim(self) -> None:
        """Write this forward's A matrices into the spare rows that hold A in the base matmul,
        where another FusedLora built for the same model (other adapters) wrote its own since:
        a forward, or a graph captured over it, reads them there."""
        for group in self.groups:
            home = group.a_home
            if home is not None and getattr(home, A_OWNER_MARK, None) is not self._owner:
                group.a_slot.copy_(group.lora_a)
                setattr(home, A_OWNER_MARK, self._owner)

    def _adapted_run(self, names: tuple[str, ...]) -> tuple[int, int, int] | None:
        """(start, stop, adapter index) when the layout is fixed and rows start..stop-1 are every
        adapted row, all with one adapter; else None (the mask way)."""
        adapted = [i for i, n in enumerate(names) if n != PEFT_BASE]
        if not self.fixed_layout or not adapted:
            return None
        start, stop = adapted[0], adapted[-1] + 1
        if len(adapted) != stop - start or len({names[i] for i in adapted}) != 1:
            return None
        return start, stop, self.used.index(names[start])

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Swap each member's forward for the group's; always restored, even on error."""

        def member_forward(group: _Group, index: int) -> Callable[..., Any]:
            if len(group.members) == 1 and group.base_weight is None:
                return _single_forward(group)

            def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
                return group.output(index, x)

            return forward

        self.claim()
        try:
            for group in self.groups:
                for index, module in enumerate(group.members):
                    module.forward = member_forward(group, index)
            yield
        finally:
            for group in self.groups:
                group.release()
                for module in group.members:
                    module.__dict__.pop("forward", None)

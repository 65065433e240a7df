"""Training plans by memory budget: the one planner the GPU path and the TUI's estimate share.

A plan is what the CUDA path (engine/cuda/path.py) does with a step's memory: how many decoder
layers recompute in backward, which inputs go to host memory (the input embedding matrix, the
recomputed layers' inputs: engine/cuda/offload.py) and how many tokens one forward packs. The
memory model (engine/core/memory_model.py) gives each candidate's predicted peak; a small speed
model ranks them; `choose_plan` takes the fastest whose peak fits the budget. Both ends are the
profiles: `fast` recomputes nothing, keeps everything on the card and packs the largest forwards;
`lean` recomputes every layer, moves what it can to host memory and packs about 1 GiB of
activations per forward. Torch-free, so the TUI's estimate and the engine pick the same plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from . import memory_model as gm
from .errors import UserError

GIB = gm.GIB

# The fast path's techniques (engine/cuda/path.py says what each does); TUNEBENCH_ACCEL adjusts
# the set for measuring. Here because the plan depends on them and the estimate must see the same.
DEFAULT_TECHNIQUES = frozenset(
    {
        "pack",
        "merge",
        "flce",
        "lora",
        "offload",
        "compile",
        "ingraph",
        "hostinputs",
        "nf4",
        "mlpchunk",
        "cudnn",
    }
)

# The speed model, in units of one decoder layer's forward per token (forward + backward: 3).
# Fitted to the H200's 7B rows (bench/RESULTS.md, "recompute compiled into each layer's graph"):
# lean LoRA at 2,048 and 4,096 tokens per forward (10,531 and 12,301 tokens/s) and fast LoRA at
# 8,192 (16,898); lean QLoRA at 2,048 and 4,096 (8,125 and 11,357: each forward dequantises every
# 4-bit weight).
RECOMPUTE_COST = 0.88  # a recomputed layer replays its forward (fused into its backward)
FORWARD_OVERHEAD_TOKENS = 1070  # per forward, as tokens of the whole model's work: loss, launches
QUANTIZED_FORWARD_OVERHEAD_TOKENS = 3500  # the same with 4-bit weights dequantised per forward
# Moving inputs to host memory overlaps with compute; a small cost makes the card win a tie.
EMBEDDING_ON_HOST_COST = 0.005
INPUTS_ON_HOST_COST = 0.01
# Without --max_memory the budget is what the card has for this process, less a margin for the
# allocator's cache and transients the model does not count.
CARD_MARGIN = 0.05
# The CUDA context and cuBLAS workspaces: on the card, outside what the allocator counts.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
# With --max_memory, the allocator is capped this much above the budget (the memory model's
# stated accuracy): a misprediction beyond it fails as an out-of-memory error, not by taking a
# shared card's memory from others.
PREDICTION_TOLERANCE = 0.10


def techniques(spec: str | None = None) -> set[str]:
    """The techniques in use: the defaults, adjusted by `+name` / `-name` items (from TUNEBENCH_ACCEL)."""
    spec = os.environ.get("TUNEBENCH_ACCEL", "") if spec is None else spec
    use = set(DEFAULT_TECHNIQUES)
    for item in (t.strip() for t in spec.split(",")):
        if item.startswith("-"):
            use.discard(item[1:])
        elif item:
            use.add(item.lstrip("+"))
    return use


def techniques_for(cfg: Any, spec: str | None = None) -> set[str]:
    """The techniques a config can use: DoRA's magnitude-normalised update is not in the fast LoRA
    kernels (its layers run PEFT's forward), and an attention kernel the user names replaces
    packing's per-document attention."""
    use = techniques(spec)
    if cfg.use_dora:
        use.discard("lora")
    if cfg.attn_impl != "auto":
        use.discard("pack")
    return use


@dataclass(frozen=True)
class PathFacts:
    """What the path can do with this config and model: the memory model's switches, and which
    of a plan's choices are open."""

    quantized: bool
    lora_rank: int
    target_modules: tuple[str, ...]
    dora: bool
    layers: int
    compiled: bool = True
    in_graph: bool = True
    recompute: bool = True  # gradient_checkpointing: without it no layer recomputes
    embedding_can_move: bool = True  # untied, packed forwards, and the `offload` technique on
    inputs_can_move: bool = True  # packed, recompute compiled into the graph, CUDA, `hostinputs` on
    merge: bool = True  # a step's samples are regrouped into forwards (`pack` and `merge` on)


def path_facts(cfg: Any, model_config: Any, use: set[str], cuda: bool = True) -> PathFacts:
    """The facts for `cfg` on `model_config` with the techniques `use` (techniques_for's)."""
    sizes = gm.model_sizes(model_config)
    compiled = "compile" in use
    in_graph = compiled and "ingraph" in use
    recompute = bool(cfg.gradient_checkpointing)
    # only packed forwards feed the embedding's rows from the host and save [1, tokens, hidden]
    # layer inputs where the offload hooks look for them
    packed = "pack" in use
    return PathFacts(
        quantized=bool(cfg.is_qlora),
        lora_rank=cfg.lora_rank,
        target_modules=tuple(cfg.target_modules),
        dora=bool(cfg.use_dora),
        layers=sizes["layers"],
        compiled=compiled,
        in_graph=in_graph,
        recompute=recompute,
        embedding_can_move="offload" in use and packed and not sizes["tied"],
        inputs_can_move="hostinputs" in use and packed and in_graph and recompute and cuda,
        merge="pack" in use and "merge" in use and cuda,
    )


@dataclass(frozen=True)
class Workload:
    """The forwards a run can make: its longest sample (tokens; max_length when not known) and how
    many samples a micro-batch and a step hold."""

    longest: int
    batch: int
    accumulation: int

    @classmethod
    def of(cls, cfg: Any, longest: int | None = None) -> Workload:
        return cls(
            longest=min(longest, cfg.max_length) if longest else cfg.max_length,
            batch=cfg.per_device_train_batch_size,
            accumulation=cfg.gradient_accumulation_steps,
        )


@dataclass(frozen=True)
class Plan:
    """One way to run a training step, with its predicted peak (allocated bytes) and cost."""

    recomputed_layers: int
    layers: int
    embedding_on_host: bool
    inputs_on_host: bool
    tokens: int  # the largest forward, packed
    peak: int
    cost: float  # relative time per token (the speed model above)
    parts: dict[str, int] = field(default_factory=dict, compare=False, hash=False)

    def where(self) -> str:
        moved = (["embedding"] if self.embedding_on_host else []) + (
            ["layer inputs"] if self.inputs_on_host else []
        )
        return " and ".join(moved) + " in host memory" if moved else "inputs on the GPU"

    def line(self, budget: int | None = None) -> str:
        """plan: 14 of 28 layers recompute, inputs on the GPU, 8,192 tokens per forward:
        predicted peak 21.3 GiB of 22.0"""
        of = f" of {budget / GIB:.1f}" if budget else ""
        return (
            f"plan: {self.recomputed_layers} of {self.layers} layers recompute, {self.where()}, "
            f"{self.tokens:,} tokens per forward: predicted peak {self.peak / GIB:.1f} GiB{of}"
        )


def forward_sizes(work: Workload, facts: PathFacts) -> list[int]:
    """The forward sizes a plan may take: whole samples (a sample is never split), up to the step
    or FAST_MAX_TOKENS; without merging, the configured micro-batch."""
    if not facts.merge:
        return [work.batch * work.longest]
    top = max(work.longest, min(work.batch * work.accumulation * work.longest, gm.FAST_MAX_TOKENS))
    sizes = {top} | {k * work.longest for k in range(1, top // work.longest + 1)}
    return sorted(sizes)


def make_plan(
    model_config: Any, facts: PathFacts, *, recomputed: int, embedding: bool, inputs: bool, tokens: int
) -> Plan:
    """A plan and its predicted peak (the memory model) and cost (the speed model)."""
    parts = gm.estimate_peak_bytes(
        model_config,
        tokens=tokens,
        lora_rank=facts.lora_rank,
        quantized=facts.quantized,
        recomputed_layers=recomputed,
        embedding_on_host=embedding,
        target_modules=facts.target_modules,
        compiled=facts.compiled,
        inputs_on_host=inputs,
        in_graph=facts.in_graph,
        dora=facts.dora,
    )
    layers = facts.layers
    overhead = QUANTIZED_FORWARD_OVERHEAD_TOKENS if facts.quantized else FORWARD_OVERHEAD_TOKENS
    cost = 3 * layers * (1 + overhead / tokens) + RECOMPUTE_COST * recomputed
    cost *= 1 + EMBEDDING_ON_HOST_COST * embedding + INPUTS_ON_HOST_COST * inputs
    return Plan(recomputed, layers, embedding, inputs, tokens, parts["total"], cost, parts)


def fast_plan(model_config: Any, facts: PathFacts, work: Workload) -> Plan:
    """The fast end: nothing recomputed, everything on the card, the largest forwards."""
    tokens = forward_sizes(work, facts)[-1]
    return make_plan(model_config, facts, recomputed=0, embedding=False, inputs=False, tokens=tokens)


def lean_plan(model_config: Any, facts: PathFacts, work: Workload) -> Plan:
    """The lean end: every layer recomputed, what can move in host memory, forwards of about
    LEAN_TOKEN_BYTES of activations (at least the longest sample)."""
    recomputed = facts.layers if facts.recompute else 0
    inputs = facts.inputs_can_move and recomputed > 0
    kw: dict[str, Any] = dict(recomputed=recomputed, embedding=facts.embedding_can_move, inputs=inputs)
    sizes = forward_sizes(work, facts)
    if not facts.merge:
        return make_plan(model_config, facts, tokens=sizes[0], **kw)
    one = make_plan(model_config, facts, tokens=1, **kw).parts
    per_token = max(one["activations"] + one["loss"], 1)
    tokens = min(sizes[-1], max(work.longest, gm.LEAN_TOKEN_BYTES // per_token))
    return make_plan(model_config, facts, tokens=tokens, **kw)


def candidate_plans(model_config: Any, facts: PathFacts, work: Workload) -> list[Plan]:
    """Every plan the path can run, the two ends included: each recompute count, each forward
    size, with and without what can move to host memory (layer inputs only when every layer
    recomputes: a kept layer's saved tensors would go too)."""
    model_config = gm.model_sizes(model_config)  # read once, not per candidate
    lean = lean_plan(model_config, facts, work)
    plans = {fast_plan(model_config, facts, work), lean}
    layers = facts.layers
    for tokens in {*forward_sizes(work, facts), lean.tokens}:
        for recomputed in range(layers + 1) if facts.recompute else (0,):
            for embedding in {False, facts.embedding_can_move}:
                for inputs in {False, facts.inputs_can_move and recomputed == layers and layers > 0}:
                    plans.add(
                        make_plan(
                            model_config,
                            facts,
                            recomputed=recomputed,
                            embedding=embedding,
                            inputs=inputs,
                            tokens=tokens,
                        )
                    )
    return sorted(plans, key=lambda p: (p.cost, p.peak))


class NoPlanFits(UserError):
    """The budget is below the smallest plan's peak."""

    code = "config"


@dataclass(frozen=True)
class Choice:
    """The plan to train with, why, and the budget it was chosen for (None: no GPU seen)."""

    plan: Plan
    why: str
    budget: int | None
    capped: bool  # the budget is the user's --max_memory

    def line(self) -> str:
        return self.plan.line(self.budget)


def budget_bytes(max_memory_gib: float, available: int | None) -> int | None:
    """The budget for a plan's peak: --max_memory when given (never more than the card has),
    else what the card has for this process less CARD_MARGIN; None when no GPU is seen."""
    if max_memory_gib > 0:
        asked = int(max_memory_gib * GIB)
        return min(asked, available) if available else asked
    return int(available * (1 - CARD_MARGIN)) if available else None


def default_budget_gib(free_bytes: int) -> float:
    """The form's max_memory on a card with `free_bytes` free: what a run can take at its peak
    there (the CUDA context and CARD_MARGIN set aside), in GiB to one decimal, rounded down."""
    usable = max(free_bytes - CUDA_CONTEXT_BYTES, 0) * (1 - CARD_MARGIN)
    return int(usable / GIB * 10) / 10


def allocator_cap(max_memory_gib: float) -> int:
    """The bytes the allocator may reserve under --max_memory (torch's per-process fraction)."""
    return int(max_memory_gib * GIB * (1 + PREDICTION_TOLERANCE))


def choose_plan(
    cfg: Any,
    model_config: Any,
    facts: PathFacts,
    work: Workload,
    available: int | None,
) -> Choice:
    """The plan for `cfg`: `profile` fast or lean pins an end; auto takes the fastest candidate
    whose predicted peak fits the budget (`budget_bytes` of --max_memory and `available`, the
    card's memory for this process; None: no GPU seen, the fast end). NoPlanFits when nothing
    fits (a pinned end: when it does not fit the --max_memory given)."""
    model_config = gm.model_sizes(model_config)
    capped = cfg.max_memory > 0
    budget = budget_bytes(cfg.max_memory, available)
    source = f"--max_memory {cfg.max_memory:g} GiB" if capped else "the card's memory"
    if cfg.profile in ("fast", "lean"):
        plan = (fast_plan if cfg.profile == "fast" else lean_plan)(model_config, facts, work)
        if capped and budget is not None and plan.peak > budget:
            raise _refusal(cfg, model_config, facts, work, budget, source, pinned=plan)
        return Choice(plan, f"profile {cfg.profile}, asked for", budget, capped)
    if budget is None:
        return Choice(fast_plan(model_config, facts, work), "no GPU seen: the fast end", None, False)
    plans = candidate_plans(model_config, facts, work)
    fitting = [p for p in plans if p.peak <= budget]
    if not fitting:
        raise _refusal(cfg, model_config, facts, work, budget, source)
    return Choice(fitting[0], f"the fastest plan within {source}", budget, capped)


def smallest_plan(model_config: Any, facts: PathFacts, work: Workload) -> Plan:
    return min(candidate_plans(model_config, facts, work), key=lambda p: p.peak)


def _refusal(
    cfg: Any,
    model_config: Any,
    facts: PathFacts,
    work: Workload,
    budget: int,
    source: str,
    pinned: Plan | None = None,
) -> NoPlanFits:
    """What does not fit, the smallest plan's peak, and the changes that would fit."""
    smallest = smallest_plan(model_config, facts, work)
    need = pinned.peak if pinned else smallest.peak
    if pinned:
        what = (
            f"profile {cfg.profile} needs about {need / GIB:.1f} GiB of GPU memory at its peak, over "
            f"{source} ({pinned.line()})"
        )
    else:
        what = (
            f"no training plan fits in {source}{'' if cfg.max_memory > 0 else f' ({budget / GIB:.1f} GiB)'}: "
            "the smallest, "
            f"{smallest.recomputed_layers} of {smallest.layers} layers recomputed, {smallest.where()}, "
            f"{smallest.tokens:,} tokens per forward, needs about {need / GIB:.1f} GiB at its peak"
        )
    fixes = [f"--profile auto (its smallest plan needs {smallest.peak / GIB:.1f} GiB)"] if pinned else []
    fixes += _changes_that_fit(cfg, model_config, facts, work, budget)
    if cfg.max_memory > 0:
        fixes.append(f"raise --max_memory to {need / GIB + 0.05:.1f} or more, if the card has it")
    hint = "any one of these fits: " + "; or ".join(fixes) if fixes else "choose a smaller model"
    return NoPlanFits(what, hint)


def _changes_that_fit(
    cfg: Any, model_config: Any, facts: PathFacts, work: Workload, budget: int
) -> list[str]:
    def smallest_with(f: PathFacts = facts, w: Workload = work) -> int:
        return smallest_plan(model_config, f, w).peak

    found = []
    if not facts.quantized:
        peak = smallest_with(replace(facts, quantized=True))
        if peak <= budget:
            found.append(f"train_type qlora (the base in 4 bits: {peak / GIB:.1f} GiB at the smallest plan)")
    if not facts.recompute and smallest_with(replace(facts, recompute=True)) <= budget:
        found.append("gradient_checkpointing on (recompute layers in backward)")

    def fits(longest: int) -> bool:
        return smallest_with(w=replace(work, longest=longest)) <= budget

    low = 16  # TrainConfig's smallest max_length
    if work.longest > low and fits(low):
        high = work.longest - 1  # the longest max_length that fits: fits(low) holds
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        found.append(f"max_length {low} (now {cfg.max_length}; longer samples are cut there)")
    if work.batch > 1 and not facts.merge:
        found.append("per_device_train_batch_size 1 (with more gradient_accumulation_steps)")
    return found

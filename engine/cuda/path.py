"""The CUDA fast path: padding-free packing, a loss over the loss tokens only, fused kernels, profiles.

`train.select_path()` calls `cuda_path(cfg, device, model_config, longest)` on CUDA. The recipe
stays the same; what changes is how a micro-batch is laid out and how its summed loss is computed:

- **Packing** (engine/cuda/packing.py). A micro-batch's samples are concatenated into one row with
  no padding. Position ids restart at 0 for each sample and attention is per document: a
  registered attention function ("tunebench_varlen") calls PyTorch's variable-length
  flash-attention kernel with the samples' cumulative lengths, so no token attends across a
  sample boundary and no time goes to pads.
- **Loss** (engine/cuda/fused_loss.py). The decoder's last hidden states are taken only at positions
  that predict a trained token and fed to a fused linear + cross-entropy (liger-kernel) that
  never builds the [tokens x vocabulary] logits; without liger, a chunked loss that recomputes
  each chunk's logits in backward. The result is the SUM over loss tokens, as the recipe expects.
- **LoRA** (engine/cuda/lora_train.py). PEFT's LoRA forward casts every input to float32 for the
  adapter (a float32 copy of each projection's input is kept for backward). Here the adapter runs
  in the compute dtype against its float32 master weights, and the base and adapter products
  share one saved input.
- **Recompute in the graph.** Each decoder layer is compiled with its checkpoint inside
  (`ingraph`): the forward graph keeps only the layer's input and the backward graph replays the
  forward itself, fused with the backward's own work. Inside such a layer nothing is an
  autograd.Function (the LoRA and 4-bit products are plain ops, attention is the aten flash op):
  torch 2.11 keeps what a Function saves instead of recomputing it. Lean LoRA on a 7B makes
  10,531 to 11,240 tokens/s with the checkpoint inside the compiled layer, 7,155 with it around
  (H200, bench/RESULTS.md).
- **Long forwards.** Past `MLP_CHUNK_TOKENS` (engine/core/memory_model.py) each decoder layer's
  MLP runs over slices of the tokens (`mlpchunk`): with the recompute in the graph the backward
  replays one slice at a time, so a replayed layer holds one slice's intermediates, not 3 x
  tokens x intermediate (3.5 GiB at 32k tokens on a 7B). The fused loss takes at most
  `LOSS_SLICE_TOKENS` per call, so its logits stay one slice's too. What still grows with the
  length is hidden-wide (the residual stream, attention's q/k/v, the layers' inputs, which lean
  keeps in host memory).
- **Kernels.** liger's fused RMSNorm and SwiGLU on Llama / Qwen / Mistral families (they keep
  fewer and smaller tensors for backward); fused AdamW is the recipe's own.
- **Merged forwards.** A step's samples are regrouped (in order, never split) into forwards of
  at most the plan's token count. The loss is summed and normalised by the step's loss tokens,
  so the gradient is the configured micro-batches'.
- **Plans.** `cuda_path` chooses the plan with the one planner (engine/core/plans.py, which the
  TUI's estimate uses too): how many decoder layers recompute (the last ones), whether the input
  embedding matrix (its rows are gathered on the CPU: it is frozen and only indexed) and the
  recomputed layers' inputs (engine/cuda/offload.py) live in host memory, and the tokens per
  forward: the fastest plan whose predicted peak fits --max_memory, else the card. `fast` and
  `lean` are its two ends. Under --max_memory the allocator is capped a little above the budget.

Techniques: pack, merge, flce, lora, offload and hostinputs (where the plan says), mlpchunk, compile
(each decoder layer as one torch.compile region, bitsandbytes' 4-bit layers included), ingraph
and nf4 (in such layers the NF4 dequantisation in plain ops, one fused kernel per weight: lean
QLoRA on a 7B makes 9,151 tokens/s with it, 7,244 without, H200) and cudnn (cuDNN's attention
where every forward holds one sample, engine/cuda/packing.py) are on; liger is off because it
measured slower here (bench/RESULTS.md). For measuring, `TUNEBENCH_ACCEL` adjusts the set, e.g.
`TUNEBENCH_ACCEL=+liger,-merge` or `-ingraph` (the checkpoint around the compiled layer);
`tokens=4096` sets the tokens per forward instead of the plan.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.config import TrainConfig
from ..core.memory_model import (
    GIB,
    LOSS_SLICE_TOKENS,
    MLP_CHUNK_TOKENS,
    MLP_MAX_CHUNKS,
    Profile,
    estimate_peak_bytes,
    layer_activation_bytes,
    mlp_chunks,
    model_sizes,
)
from ..core.plans import (
    DEFAULT_TECHNIQUES,
    Choice,
    Plan,
    Workload,
    allocator_cap,
    choose_plan,
    path_facts,
    techniques_for,
)
from ..core.plans import techniques as techniques
from ..models.blocks import decoder_layers
from ..models.kernels import patch_liger
from ..train.types import Batch, TrainPath
from .compiling import (
    CompileTally,
    call_module_forwards_directly,
    compile_layers,
    uncompile_layers,
)
from .fused_loss import chunked_ce_sum, in_slices, liger_ce_sum
from .layers import (
    chunk_mlps,
    own_recompute,
    pop_saved_tensor_hooks_to,
    saved_tensor_hooks_top,
    set_mlp_chunks,
)
from .lora_train import patch_lora_layers, probe_mm_out_dtype
from .offload import HostEmbedding, HostInputs
from .packing import (
    ATTENTION_NAME,
    CUDNN_ATTENTION_NAME,
    PackedBatch,
    cudnn_attention_runs,
    forwards_hold_one_sample,
    pack,
    register_attention,
    repartition,
    use_attention,
)

log = logging.getLogger(__name__)


# The techniques that need torch.compile to take a decoder layer whole, in the order they are
# given up when it cannot, and what giving each up costs (lean on a 7B, H200, bench/RESULTS.md).
COMPILED_TECHNIQUES = (
    (
        "ingraph",
        "the recompute now runs around the compiled layer (lean LoRA measured 7,155 instead of "
        "10,531 tokens/s)",
    ),
    ("compile", "the decoder layers now run eagerly (lean QLoRA measured 3,881 instead of 7,651 tokens/s)"),
)


# ===================================================================== entry


def cuda_path(cfg: TrainConfig, device, model_config: Any, longest: int | None = None) -> TrainPath:
    """The fast path for `cfg` on a CUDA `device`, once the model (`model_config`) is loaded and
    the data's longest sample (`longest`, tokens) is known: its plan is chosen here (NoPlanFits,
    a UserError, when nothing fits the budget) and printed before step 1."""
    fast = FastPath(cfg, device, Profile.LEAN if cfg.profile == "lean" else Profile.FAST)
    free, total = torch.cuda.mem_get_info(device)
    # what this process can have: the free memory and what the allocator already holds (the model)
    available = free + torch.cuda.memory_reserved(device)
    facts = path_facts(cfg, model_config, fast.use, cuda=device.type == "cuda")
    fast.choice = choose_plan(cfg, model_config, facts, Workload.of(cfg, longest), available)
    fast.plan = fast.choice.plan
    if cfg.max_memory > 0:
        cap_memory(device, allocator_cap(cfg.max_memory), total)
    notes = [fast.choice.line(), f"GPU path: {fast.choice.why}"] + fast.describe()
    fast.notes = notes  # the path adds the memory model's numbers once it has seen a forward
    return TrainPath(
        name="cuda",
        gradient_checkpointing=cfg.gradient_checkpointing,
        collate=fast.collate,
        loss_sum=fast.loss_sum,
        prepare_base=fast.prepare_base,
        group=fast.group,
        notes=notes,
        compiles=fast.compiles,
        compile_report=fast.compile_report,
    )


def cap_memory(device, cap: int, total: int) -> None:
    """Hold this process's allocator to `cap` bytes (--max_memory and the prediction's tolerance),
    so that a plan that needs more than predicted fails with an out-of-memory error and its advice
    rather than taking a shared card's memory; a tighter cap set before (a bench playing a smaller
    card) stays."""
    fraction = min(1.0, cap / total)
    # torch's fraction calls want an index: torch.device("cuda") alone is refused
    index = device.index if device.index is not None else torch.cuda.current_device()
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get is not None:
        try:
            fraction = min(fraction, float(get(index)))
        except (RuntimeError, TypeError):
            pass  # no fraction set yet on this torch: ours stands
    torch.cuda.set_per_process_memory_fraction(fraction, index)


# ================================================================= the path


@dataclass
class _Model:
    """What the loss needs from the PEFT-wrapped model, found once."""

    decoder: Any
    head_weight: Any
    layers: list
    per_token_layer: int
    per_token_fixed: int


@dataclass
class FastPath:
    cfg: TrainConfig
    device: Any
    profile: Profile  # the end to take where no plan is given (tests, the bench's checks)
    use: set[str] = field(default_factory=techniques)
    plan: Plan | None = None  # what to recompute, what to keep in host memory, tokens per forward
    choice: Choice | None = None  # the plan, why, and the budget it was chosen for
    host_embedding: HostEmbedding | None = None
    host_inputs: HostInputs | None = None  # the recomputed layers' inputs in host memory (lean)
    compute_dtype: Any = None
    applied: list[str] = field(default_factory=list)
    compile_options: dict = field(default_factory=dict)  # torch.compile's, e.g. a test's backend
    mlp_chunk_tokens: int = MLP_CHUNK_TOKENS  # longer forwards run the MLPs in slices of this many
    notes: list[str] = field(default_factory=list)  # the TrainPath's notes: the recipe logs new ones
    _model: _Model | None = None
    _ce: Any = None
    _kept: int = 0  # layers that keep their activations
    _config: Any = None  # the base model's config, for the memory model
    _max_tokens: int = 0  # tokens per forward, from the plan (0: not set yet)
    _lengths_vary: bool = False  # the samples differ in length: forwards will too
    _longest: int = 0  # the longest sample's tokens
    _one_sample_forwards: bool | None = None  # no forward of this run holds two samples
    _modelled_peak: int = 0  # the largest peak the memory model gave for a forward so far
    _compile_start: CompileTally | None = None  # torch.compile's tally before the layers compiled

    def __post_init__(self) -> None:
        self.profile = Profile(self.profile)  # a caller's "fast" / "lean" text is the same profile
        # what the config rules out (DoRA: PEFT's LoRA layers; a named attention kernel: no packing)
        self.use -= DEFAULT_TECHNIQUES - techniques_for(self.cfg, "")

    @property
    def compiles(self) -> bool:
        return "compile" in self.use

    @property
    def recompiles_in_graph(self) -> bool:
        return self.compiles and "ingraph" in self.use

    @property
    def all_recomputed(self) -> bool:
        """Every layer recomputes (the lean end, or a plan near it): the loss keeps small chunks."""
        return self.plan.recomputed_layers >= self.plan.layers if self.plan else self.profile == Profile.LEAN

    @property
    def moves_embedding(self) -> bool:
        if self.plan is not None:
            return self.plan.embedding_on_host
        return self.profile == Profile.LEAN and "offload" in self.use and "pack" in self.use

    @property
    def keeps_inputs_on_host(self) -> bool:
        """The recomputed layers' inputs go to host memory (the plan's, or lean's): only a
        checkpoint compiled into the graph saves its inputs where hooks can move them, and the
        streams are CUDA's."""
        wanted = self.plan.inputs_on_host if self.plan is not None else self.profile == Profile.LEAN
        return (
            wanted
            and "hostinputs" in self.use
            and "pack" in self.use
            and self.recompiles_in_graph
            and self.cfg.gradient_checkpointing
            and self.device.type == "cuda"
        )

    def describe(self) -> list[str]:
        on = [
            ("pack", "padding-free packing with per-document flash attention"),
            ("flce", "fused linear + cross-entropy on loss tokens only"),
            ("liger", "liger RMSNorm / SwiGLU"),
            ("lora", "LoRA in the compute dtype, one saved input"),
            ("compile", "each decoder layer compiled as one region"),
            ("ingraph", "recompute compiled into each layer's graph"),
            ("merge", "a step's samples packed into as few forwards as the plan's memory allows"),
            (
                "mlpchunk",
                f"MLPs over slices of {self.mlp_chunk_tokens} tokens in longer forwards "
                f"(at most {MLP_MAX_CHUNKS})",
            ),
        ]
        use = self.use - (set() if self.compiles else {"compile", "ingraph"})
        notes = [f"GPU path: {text}" for key, text in on if key in use]
        if self.cfg.attn_impl != "auto":
            notes.append(
                f"GPU path: --attn_impl {self.cfg.attn_impl}: samples are padded, not packed "
                "(packing needs its own per-document attention); leave it out for the fastest path"
            )
        if self.cfg.use_dora:
            notes.append(
                "GPU path: DoRA runs PEFT's LoRA layers, not the fast ones: each adapted layer keeps "
                "a float32 copy of its input and computes its weight's norm every step (more memory, "
                "slower steps)"
            )
        if self.moves_embedding:
            notes.append("GPU path: input embeddings kept in host memory")
        if self.keeps_inputs_on_host:
            notes.append("GPU path: recomputed layers' inputs kept in host memory")
        if self.cfg.is_qlora and self.recompiles_in_graph and "nf4" in self.use:
            notes.append("GPU path: 4-bit weights dequantised in one fused kernel each")
        return notes

    # ---------------------------------------------------------- before LoRA

    def prepare_base(self, model):
        register_attention()
        if "pack" in self.use:
            use_attention(model, ATTENTION_NAME)
        if "liger" in self.use:
            self.applied += patch_liger(model)
        self.compute_dtype = _compute_dtype(model)
        self._config = model.config
        if self.moves_embedding:
            emb, head = model.get_input_embeddings(), model.get_output_embeddings()
            if head is None or emb.weight is not head.weight:
                self.host_embedding = HostEmbedding(emb.weight, self.compute_dtype)
                emb.weight.data = torch.empty(0, dtype=emb.weight.dtype, device=emb.weight.device)
                self.applied.append("embedding in host memory")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if self.keeps_inputs_on_host:
            self.host_inputs = HostInputs(self.device, model.config.hidden_size, self.compute_dtype)
            self.applied.append("recomputed layers' inputs in host memory")
        return model

    # -------------------------------------------------------------- batches

    def group(self, step: list[list[int]], samples: list) -> list[list[int]]:
        """The step's forwards: its samples regrouped to the plan's tokens per forward (CUDA only)."""
        if self._model is None:  # before the layers are compiled: will the forwards' shapes vary?
            lengths = {len(s.input_ids) for s in samples}
            self._lengths_vary = len(lengths) > 1
            self._longest = max(lengths, default=0)
        merging = "pack" in self.use and "merge" in self.use and self.device.type == "cuda"
        if merging:
            forced = [int(t.split("=", 1)[1]) for t in self.use if t.startswith("tokens=")]
            if forced and not self._max_tokens:  # measuring: a forward size other than the memory model's
                self._max_tokens = forced[0]
                self.notes.append(f"GPU path: forwards of up to {self._max_tokens} tokens (set by tokens=)")
            if not self._max_tokens and self.plan is not None:
                self._max_tokens = self.plan.tokens  # the plan's line says it
        if self._one_sample_forwards is None and step:  # the run's first step: a full one
            self._one_sample_forwards = forwards_hold_one_sample(
                step, [len(s.input_ids) for s in samples], self._max_tokens if merging else 0
            )
        if not merging or not self._max_tokens:
            return step  # no plan (a check of the path itself): the configured micro-batches
        return repartition(step, lambda i: len(samples[i].input_ids), self._max_tokens)

    def collate(self, samples: list, pad_id: int, device) -> Batch:
        if "pack" not in self.use:
            from ..train.plain import collate

            return collate(samples, pad_id, device)
        # Attention's longest-sample bound is an int the compiled layers would be specialised on:
        # with lengths that vary it is the dataset's longest sample, the same for every forward.
        return pack(samples, device, max_len=self._longest if self._lengths_vary else 0)

    def loss_sum(self, model, batch: Batch):
        m = self.prepared(model)
        if not isinstance(batch, PackedBatch):
            from ..train.plain import forward_loss_sum

            return forward_loss_sum(model, batch)
        if batch.target_tokens == 0:
            return torch.zeros((), device=self.device, requires_grad=torch.is_grad_enabled())
        training = torch.is_grad_enabled() and model.training
        if training:
            self._plan_recompute(m, batch.tokens)
        kwargs = dict(
            position_ids=batch.position_ids,
            cu_seq_lens_q=batch.cu_seqlens,
            cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_len,
            max_length_k=batch.max_len,
            use_cache=False,
        )
        if self.host_embedding is not None:
            kwargs["inputs_embeds"] = self.host_embedding(batch.host_ids, self.device)
        else:
            kwargs["input_ids"] = batch.input_ids
        if "mlpchunk" in self.use:
            set_mlp_chunks(m.layers, mlp_chunks(batch.tokens, self.mlp_chunk_tokens))
        out = self._decoder_forward(m, kwargs, batch.tokens if training else 0)
        hidden = out[0][0]
        if batch.target_tokens != hidden.shape[0]:
            hidden = hidden.index_select(0, batch.loss_index)
        loss = self._ce(hidden, m.head_weight, batch.loss_targets)
        if training and self.device.type == "cuda":
            self._note_memory_model(m, batch.tokens)
        return loss

    # ---------------------------------------------------------------- setup

    def prepared(self, model) -> _Model:
        """The model's pieces as the path runs them (set up at the first forward)."""
        return self._model or self._setup(model)

    def _setup(self, model) -> _Model:
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = getattr(causal, causal.base_model_prefix)
        if self.device.type == "cuda":
            probe_mm_out_dtype(self.device)
        head = causal.get_output_embeddings()
        if "lora" in self.use:
            n = patch_lora_layers(model, plain=self.recompiles_in_graph, fused_nf4="nf4" in self.use)
            if n:
                self.applied.append(f"LoRA layers x{n}")
        self._restore_dtype(causal)
        layers = decoder_layers(causal)
        if layers:
            own_recompute(layers, self.cfg.gradient_checkpointing)
            if hasattr(causal, "_require_grads_hook") or getattr(causal, "_require_grads_hooks", None):
                causal.disable_input_require_grads()
        if self._uses_cudnn_attention():
            use_attention(model, CUDNN_ATTENTION_NAME)
            self.applied.append("cuDNN attention (one sample per forward)")
        if "mlpchunk" in self.use and chunk_mlps(layers):
            self.applied.append(
                f"MLPs in slices of {self.mlp_chunk_tokens} tokens in long forwards "
                f"(at most {MLP_MAX_CHUNKS} slices: longer ones past that)"
            )
        if self.compiles:
            if call_module_forwards_directly(layers):
                self.applied.append("kernels-hub routing bypassed")
            self.applied += self._compile(layers)
        # Larger loss chunks read the [vocab x hidden] head fewer times; lean keeps them small.
        chunk_budget = 4 if self.all_recomputed else 16
        ce = None if "flce" not in self.use or self.device.type != "cuda" else liger_ce_sum(chunk_budget)
        if ce is None and "flce" in self.use and self.device.type == "cuda":
            self.use.discard("flce")
            self.notes.append(
                "GPU path: flce switched off: liger-kernel is not installed (pip install liger-kernel); "
                "the chunked loss instead builds each chunk's logits twice and reads the head more often"
            )
        self._ce = in_slices(ce, LOSS_SLICE_TOKENS) if ce else chunked_ce_sum
        c = causal.config
        hidden = c.hidden_size
        self._model = _Model(
            decoder=decoder,
            head_weight=head.weight,
            layers=layers,
            per_token_layer=layer_activation_bytes(
                c, fused=any("liger" in a for a in self.applied), compiled=self.compiles
            )
            + (0 if "lora" in self.use else (6 * hidden + c.intermediate_size) * 4),
            per_token_fixed=hidden * 2 * 6,
        )
        log.info("GPU path applied: %s", ", ".join(self.applied) or "nothing")
        return self._model

    def compile_tally(self) -> CompileTally:
        """What torch.compile did for this path so far (nothing before its first forward)."""
        if self._compile_start is None:
            return CompileTally()
        return CompileTally.now().since(self._compile_start)

    def compile_report(self) -> tuple[float, str]:
        """Seconds compiling so far, and what the compile cache did, in words."""
        tally = self.compile_tally()
        return tally.seconds, tally.describe()

    def _uses_cudnn_attention(self) -> bool:
        """cuDNN's attention serves forwards of one sample; it is chosen only for a run whose every
        forward holds one (long samples, as in long-context training). Where some forwards hold
        several, the compiled layers would guard on which kind each is and compile for both."""
        if not ("pack" in self.use and "cudnn" in self.use and self._one_sample_forwards):
            return False
        if self.device.type != "cuda":
            return False
        sizes = model_sizes(self._config)
        return cudnn_attention_runs(self.device, sizes["heads"], sizes["kv_heads"], sizes["head_dim"])

    def _compile(self, layers: list) -> list[str]:
        if self._compile_start is None:
            self._compile_start = CompileTally.now()
        # Samples of many lengths give every forward a new token count: packed forwards are
        # compiled for any size from the start (`_token_dims_dynamic`).
        packed = "pack" in self.use
        options = {"dynamic": True} if self._lengths_vary and not packed else {}
        return compile_layers(
            layers,
            self.device,
            recompute_in_graph=self.recompiles_in_graph,
            dynamic_tokens=self._lengths_vary and packed,
            **(options | self.compile_options),
        )

    def _decoder_forward(self, m: _Model, kwargs: dict, training_tokens: int):
        """The decoder's forward. Where torch.compile cannot take a layer whole (a new library
        version can bring a side effect or an op dynamo refuses), the technique that needs it is
        switched off, with a note saying why and what it costs, and the forward runs again."""
        while True:
            host_inputs = self.host_inputs if training_tokens else None
            hooks_before = saved_tensor_hooks_top()
            try:
                with host_inputs.around(training_tokens) if host_inputs else nullcontext():
                    return m.decoder(**kwargs)
            except torch._dynamo.exc.TorchDynamoException as error:
                pop_saved_tensor_hooks_to(hooks_before)
                if not self._switch_off(m, error):
                    raise

    def _switch_off(self, m: _Model, error: Exception) -> bool:
        """Drop the first compiled technique still on (see `COMPILED_TECHNIQUES`); False if none is."""
        technique = next((t for t, _ in COMPILED_TECHNIQUES if t in self.use and self.compiles), None)
        if technique is None:
            return False
        cost = dict(COMPILED_TECHNIQUES)[technique]
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        note = (
            f"GPU path: {technique} switched off: torch.compile cannot take a decoder layer whole "
            f"({reason}); {cost}"
        )
        log.warning("%s\n%s", note, error)
        self.notes.append(note)
        self.use.discard(technique)
        uncompile_layers(m.layers)
        for layer in m.layers:  # LoRA products as autograd functions again: they save less
            for module in layer.modules():
                if hasattr(module, "_tb_plain"):
                    module._tb_plain = self.recompiles_in_graph
        # Only a checkpoint compiled into the graph can move its inputs: the plan's forwards and
        # recompute stay (the eager replay holds less, the inputs kept on the card a little more).
        self.host_inputs = None
        if self.compiles:
            self.applied += self._compile(m.layers)
        return True

    def _restore_dtype(self, causal) -> None:
        """Undo PEFT's float32 upcast of the frozen non-4-bit weights (embeddings, head, norms) under QLoRA.

        The upcast only matters for float16 training; in bfloat16 it doubles those weights and
        turns the whole residual stream float32."""
        if not self.cfg.is_qlora or self.compute_dtype not in (torch.bfloat16,):
            return
        for p in causal.parameters():
            if not p.requires_grad and p.dtype == torch.float32 and p.__class__.__name__ != "Params4bit":
                p.data = p.data.to(self.compute_dtype)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -------------------------------------------------------------- memory

    def _plan_recompute(self, m: _Model, tokens: int) -> None:
        """Recompute the plan's number of layers (the last ones); without a plan, lean recomputes
        every layer, as does a path off CUDA (the tests' checks of the recompute), fast none."""
        if not m.layers or not self.cfg.gradient_checkpointing:
            return
        layers = len(m.layers)
        if self.plan is not None:
            recomputed = min(layers, self.plan.recomputed_layers)
        elif self.profile == Profile.LEAN or self.device.type != "cuda":
            recomputed = layers
        else:
            recomputed = 0
        keep = layers - recomputed
        for index, layer in enumerate(m.layers):
            layer._tb_recompute = index >= keep
        self._kept = keep

    def _note_memory_model(self, m: _Model, tokens: int) -> None:
        """Say what the memory model expects for the largest forward so far (the bench checks it)."""
        recomputed = len(m.layers) - self._kept if self.cfg.gradient_checkpointing and m.layers else 0
        parts = estimate_peak_bytes(
            self._config,
            tokens=tokens,
            lora_rank=self.cfg.lora_rank,
            target_modules=tuple(self.cfg.target_modules),
            quantized=self.cfg.is_qlora,
            recomputed_layers=recomputed,
            embedding_on_host=self.host_embedding is not None,
            compiled=self.compiles,
            inputs_on_host=self.host_inputs is not None,
            in_graph=self.recompiles_in_graph,
            dora=self.cfg.use_dora,
            mlp_chunk_tokens=self.mlp_chunk_tokens if "mlpchunk" in self.use else 0,
        )
        if parts["total"] > self._modelled_peak * 1.02:
            self._modelled_peak = parts["total"]
            self.notes.append(
                f"memory model: peak {parts['total'] / GIB:.2f} GiB for a forward of {tokens} tokens, "
                f"{recomputed} of {len(m.layers)} layers recomputed"
            )


def _compute_dtype(model):
    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return getattr(model, "dtype", torch.float32)

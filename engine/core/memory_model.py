"""The GPU path's memory model: peak allocated bytes of a training step (engine/core/plans.py
gives it each candidate plan).

Torch-free on purpose: the TUI's estimate (engine/core/estimate.py) and the CUDA path (engine/cuda/path.py)
use the same numbers, and the estimate is answered before torch is ever imported. Calibrated
against the peaks measured on an H100 and an H200 (bench/RESULTS.md, "Memory model").
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any

GIB = 1024**3
ALL_LINEAR = ("all-linear",)  # LoRA's target_modules when every projection is trained
# The lean plan's allowance for everything that scales with tokens (activations, loss): a
# forward takes as many samples as fit in it. At 2048 tokens a 7B needs about 1.0 GiB (the replay
# in the graph holds more than an eager one: REPLAY_LAYERS_IN_GRAPH).
LEAN_TOKEN_BYTES = int(1.0 * GIB)
# The fast profile packs at most this many tokens into one forward: beyond it the matrix products
# are as efficient as they get and only memory grows.
FAST_MAX_TOKENS = 16384
# A layer whose recompute is compiled into its graph replays it inside one backward graph, which
# holds about this many layers' worth of activations at its peak (the eager replay holds one):
# measured 454 KB per token on Qwen2.5-7B against 164 KB kept by a layer (H200).
REPLAY_LAYERS_IN_GRAPH = 2.75
# Forwards longer than this run each decoder layer's MLP over slices of at most this many tokens
# (engine/cuda/layers.py, `chunk_mlps`): the MLP's intermediates (gate, up and their product, each
# intermediate-wide) are most of what a replayed layer holds, and slices bound them whatever the
# sample's length (3 x 32,768 x 18,944 x 2 bytes, 3.5 GiB, at 32k tokens on a 7B; 0.43 GiB a
# slice). 4,096 tokens keep each product large enough to run at full speed.
MLP_CHUNK_TOKENS = 4096
# At most this many slices: past MLP_CHUNK_TOKENS x MLP_MAX_CHUNKS tokens the slices grow longer
# instead. 64 slices of an 86,016-token forward (lean QLoRA, 7B) ran out of memory at 22 GiB and
# took minutes to compile; 16 slices of 5,376 tokens peaked at 19.98 GiB (H200, bench/RESULTS.md).
MLP_MAX_CHUNKS = 16
# The fused loss takes at most this many tokens per call: its transient logits grow with the
# tokens of a call, so a long sample's loss goes in slices (their sum is the same loss).
LOSS_SLICE_TOKENS = 16384


def model_sizes(model_config: Any) -> dict[str, Any]:
    """The sizes the model needs from a config (a dict, a PretrainedConfig, or a namespace)."""
    if isinstance(model_config, dict):
        c = model_config
    elif hasattr(model_config, "to_dict"):
        c = model_config.to_dict()
    else:
        c = vars(model_config)
    if "hidden" in c and "hidden_size" not in c:
        return c  # already these sizes
    c = c.get("text_config") or c  # multimodal wrappers keep the language model's sizes there
    h = int(c["hidden_size"])
    heads = int(c.get("num_attention_heads") or max(1, h // 64))
    return {
        "hidden": h,
        "intermediate": int(c.get("intermediate_size") or 4 * h),
        "layers": int(c["num_hidden_layers"]),
        "heads": heads,
        "kv_heads": int(c.get("num_key_value_heads") or heads),
        "head_dim": int(c.get("head_dim") or h // heads),
        "vocab": int(c["vocab_size"]),
        "tied": bool(c.get("tie_word_embeddings", False)),
    }


class Profile(str, Enum):
    """The two ends of the plans (engine/core/plans.py): fast spends memory on speed, lean keeps
    the least on the card. The config's `auto` picks a plan between them by budget."""

    FAST = "fast"
    LEAN = "lean"

    def __str__(self) -> str:
        return self.value


def layer_activation_bytes(
    model_config: Any, dtype_bytes: int = 2, fused: bool = False, compiled: bool = True
) -> int:
    """Bytes one decoder layer keeps for backward, per token, on this path (no recompute).

    What autograd saves: the two norm inputs and outputs, q/k/v after RoPE and the attention
    output (flash attention keeps these and a float32 log-sum-exp per head), the gate and up
    products and the down projection's input. A layer compiled whole (the default) keeps about one
    hidden-wide tensor more than that: measured on Qwen2.5-7B, H200, 164 KB per token and layer
    against 159 KB counted (bench/RESULTS.md). Eager, HF's RMSNorm and SwiGLU keep
    about one more hidden-wide and one more intermediate-wide tensor (212 KB measured), liger's
    fused kernels (`fused=True`) do not.
    """
    s = model_sizes(model_config)
    h, i, heads, kv, d = s["hidden"], s["intermediate"], s["heads"], s["kv_heads"], s["head_dim"]
    words = 4 * h + (heads + 2 * kv) * d + heads * d + 3 * i
    extra = h if compiled else 0 if fused else h + i
    return (words + extra) * dtype_bytes + heads * 4


def mlp_chunks(tokens: int, chunk_tokens: int = MLP_CHUNK_TOKENS) -> int:
    """How many slices a forward of `tokens` runs each decoder layer's MLP in: a power of 4 that
    leaves slices of a quarter to all of `chunk_tokens` (1: whole; `chunk_tokens` 0: never sliced),
    at most MLP_MAX_CHUNKS (longer slices past that).

    A compiled layer is specialised on the count, so counts in powers of 4 keep the compiles few
    when lengths vary (one per fourfold length) with slices still large enough to run at speed."""
    if chunk_tokens <= 0:
        return 1
    chunks = 1
    while tokens > chunks * chunk_tokens and chunks < MLP_MAX_CHUNKS:
        chunks *= 4
    return chunks


def mlp_intermediate_bytes(model_config: Any, dtype_bytes: int = 2) -> int:
    """Bytes per token of one layer's MLP intermediates kept for backward: gate, up, their product."""
    return 3 * model_sizes(model_config)["intermediate"] * dtype_bytes


def projection_shapes(model_config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear projection in one decoder layer."""
    s = model_sizes(model_config)
    h, i, q, kv = s["hidden"], s["intermediate"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def lora_parameters(
    model_config: Any, rank: int, target_modules: Sequence[str] = ALL_LINEAR, dora: bool = False
) -> int:
    """Trainable LoRA parameters: A (rank x in) and B (out x rank) on every targeted projection of
    every layer (all-linear: all seven); DoRA adds a magnitude per output feature."""
    shapes = projection_shapes(model_config)
    names = shapes if "all-linear" in target_modules else [n for n in target_modules if n in shapes]
    per_layer = sum(
        rank * (fan_in + fan_out) + (fan_out if dora else 0) for fan_in, fan_out in (shapes[n] for n in names)
    )
    return model_sizes(model_config)["layers"] * per_layer


def loss_bytes_per_token(model_config: Any) -> int:
    """The fused loss: hidden states at the loss positions, their gradient, and one chunk of logits
    (chunks are sized to about tokens x hidden elements)."""
    h = model_sizes(model_config)["hidden"]
    return h * 2 * 4 + h * 6


def loss_bytes(model_config: Any, tokens: int) -> int:
    """The fused loss over a forward of `tokens`: the hidden states and their gradient for every
    token, the logits of one slice at a time (`LOSS_SLICE_TOKENS`)."""
    h = model_sizes(model_config)["hidden"]
    return tokens * h * 2 * 4 + min(tokens, LOSS_SLICE_TOKENS) * h * 6


def estimate_peak_bytes(
    model_config: Any,
    *,
    tokens: int,
    lora_rank: int = 8,
    quantized: bool = False,
    recomputed_layers: int | None = None,
    embedding_on_host: bool = False,
    target_modules: Sequence[str] = ALL_LINEAR,
    compiled: bool = True,
    inputs_on_host: bool = False,
    in_graph: bool = True,
    dora: bool = False,
    mlp_chunk_tokens: int = MLP_CHUNK_TOKENS,
) -> dict[str, int]:
    """THE memory model: peak allocated bytes of a training step on the GPU path, by part.

    `tokens` is the largest forward (packed, no padding); `recomputed_layers` None means all of
    them (lean), 0 means none. `target_modules` are the projections LoRA trains (config's);
    `compiled` False models decoder layers that run eagerly (the `-compile` technique);
    `inputs_on_host` models the recomputed layers' inputs kept in host memory (two of them on the
    card at a time: one in use, one arriving); `in_graph` a compiled layer whose recompute is in
    its graph (the `ingraph` technique, on by default); `mlp_chunk_tokens` the MLP's slices in
    longer forwards (0: never sliced, the `-mlpchunk` technique). The CUDA context and the allocator's cache
    are not counted (they are not "allocated").
    """
    s = model_sizes(model_config)
    h, i, layers = s["hidden"], s["intermediate"], s["layers"]
    heads, kv, d, vocab = s["heads"], s["kv_heads"], s["head_dim"], s["vocab"]
    per_layer_linear = h * (heads * d) + 2 * h * (kv * d) + (heads * d) * h + 3 * h * i
    embed = vocab * h
    # NF4: half a byte a weight, an 8-bit absmax per 64 and a float32 scale per 256 blocks of those.
    linear_bytes = layers * per_layer_linear * ((0.5 + 1 / 64 + 4 / (64 * 256)) if quantized else 2)
    embed_bytes = (0 if embedding_on_host and not s["tied"] else embed * 2) + (0 if s["tied"] else embed * 2)
    other = layers * (2 * h + (heads + 2 * kv) * d) * 2 + h * 2
    trainable = lora_parameters(s, lora_rank, target_modules, dora)
    lora_bytes = trainable * 16  # float32 weight, gradient and two AdamW moments
    per_layer = layer_activation_bytes(s, compiled=compiled)
    recomputed = layers if recomputed_layers is None else min(recomputed_layers, layers)
    kept = layers - recomputed
    stubs = min(recomputed, 2) if inputs_on_host else recomputed
    acts = tokens * (kept * per_layer + stubs * h * 2)
    replayed_in_graph = in_graph and compiled
    factor = REPLAY_LAYERS_IN_GRAPH if replayed_in_graph else 1
    # one layer replayed in backward; a replay in the graph recomputes the MLP slice by slice,
    # just before each slice's backward, so only one slice's intermediates are alive (an eager
    # replay recomputes the whole layer before its backward starts: every slice's)
    chunks = mlp_chunks(tokens, mlp_chunk_tokens) if replayed_in_graph else 1
    mlp = mlp_intermediate_bytes(s)
    replayed_tokens = tokens * (per_layer - mlp) + -(-tokens // chunks) * mlp
    transient = int(replayed_tokens * factor) if recomputed else 0
    # Each 4-bit weight is dequantised to the compute dtype for its product: bitsandbytes' own
    # product holds the largest projection, twice at worst; a replay in the graph dequantises the
    # layer's weights once for its recompute and backward, so it holds all of them. A compiled
    # layer that is not recomputed keeps its dequantised weights for backward (fast QLoRA peaked
    # at 53.1 GiB on the 7B, 3 GiB above fast LoRA with 10 GiB less of weights).
    if not quantized:
        dequant = 0
    else:
        replay = per_layer_linear * 2 if replayed_in_graph and recomputed else 2 * 2 * h * i
        dequant = replay + (kept * per_layer_linear * 2 if compiled else 0)
    loss = loss_bytes(s, tokens)
    weights = int(linear_bytes + embed_bytes + other)
    parts = {
        "weights": weights,
        "lora_and_optimizer": lora_bytes,
        "activations": acts + transient,
        "loss": loss,
        "dequantised": dequant,
    }
    parts["total"] = sum(parts.values())
    return parts


# ================================================================ host memory: training on a CPU
#
# Without CUDA the recipe takes the plain path (engine/train/plain.py): eager layers, micro-batches
# padded to their longest sample, the loss from the model's own logits. Its peak is the process's
# RSS, so these numbers are per token of the padded micro-batch, fitted to the peak RSS growth of
# one step measured on the CPU (bench/host_memory.py, bench/RESULTS_host_memory.md: within 8% on
# every shape measured, 17% for recompute).

# Elements one eager decoder layer keeps per token for backward, as multiples of the hidden and
# intermediate sizes: norms upcast to float32, RoPE's rotated copies, LoRA's inputs cast to its
# float32 weights, and the attention and MLP intermediates.
HOST_LAYER_HIDDEN_WORDS = 26
HOST_LAYER_INTERMEDIATE_WORDS = 3
# A recomputed layer (gradient_checkpointing) still keeps about this many hidden-wide elements,
# and about one and a half layers are alive in full while one is replayed in backward.
HOST_RECOMPUTED_HIDDEN_WORDS = 10
HOST_REPLAYED_LAYERS = 1.5
# Outside the layers: embeddings' output, the final norm (hidden-wide), and the logits, their
# float32 copy, log-softmax and gradient (bytes per vocabulary entry per token).
HOST_OUTSIDE_HIDDEN_WORDS = 5
HOST_LOGIT_BYTES = {4: 12, 2: 16}
# Bytes an activation element takes: a 16-bit model still computes its norms and LoRA in float32.
HOST_ELEMENT_BYTES = {4: 4.0, 2: 3.0}
# LoRA dropout keeps its output and mask at every adapted projection (all-linear: 8h + i elements).
HOST_DROPOUT_HIDDEN_WORDS, HOST_DROPOUT_INTERMEDIATE_WORDS = 8, 1
# torch, transformers and the engine itself, resident before any tensor.
HOST_RUNTIME_BYTES = int(0.5 * GIB)


def parameter_count(model_config: Any) -> int:
    """The base model's parameters: the linear layers, the embeddings and head (one matrix when
    tied), and the norms."""
    s = model_sizes(model_config)
    linear = s["layers"] * sum(a * b for a, b in projection_shapes(s).values())
    return linear + s["vocab"] * s["hidden"] * (1 if s["tied"] else 2) + (2 * s["layers"] + 1) * s["hidden"]


def estimate_host_peak_bytes(
    model_config: Any,
    *,
    tokens: int,
    dtype_bytes: int = 4,
    recompute: bool = False,
    lora_rank: int = 8,
    target_modules: Sequence[str] = ALL_LINEAR,
    lora_dropout: float = 0.0,
    dora: bool = False,
) -> dict[str, int]:
    """Peak resident bytes of a training step on the CPU (the plain path), by part.

    `tokens` is the padded micro-batch (samples x their longest length); `dtype_bytes` the
    model's (4: float32, what a CPU loads by default; 2: bfloat16 or float16); `recompute` is
    gradient_checkpointing.
    """
    s = model_sizes(model_config)
    h, i, layers = s["hidden"], s["intermediate"], s["layers"]
    element = HOST_ELEMENT_BYTES[4 if dtype_bytes >= 4 else 2]
    full_layer = (HOST_LAYER_HIDDEN_WORDS * h + HOST_LAYER_INTERMEDIATE_WORDS * i) * element
    if lora_dropout > 0:
        full_layer += (HOST_DROPOUT_HIDDEN_WORDS * h + HOST_DROPOUT_INTERMEDIATE_WORDS * i) * (element + 1)
    if recompute:
        per_token = layers * HOST_RECOMPUTED_HIDDEN_WORDS * h * element + HOST_REPLAYED_LAYERS * full_layer
    else:
        per_token = layers * full_layer
    parts = {
        "weights": parameter_count(s) * dtype_bytes,
        "lora_and_optimizer": lora_parameters(s, lora_rank, target_modules, dora) * 16,
        "activations": int(tokens * (per_token + HOST_OUTSIDE_HIDDEN_WORDS * h * element)),
        "loss": tokens * s["vocab"] * HOST_LOGIT_BYTES[4 if dtype_bytes >= 4 else 2],
        "runtime": HOST_RUNTIME_BYTES,
    }
    parts["total"] = sum(parts.values())
    return parts

"""Writing a merged model folder as one GGUF file (llama.cpp's and Ollama's format), through the
`gguf` package: its writer, its tensor names (TensorNameMap), its quantisation (gguf.quants) and
its special-token reader (SpecialVocab). llama.cpp's convert_hf_to_gguf.py is the reference for the
metadata keys; this writes the llama and qwen2 architectures (SmolLM2, Llama, Qwen2 / Qwen2.5).

Tensors are read one at a time from the folder's safetensors, converted and written at once, so
memory holds one tensor, not the model. Q4_K_M goes through llama.cpp's `llama-quantize`, from
an F16 file written first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.templates import writes_bos

Progress = Callable[[str], None]

# --quant_bits -> the GGUF tensor type of the weight matrices.
GGUF_TYPES = {16: "F16", 8: "Q8_0", 4: "Q4_K_M"}
QUANTIZE_TOOL = "llama-quantize"
QUANTIZE_HINT = (
    "install llama.cpp (its llama-quantize must be on PATH: build it from llama.cpp's sources, or "
    "take a release of llama.cpp), or export --quant_bits 8 or 16, which need nothing else"
)
ARCHITECTURES = ("llama", "qwen2")
# Pre-tokenizer names llama.cpp knows, preferred where several name one split rule.
_PREFERRED_PRE = ("qwen2", "llama-bpe")


def find_quantizer() -> str:
    """llama.cpp's llama-quantize, which Q4_K_M needs; a UserError that says how to get it.
    The export asks before it loads and merges the model, which takes minutes on a 7B."""
    quantizer = shutil.which(QUANTIZE_TOOL)
    if quantizer is None:
        raise UserError(
            f"Q4_K_M (--quant_bits 4) needs llama.cpp's {QUANTIZE_TOOL}, not found on PATH", QUANTIZE_HINT
        )
    return quantizer


def write_gguf(folder: Path, out_file: Path, bits: int, name: str, say: Progress) -> str:
    """Write `folder` (a merged Hugging Face model) to `out_file` with the weights in the type
    GGUF_TYPES gives `bits`; returns that type's name."""
    file_type = GGUF_TYPES[bits]
    if file_type == "Q4_K_M":
        quantizer = find_quantizer()
        f16 = out_file.with_name(out_file.stem + ".f16.gguf")
        _write(folder, f16, "F16", name, say)
        say(f"quantising to Q4_K_M with {quantizer}")
        try:
            done = subprocess.run(
                [quantizer, str(f16), str(out_file), "Q4_K_M"], capture_output=True, text=True, check=False
            )
        finally:
            f16.unlink(missing_ok=True)
        if done.returncode != 0 or not out_file.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise UserError(
                f"{QUANTIZE_TOOL} failed (exit {done.returncode}): {' / '.join(tail)[:400]}",
                "check that llama-quantize comes from a llama.cpp as new as the gguf package, or export "
                "--quant_bits 8",
            )
        return file_type
    _write(folder, out_file, file_type, name, say)
    return file_type


def _write(folder: Path, out_file: Path, file_type: str, name: str, say: Progress) -> None:
    import gguf
    import numpy as np
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = str(config.get("model_type") or "")
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"GGUF export writes the {' and '.join(ARCHITECTURES)} architectures; this model is "
            f"{model_type or 'of an unnamed type'}",
            "export the merged folder (leave out --quant_method) and convert it with llama.cpp's "
            "convert_hf_to_gguf.py",
        )
    arch = gguf.MODEL_ARCH.LLAMA if model_type == "llama" else gguf.MODEL_ARCH.QWEN2
    files = sorted(folder.glob("*.safetensors"))
    plan: list[tuple[str, str, Path, Any]] = []  # (hf name, gguf name, file, tensor type)
    qtype = {"F16": gguf.GGMLQuantizationType.F16, "Q8_0": gguf.GGMLQuantizationType.Q8_0}[file_type]
    names = gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            for hf_name in reader.keys():
                if hf_name.endswith("rotary_emb.inv_freq"):  # recomputed from rope_theta
                    continue
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise UserError(
                        f"{file.name}: no GGUF name for the tensor {hf_name} of this {model_type} model",
                        "export the merged folder (leave out --quant_method) and convert it with "
                        "llama.cpp's convert_hf_to_gguf.py",
                    )
                shape = tuple(reader.get_slice(hf_name).get_shape())
                shapes[hf_name] = shape
                plan.append((hf_name, gguf_name, file, _tensor_type(shape, qtype, gguf)))

    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[arch])
    _add_parameters(writer, config, model_type, name, file_type, gguf)
    _add_vocabulary(writer, folder, int(config["vocab_size"]), gguf)
    for hf_name, gguf_name, _, kind in plan:
        shape = shapes[hf_name]
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), 4 * _count(shape))
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float16), 2 * _count(shape))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
            writer.add_tensor_info(
                gguf_name, byte_shape, np.dtype(np.uint8), _count(byte_shape), raw_dtype=kind
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    heads, kv_heads = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or 0)
    shown = -1
    try:
        for index, (hf_name, _, file, kind) in enumerate(plan, 1):
            with safe_open(str(file), framework="pt") as reader:
                data = reader.get_tensor(hf_name).float().numpy()
            if model_type == "llama" and hf_name.endswith("q_proj.weight"):
                data = _rope_rows(data, heads)
            elif model_type == "llama" and hf_name.endswith("k_proj.weight"):
                data = _rope_rows(data, kv_heads or heads)
            if kind == gguf.GGMLQuantizationType.F32:
                writer.write_tensor_data(np.ascontiguousarray(data, dtype=np.float32))
            elif kind == gguf.GGMLQuantizationType.F16:
                writer.write_tensor_data(np.ascontiguousarray(data, dtype=np.float16))
            else:
                writer.write_tensor_data(gguf.quants.quantize(data, kind))
            if index * 10 // len(plan) != shown:  # about every tenth, and the last
                shown = index * 10 // len(plan)
                say(f"writing {out_file.name} ({file_type}): {index}/{len(plan)} tensors")
    finally:
        writer.close()


def _count(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _tensor_type(shape: tuple[int, ...], qtype: Any, gguf: Any) -> Any:
    """Norms and biases stay F32, as llama.cpp keeps them; a matrix whose rows do not split into
    Q8_0's blocks of 32 falls back to F16."""
    if len(shape) <= 1:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _rope_rows(weight: Any, heads: int) -> Any:
    """Hugging Face's Llama q/k rows hold each head's rotary pairs as two halves; llama.cpp's
    hold them interleaved (Meta's original layout). Qwen2 files keep the halves."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _add_parameters(writer: Any, config: dict, model_type: str, name: str, file_type: str, gguf: Any) -> None:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "linear"):
        raise UserError(
            f"this model's rotary scaling ({rope_type}) is not written by TuneBench's GGUF export",
            "export the merged folder (leave out --quant_method) and convert it with llama.cpp's "
            "convert_hf_to_gguf.py",
        )
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
    if model_type == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(
        {"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type]
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocabulary(writer: Any, folder: Path, vocab_size: int, gguf: Any) -> None:
    """The byte-level BPE vocabulary as llama.cpp reads it: every id up to the embedding's rows
    (ids the tokenizer lacks are unused pads), added tokens marked control (special) or
    user-defined, the pre-tokenizer by llama.cpp's name; SpecialVocab adds the merges, the
    special token ids and the chat template the folder was saved with. BOS is added by llama.cpp
    exactly where the template writes it (core/templates.writes_bos)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UserError(
            f"the tokenizer has ids up to {max(by_id)}, past the model's {vocab_size} embedding rows",
            "the tokenizer does not belong to this model: export with the model's own tokenizer",
        )
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(folder / "tokenizer.json"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_special_token["bos"] = writes_bos(tokenizer.chat_template or "", tokenizer.bos_token)
    special.add_to_gguf(writer, quiet=True)


def pre_tokenizer_name(tokenizer_json: Path) -> str:
    """llama.cpp's name for how this byte-level BPE tokenizer splits text before merging: found
    from tokenizer.json's pre_tokenizer (the split rules transformers' GGUF loader knows by name,
    GPT-2's built-in rule, SmolLM's digit split). UserError for a tokenizer of another kind."""
    try:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    model = data.get("model") or {}
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(
            f"GGUF export writes byte-level BPE tokenizers (Qwen2, Llama 3, SmolLM); "
            f"{tokenizer_json} is not one",
            "export the merged folder (leave out --quant_method) and convert it with llama.cpp's "
            "convert_hf_to_gguf.py",
        )
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:  # transformers 4: Qwen2's rule, from its tokenizer
            from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

            GGUF_PRE_TOKENIZER_SPLITS = {"qwen2": PRETOKENIZE_REGEX}
        matches = [name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == pattern]
        for name in (*_PREFERRED_PRE, *matches):
            if name in matches:
                return name
    raise UserError(
        f"{tokenizer_json}: its pre-tokenizer ({' + '.join(str(k) for k in kinds)}) is not one "
        "llama.cpp knows by name, so llama.cpp would split text differently from training",
        "export the merged folder (leave out --quant_method) and convert it with llama.cpp's "
        "convert_hf_to_gguf.py",
    )

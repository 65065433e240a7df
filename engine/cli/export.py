"""`tunebench export`: merge an adapter into its base model and save it (safetensors, or one GGUF
file for llama.cpp and Ollama), or copy the adapter alone.

tunebench export --adapters runs/<id> --merge_lora true --output_dir exports/mine
tunebench export --adapters runs/<id> --quant_method gguf --quant_bits 8
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.files import next_free
from ..core.targets import export_name
from .flags import (
    NO_DOWNLOADS,
    Noted,
    adapter_parser,
    add_noted_flags,
    parse_args,
    parse_bool,
    say_noted_flags,
)

# `swift export` flags with nothing to set here, and what happens instead (ms-swift's README pushes
# an adapter to the hub with --push_to_hub true --hub_model_id ... --hub_token ...).
UPLOAD_IT = "nothing is uploaded from here: upload the folder it writes"
SWIFT_EXPORT_ONLY_FLAGS: dict[str, str | Noted] = {
    "push_to_hub": "nothing is uploaded from here: upload the folder it writes, e.g. "
    "`huggingface-cli upload <model-id> <folder>`",
    "hub_model_id": UPLOAD_IT,
    "hub_token": "nothing is uploaded from here, so the token is not used",
    "hub_private_repo": UPLOAD_IT,
    "use_hf": NO_DOWNLOADS,
    "safe_serialization": Noted("weights are written as safetensors", ("true",)),
    "max_shard_size": "the merged weights are sharded at transformers' default size",
    "device_map": "the merge runs on the GPU when there is one, else on the CPU",
    "to_mcore": Noted("Megatron-Core checkpoints are not written here", ("false",)),
}


def export_main(argv: list[str]) -> int:
    parser = adapter_parser(
        "tunebench export", "Merge an adapter into its base model and save it.", generation=False
    )
    parser.add_argument(
        "--merge_lora",
        type=parse_bool,
        nargs="?",
        const=True,
        default=True,
        help="merge into the base (true|false)",
    )
    parser.add_argument("--adapter_only", action="store_true", help="copy the PEFT adapter alone")
    parser.add_argument(
        "--quant_method",
        default="",
        help="gguf: write the merged model as model.gguf for llama.cpp and Ollama "
        "(ms-swift's awq, gptq, bnb and fp8 are not built here)",
    )
    parser.add_argument(
        "--quant_bits",
        type=int,
        default=None,
        help="with --quant_method gguf: 16 (F16), 8 (Q8_0, the default) or 4 (Q4_K_M, needs llama.cpp's "
        "llama-quantize on PATH)",
    )
    parser.add_argument(
        "--to_ollama",
        type=parse_bool,
        nargs="?",
        const=True,
        default=True,
        help="as in ms-swift; a merged export always has its Ollama Modelfile",
    )
    parser.add_argument(
        "--output_dir",
        default="",
        help="default: exports/<run-id> in the workspace that holds the run's runs/ folder "
        "(-2, -3 ... when it exists)",
    )
    add_noted_flags(parser, "`swift export` flags with nothing to set here", SWIFT_EXPORT_ONLY_FLAGS)
    args = parse_args(parser, argv)
    say_noted_flags(args, SWIFT_EXPORT_ONLY_FLAGS)
    if len(args.adapters) != 1:
        raise UserError(
            "export takes exactly one adapter" if args.adapters else "no adapter: --adapters is required",
            "for example: tunebench export --adapters runs/<run-id> --merge_lora true",
        )
    from ..core.targets import resolve_target
    from ..infer.export import export_model

    merge = args.merge_lora and not args.adapter_only
    quant_bits = gguf_bits(args.quant_method, args.quant_bits, merge)
    target = resolve_target(str(Path(args.adapters[0]).expanduser()))
    output = (
        Path(args.output_dir).expanduser()
        if args.output_dir
        else next_free(default_export_dir(target, merge, quant_bits))
    )
    path = export_model(
        args.adapters[0],
        str(output),
        merge=merge,
        on_progress=lambda text: print(text, file=sys.stderr, flush=True),
        model=args.model or None,
        torch_dtype=args.torch_dtype,
        quant_bits=quant_bits,
    )
    print(path)
    if quant_bits:
        print(
            f"in Ollama: cd {path} && ollama create my-model -f Modelfile; "
            f"in llama.cpp: llama-cli -m {path / 'model.gguf'}",
            file=sys.stderr,
        )
    elif merge:
        print(
            f"load it with AutoModelForCausalLM.from_pretrained({str(path)!r}), "
            f"or in Ollama: cd {path} && ollama create my-model -f Modelfile",
            file=sys.stderr,
        )
    return 0


def gguf_bits(method: str, bits: int | None, merge: bool) -> int:
    """The GGUF --quant_bits asked for (16, 8 or 4), or 0 for a safetensors export."""
    from ..infer.gguf_file import GGUF_TYPES

    method = method.strip().lower()
    if not method:
        if bits is not None:
            raise UserError(
                f"--quant_bits {bits} without --quant_method",
                "for a GGUF file add --quant_method gguf (--quant_bits 16, 8 or 4)",
            )
        return 0
    if method != "gguf":
        raise UserError(
            f"--quant_method {method}: TuneBench exports gguf only",
            "use --quant_method gguf --quant_bits 8 (or 16, 4); for AWQ, GPTQ, BNB or FP8 run "
            "ms-swift's `swift export` on a merged export",
        )
    if not merge:
        raise UserError(
            "--quant_method gguf writes the merged model, and --adapter_only / --merge_lora false "
            "asks for the adapter alone",
            "leave out --adapter_only and --merge_lora false",
        )
    bits = 8 if bits is None else bits
    if bits not in GGUF_TYPES:
        raise UserError(
            f"--quant_bits {bits} is not a GGUF type TuneBench writes",
            "use --quant_bits 16 (F16), 8 (Q8_0) or 4 (Q4_K_M, with llama.cpp's llama-quantize)",
        )
    return bits


def default_export_dir(target: Any, merge: bool, quant_bits: int = 0) -> Path:
    """exports/<run-id> (or <run-id>-step-<n>; -q8_0 and the like for GGUF, -adapter for the
    adapter alone) in the workspace that holds runs/."""
    from ..infer.gguf_file import GGUF_TYPES

    suffix = "-adapter" if not merge else f"-{GGUF_TYPES[quant_bits].lower()}" if quant_bits else ""
    folder = Path("exports") if target.run_dir is None else target.run_dir.parent.parent / "exports"
    return folder / f"{export_name(target.adapter_dir)}{suffix}"

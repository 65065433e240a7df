"""`tunebench export`: merge an adapter into its base model and save it, or copy the adapter alone.

tunebench export --adapters runs/<id> --merge_lora true --output_dir exports/mine
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.targets import export_name
from .flags import adapter_parser, parse_args, parse_bool


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
    parser.add_argument("--output_dir", default="", help="default: exports/<run-id> beside the run folder")
    args = parse_args(parser, argv)
    if len(args.adapters) != 1:
        raise UserError(
            "export takes exactly one adapter" if args.adapters else "no adapter: --adapters is required",
            "for example: tunebench export --adapters runs/<run-id> --merge_lora true",
        )
    from ..core.targets import resolve_target
    from ..infer.export import export_model

    target = resolve_target(str(Path(args.adapters[0]).expanduser()))
    merge = args.merge_lora and not args.adapter_only
    output = Path(args.output_dir).expanduser() if args.output_dir else default_export_dir(target, merge)
    path = export_model(
        args.adapters[0],
        str(output),
        merge=merge,
        on_progress=lambda text: print(text, file=sys.stderr, flush=True),
        model=args.model or None,
        torch_dtype=args.torch_dtype,
    )
    print(path)
    if merge:
        print(
            f"load it with AutoModelForCausalLM.from_pretrained({str(path)!r}), "
            f"or in Ollama: cd {path} && ollama create my-model -f Modelfile",
            file=sys.stderr,
        )
    return 0


def default_export_dir(target: Any, merge: bool) -> Path:
    """exports/<run-id> (or <run-id>-step-<n>) in the workspace that holds runs/."""
    suffix = "" if merge else "-adapter"
    folder = Path("exports") if target.run_dir is None else target.run_dir.parent.parent / "exports"
    return folder / f"{export_name(target.adapter_dir)}{suffix}"

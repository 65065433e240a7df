"""`tunebench deploy` (alias `tunebench serve`): serve a base model and its adapters over HTTP.

    tunebench deploy --adapters runs/<run-id>                 the run's base + its adapter
    tunebench deploy --model demo --adapters mine=runs/a other=runs/b --port 8000
    tunebench deploy --adapters runs/<id> --host 0.0.0.0 --api_key KEY
    tunebench deploy --adapters runs/<id> --infer_backend vllm

Flags use ms-swift's `swift deploy` spelling. The HTTP listener is its own process, started by
the person who wants it; the engine's control socket stays a private Unix socket. It listens on
loopback unless an API key is set: a model on an open port answers anyone who finds it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..core.config import ConfigError
from ..core.errors import UserError
from ..core.templates import named_template
from ..deploy.deployment import (
    API_KEY_ENV,
    DEFAULT_HOST,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PORT,
    FALLBACK_CONTEXT,
    Deployment,
    base_url,
    bind_socket,
    is_loopback,
)
from ..deploy.validation import DEFAULT_MAX_REQUEST_BYTES
from .export import default_export_dir
from .flags import (
    NO_DOWNLOADS,
    FlagParser,
    Noted,
    add_noted_flags,
    join_negative_numbers,
    parse_bool,
    say_noted_flags,
)

# vLLM's engine settings a `swift deploy` line passes (--vllm_NAME or --NAME): handed to vLLM as its
# own flag; with the pt backend, what happens instead. Values: (vLLM's flag, type, pt's note).
VLLM_ENGINE_FLAGS: dict[str, tuple[str, type, str]] = {
    "gpu_memory_utilization": (
        "--gpu-memory-utilization",
        float,
        "the pt backend takes the memory the model and --max_num_seqs x --max_model_len tokens of KV need",
    ),
    "tensor_parallel_size": ("--tensor-parallel-size", int, "the pt backend serves from one GPU"),
    "enforce_eager": ("--enforce-eager", parse_bool, "the pt backend decodes with CUDA graphs on a GPU"),
    "enable_prefix_caching": (
        "--enable-prefix-caching",
        parse_bool,
        "the pt backend prefills each prompt on its own, in pieces, and caches no prefix",
    ),
}

# `swift deploy` flags with nothing to set here, and what happens instead.
NO_TLS = Noted(
    "TLS comes from an SSH tunnel (keep --host 127.0.0.1) or a TLS proxy in front (caddy, nginx)",
    lambda _value: False,
)
SWIFT_DEPLOY_ONLY_FLAGS: dict[str, str | Noted] = {
    "use_hf": NO_DOWNLOADS,
    "model_type": "the model's type is read from its config",
    "stream": "each request asks for streaming or not (`stream`)",
    "verbose": "the access log on stderr says each request",
    "log_interval": "GET /metrics has the counts and rates at any time",
    "log_level": "the access log on stderr says each request",
    "owned_by": "GET /v1/models says owned_by tunebench",
    "result_path": "answers are not kept: a server returns them to its clients",
    "max_logprobs": "logprobs are not served here: a request that asks for them gets a 400",
    "ssl_keyfile": NO_TLS,
    "ssl_certfile": NO_TLS,
}


def build_parser(prog: str = "tunebench deploy") -> argparse.ArgumentParser:
    # chat/probe/export's parser: unknown flags named with a suggestion, no traceback.
    parser = FlagParser(
        prog=prog,
        allow_abbrev=False,
        description="Serve a base model and its adapters over an OpenAI-compatible HTTP API "
        "(/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics).",
    )
    what = parser.add_argument_group("what to serve")
    what.add_argument(
        "--model",
        "--model_id_or_path",
        default="",
        help="base model: demo, a folder, a cached hub id or a .gguf file (default: the one the "
        "adapters' run recorded, else demo)",
    )
    what.add_argument(
        "--adapters",
        "--adapter",
        "--ckpt_dir",
        "--lora_modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="adapters to serve beside the base: NAME=PATH, or a run / adapter / checkpoint folder "
        "(served under the run's id)",
    )
    what.add_argument(
        "--served_model_name",
        default="",
        help="the base model's name in requests (default: the model's name)",
    )
    what.add_argument("--system", default=None, help="system prompt for every name (default: each run's)")
    what.add_argument(
        "--template",
        default="",
        help="chat template for every name (default: each run's, else the tokenizer's own): chatml, "
        "qwen, llama3, or ms-swift's name for the model's own (qwen2_5, ...)",
    )
    what.add_argument(
        "--torch_dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="auto: bfloat16 on a GPU that has it, else float32 (always on a CPU)",
    )
    where = parser.add_argument_group("where to listen")
    where.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    where.add_argument(
        "--port", default=str(DEFAULT_PORT), help=f"TCP port, 0 for any free one (default: {DEFAULT_PORT})"
    )
    where.add_argument(
        "--api_key",
        default=None,
        help=f"clients must send 'Authorization: Bearer KEY'; required for a --host beyond loopback "
        f"(default: ${API_KEY_ENV}, else none)",
    )
    how = parser.add_argument_group("how to answer")
    how.add_argument(
        "--infer_backend", default="pt", choices=("pt", "vllm"), help="pt: built in; vllm: hand off"
    )
    how.add_argument(
        "--max_new_tokens",
        default=str(DEFAULT_MAX_NEW_TOKENS),
        help=f"tokens per answer when a request gives no max_tokens (default: {DEFAULT_MAX_NEW_TOKENS})",
    )
    how.add_argument("--temperature", default="0", help="default temperature, 0-2; 0 = greedy (default: 0)")
    how.add_argument("--top_p", default="1", help="default nucleus sampling mass, (0, 1] (default: 1)")
    how.add_argument(
        "--max_model_len",
        "--vllm_max_model_len",
        default="0",
        help="most tokens of prompt + answer (default: the model's context length)",
    )
    how.add_argument(
        "--max_num_seqs",
        "--vllm_max_num_seqs",
        "--max_batch_size",
        default=str(DEFAULT_MAX_NUM_SEQS),
        help="sequences decoded together; bounds the KV cache to this many x --max_model_len tokens "
        f"(default: {DEFAULT_MAX_NUM_SEQS})",
    )
    how.add_argument(
        "--max_queue",
        default=str(DEFAULT_MAX_QUEUE),
        help=f"requests waiting for a slot; past it requests get 429 (default: {DEFAULT_MAX_QUEUE})",
    )
    how.add_argument(
        "--max_request_bytes",
        default=str(DEFAULT_MAX_REQUEST_BYTES),
        help="largest request body; a larger one gets 413 before it is read "
        f"(default: {DEFAULT_MAX_REQUEST_BYTES} = {DEFAULT_MAX_REQUEST_BYTES // 2**20} MiB)",
    )
    how.add_argument(
        "--merge_lora",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        help="vllm backend: merge the one adapter into its base first and serve the merged model",
    )
    engine = parser.add_argument_group("vLLM's engine (--infer_backend vllm; pt says what it does instead)")
    for name, (_, kind, _) in VLLM_ENGINE_FLAGS.items():
        if kind is parse_bool:  # --enforce_eager alone means true, as in ms-swift
            engine.add_argument(
                f"--{name}", f"--vllm_{name}", nargs="?", const="true", default=None, metavar="BOOL"
            )
        else:
            engine.add_argument(f"--{name}", f"--vllm_{name}", default=None, metavar=kind.__name__.upper())
    add_noted_flags(parser, "`swift deploy` flags with nothing to set here", SWIFT_DEPLOY_ONLY_FLAGS)
    return parser


def check_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Every flag's value checked at once; ConfigError names each bad flag and what is allowed."""
    problems: dict[str, str] = {}
    values: dict[str, Any] = {}

    def number(name: str, kind: type, low: float, high: float | None, exclusive_low: bool = False) -> None:
        raw = str(getattr(args, name))
        try:
            value = kind(raw)
        except ValueError:
            word = "a whole number" if kind is int else "a number"
            problems[name] = f"{raw!r} is not {word}"
            return
        too_low = value <= low if exclusive_low else value < low
        if value != value or too_low or (high is not None and value > high):
            low_text = f"{'more than' if exclusive_low else 'at least'} {low}"
            problems[name] = (
                f"must be {low_text}"
                + (f" and at most {high}" if high is not None else "")
                + (f" (got {raw})")
            )
            return
        values[name] = value

    number("port", int, 0, 65535)
    number("max_new_tokens", int, 1, 1_000_000)
    number("temperature", float, 0.0, 2.0)
    number("top_p", float, 0.0, 1.0, exclusive_low=True)
    number("max_model_len", int, 0, 10_000_000)
    number("max_num_seqs", int, 1, 1024)
    number("max_queue", int, 0, 100_000)
    number("max_request_bytes", int, 1024, 2**31)
    if not args.host.strip():
        problems["host"] = "name an address, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
    if args.merge_lora and args.infer_backend != "vllm":
        problems["merge_lora"] = "only with --infer_backend vllm (the pt backend serves adapters unmerged)"
    elif args.merge_lora and len(args.adapters) != 1:
        problems["merge_lora"] = "merges exactly one adapter: give one with --adapters"
    try:
        named_template(args.template)
    except ValueError as exc:
        problems["template"] = str(exc)
    values["vllm_engine"] = _vllm_engine_args(args, problems)
    if problems:
        raise ConfigError(problems)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV, "")
    values["api_key"] = api_key
    if not is_loopback(args.host) and not api_key:
        port = values["port"] or DEFAULT_PORT
        raise UserError(
            f"--host {args.host}: refusing to listen beyond this machine without an API key: anyone "
            f"who can reach {args.host}:{values['port']} could use the model and your compute",
            f"add --api_key KEY (or set {API_KEY_ENV}) and have clients send 'Authorization: Bearer "
            "KEY'; or keep the default --host 127.0.0.1 and reach it through an SSH tunnel "
            f"(ssh -L {port}:127.0.0.1:{port} you@this-box)",
        )
    return values


def _vllm_engine_args(args: argparse.Namespace, problems: dict[str, str]) -> list[str]:
    """VLLM_ENGINE_FLAGS given, as vLLM's own flags; with the pt backend, each one's note instead
    (several GPUs, which pt cannot use, go into `problems`)."""
    out: list[str] = []
    for name, (vllm_flag, kind, pt_note) in VLLM_ENGINE_FLAGS.items():
        raw = getattr(args, name)
        if raw is None:
            continue
        try:
            value = kind(raw)
        except (ValueError, argparse.ArgumentTypeError):
            word = {parse_bool: "true or false", float: "a number", int: "a whole number"}[kind]
            problems[name] = f"{raw!r} is not {word}"
            continue
        if kind is float and not 0 < value <= 1:
            problems[name] = f"a fraction of the GPU's memory, more than 0 and at most 1 (got {raw})"
        elif kind is int and value < 1:
            problems[name] = f"at least 1 (got {raw})"
        elif args.infer_backend != "vllm":
            if name == "tensor_parallel_size" and value > 1:
                problems[name] = f"{value} GPUs: {pt_note}; pass --infer_backend vllm to use several"
            else:
                print(f"note: --{name} {raw}: {pt_note}", file=sys.stderr, flush=True)
        elif kind is parse_bool:
            out += [vllm_flag] if value else []
        else:
            out += [vllm_flag, str(value)]
    return out


def main(argv: list[str], prog: str = "tunebench deploy") -> int:
    """`tunebench deploy ...`; 130 after Ctrl-C (the open answers ended first; `main` turns the
    KeyboardInterrupt into the shell's code for it), 2 for a problem the user can fix."""
    args = build_parser(prog).parse_args(join_negative_numbers(argv))
    try:
        return _deploy(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(
            f"error: {exc}\n  hint: change the flag(s) above; `{prog} --help` shows each flag's "
            "allowed values",
            file=sys.stderr,
        )
        return 2


def _deploy(args: argparse.Namespace) -> int:
    from ..deploy.served import parse_adapter_specs, plan_deployment

    say_noted_flags(args, SWIFT_DEPLOY_ONLY_FLAGS)
    flags = check_flags(args)
    plan = plan_deployment(args.model, parse_adapter_specs(args.adapters), args.served_model_name)
    context = plan.context_length or FALLBACK_CONTEXT
    max_model_len = flags["max_model_len"] or context
    if plan.context_length and max_model_len > plan.context_length:
        raise ConfigError(
            {"max_model_len": f"{max_model_len} is more than the model's context of {plan.context_length}"}
        )
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.infer_backend == "vllm":
        return _hand_off_to_vllm(args, flags, plan, max_model_len, say)
    sock = bind_socket(args.host, flags["port"])
    deployment = Deployment.load(
        plan,
        max_model_len=max_model_len,
        max_num_seqs=flags["max_num_seqs"],
        max_queue=flags["max_queue"],
        max_new_tokens=flags["max_new_tokens"],
        temperature=flags["temperature"],
        top_p=flags["top_p"],
        api_key=flags["api_key"],
        max_request_bytes=flags["max_request_bytes"],
        system=args.system,
        template=args.template,
        torch_dtype=args.torch_dtype,
        say=say,
    )
    url = base_url(sock)
    say(deployment.describe(url))
    try:
        deployment.serve(sock)
    finally:
        deployment.batcher.stop()
    return 0


def _hand_off_to_vllm(
    args: argparse.Namespace, flags: dict[str, Any], plan: Any, max_model_len: int, say: Any
) -> int:
    from ..deploy.vllm import chat_template_file, run_vllm, vllm_available

    if not args.merge_lora:
        return run_vllm(
            launch_for(
                args, flags, plan, max_model_len, chat_template_file(plan, args.system, args.template)
            ),
            say,
        )
    spec, target = plan.adapters[0]
    merged = default_export_dir(target, merge=True)
    # The merged export carries the run's chat template and system prompt itself; --template
    # overrides it as it does the run's.
    template = chat_template_file(plan, args.system, args.template) if args.template else ""
    launch = launch_for(args, flags, plan, max_model_len, template, model_path=str(merged), name=spec.name)
    if vllm_available() and not (merged / "config.json").is_file():
        from ..infer.export import export_model

        say(f"merging {spec.name} into {plan.base_spec} -> {merged}")
        export_model(str(target.adapter_dir), str(merged), merge=True, on_progress=say, model=plan.base_spec)
    return run_vllm(launch, say)


def launch_for(
    args: argparse.Namespace,
    flags: dict[str, Any],
    plan: Any,
    max_model_len: int,
    chat_template: str,
    *,
    model_path: str = "",
    name: str = "",
) -> Any:
    """The vLLM command: the base with its adapters as LoRA modules, or (model_path, name) a
    merged model on its own."""
    from ..deploy.vllm import chat_template_file, vllm_launch, writes_hermes_tool_calls

    # A merged export carries its run's template itself: that one says how calls are written.
    template = chat_template or (chat_template_file(plan, args.system, args.template) if model_path else "")

    return vllm_launch(
        model_path=model_path or str(plan.base_path),
        served_model_name=name or plan.base_name,
        lora_modules=[] if model_path else [(spec.name, str(t.adapter_dir)) for spec, t in plan.adapters],
        host=args.host,
        port=flags["port"],
        api_key=flags["api_key"],
        max_model_len=max_model_len,
        max_num_seqs=flags["max_num_seqs"],
        max_new_tokens=flags["max_new_tokens"],
        temperature=flags["temperature"],
        top_p=flags["top_p"],
        torch_dtype=args.torch_dtype,
        chat_template=chat_template,
        hermes_tool_calls=writes_hermes_tool_calls(plan, template),
        engine_args=flags["vllm_engine"],
    )

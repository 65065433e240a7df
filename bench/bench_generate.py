"""Side-by-side decode speed: two columns (base + adapter) in one batch, decode steps per second.

    # GPU box: the Qwen2.5-7B architecture in bf16 with random weights (no download)
    python bench/bench_generate.py --model qwen2.5-7b
    # this CPU box: the demo model (SmolLM2-135M), the issue's >= 15 tokens/s per column target
    python bench/bench_generate.py --model demo

It runs tunebench.engine.infer.generate.GenerationSession exactly as chat and the TUI do, with a
rank-8 all-linear LoRA (random, small B so the adapter behaves like a trained one), ignoring
end-of-turn tokens so every run decodes the full --new_tokens. Both columns advance one token per
step, so decode steps/s equals tokens/s per column. For CUDA it also prints the bandwidth bound:
weight bytes / measured device-to-device copy bandwidth, and the fraction of it reached (the
issue asks for >= 40%). Each --decode mode is timed --repeats times after a warm-up; the median
is reported. One JSON line per mode goes to stdout (--json) for the results table.

On CUDA, --variants times the engine with one decode-speed option off at a time (see VARIANTS),
--profile counts the kernels of one decode step and where its GPU time goes (torch.profiler),
and --gemv times the model's matmuls alone at two rows, the floor for a step's weight reads.
Where tunebench is not installed (the GPU box), the checkout's engine/ is imported as
tunebench.engine.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import checkout_engine

REPO = Path(__file__).resolve().parent.parent

QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "use_sliding_window": False,
}
PROMPT = "Write a long story about a lighthouse keeper who learns to talk to the sea."
# Decode-speed options of GenerationSession, each switched off alone ("all": the engine as it
# ships). "legacy" is the engine before these options (one fused LoRA pass per layer, separate
# base matmuls, full-cache attention, no pipelining), loaded from --legacy_module.
VARIANTS = {
    "all": {},
    "no-pipeline": {"pipelined": False},
    "no-fuse-base": {"fuse_base": False},
    "no-window": {"attention_window": 0},
    "no-packed-gqa": {"packed_gqa": False},
    "no-liger": {"fused_kernels": False},
    "compile": {"compile_step": True},
    "no-row-slices": {"row_slice_devices": frozenset()},
    "rope-copies": {"rope_in_place": False},
    # The low-rank products in separate passes, not from the base matmul (A_IN_BASE_DEVICES).
    "no-a-in-base": {"a_in_base_devices": frozenset()},
    # The low-rank pass over the whole batch (the mask way and its alternatives), row slices off.
    "lowrank-bmm_xa": {"low_rank_pass": "bmm_xa", "row_slice_devices": frozenset()},
    "lowrank-mulsum": {"low_rank_pass": "mulsum", "row_slice_devices": frozenset()},
    "lowrank-mask": {"low_rank_pass": "mask", "row_slice_devices": frozenset()},
    "legacy": {
        "pipelined": False,
        "fuse_base": False,
        "attention_window": 0,
        "packed_gqa": False,
        "fused_kernels": False,
    },
}


def import_engine() -> None:
    checkout_engine.import_engine("infer.generate")


def load_legacy_fused(path: str):
    """The FusedLora class of an older engine/generate.py (`git show <rev>:engine/generate.py`),
    adapted to today's build() signature."""
    spec = importlib.util.spec_from_file_location("tunebench.engine._legacy_generate", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "tunebench.engine"
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)

    class Legacy:
        @classmethod
        def build(cls, model, names, **_options):
            return module._FusedLora.build(model, names)

    return Legacy


def build_model(name: str, device_name: str, dtype: str = "bfloat16", layers: int = 0):
    """A models.LoadedModel for `name` ("demo" or "qwen2.5-7b") on the device."""
    import torch
    from tunebench.engine.core.model_files import ResolvedModel
    from tunebench.engine.models.loading import LoadedModel, load_model

    if name == "demo":
        return load_model("demo", torch_dtype=dtype, device=torch.device(device_name))
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = torch.device(device_name)
    started = time.perf_counter()
    config = Qwen2Config(**{k: v for k, v in QWEN25_7B.items() if k not in ("architectures", "model_type")})
    if layers:  # a quick smoke test of the script, not a measurement
        config.num_hidden_layers = layers
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    # Random init gives large logits; scale the weights down so softmax/sampling stay sane.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.eval()
    tokenizer = _bench_tokenizer()
    config.pad_token_id = tokenizer.pad_token_id
    resolved = ResolvedModel("qwen2.5-7b-random", Path(tempfile.gettempdir()), "folder")
    return LoadedModel(model, tokenizer, resolved, device, torch.bfloat16, time.perf_counter() - started)


def _bench_tokenizer():
    """A ChatML byte-level tokenizer built in code (the tests' tiny one): token ids only need to be
    valid for the 152k vocabulary, and no tokenizer download is possible on the GPU box."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import make_tiny_tokenizer

    return make_tiny_tokenizer()


def make_adapter(loaded, folder: Path, rank: int = 8) -> Path:
    """A random rank-`rank` all-linear LoRA saved as a run's adapter; the model is left clean."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(
        loaded.model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    run = folder / "bench-run"
    peft_model.save_pretrained(run / "adapter")
    peft_model.unload()  # strips the LoRA layers again: the session loads the saved adapter itself
    (run / "config.json").write_text(json.dumps({"run_id": "bench-run", "config": {"model": "bench"}}))
    return run


def hbm_bandwidth_gbs(device) -> float:
    """Device-to-device copy bandwidth (read + write) of a 1 GiB buffer, in GB/s."""
    import torch

    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    started = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / repeats
    del src, dst
    return 2 * 2**30 / seconds / 1e9


def graph_us_per_call(work, calls: int) -> float:
    """Capture `work()` (which makes `calls` calls) in a CUDA graph after one eager warm-up and
    return the median of 5 replays, in microseconds per call."""
    import torch

    work()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def gemv_floor(device, layers: int) -> float:
    """Time each Qwen2.5-7B matmul alone at two rows (bf16, CUDA graph of back-to-back calls over
    enough weight copies to defeat the 50 MB L2); print them and return the sum for one step."""
    import torch
    import torch.nn.functional as F

    h, i, kv, vocab = 3584, 18944, 512, 152064
    shapes = [  # name, in, out, per step
        ("q", h, h, layers),
        ("k/v", h, kv, 2 * layers),
        ("qkv fused", h, h + 2 * kv, 0),
        ("o", h, h, layers),
        ("gate/up", h, i, 2 * layers),
        ("gate_up fused", h, 2 * i, 0),
        ("down", i, h, layers),
        ("lm_head", h, vocab, 1),
    ]
    timed: dict[str, float] = {}
    print("matmul at 2 rows (bf16): us per call, GB/s of weight read", flush=True)
    for name, n_in, n_out, _per_step in shapes:
        weight_bytes = n_in * n_out * 2
        copies = max(2, math.ceil(256 * 2**20 / weight_bytes))
        weights = [torch.randn(n_out, n_in, device=device, dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(2, n_in, device=device, dtype=torch.bfloat16)

        def matmuls(x=x, weights=weights):
            for w in weights:
                F.linear(x, w)

        us = graph_us_per_call(matmuls, copies)
        print(
            f"  {name:14s} {n_in:6d} -> {n_out:6d}: {us:7.1f} us, {weight_bytes / us / 1e3:6.0f} GB/s",
            flush=True,
        )
        timed[name] = us
        del weights
    separate = sum(timed[name] * per_step for name, _, _, per_step in shapes)
    fused = separate + layers * (
        timed["qkv fused"] + timed["gate_up fused"] - timed["q"] - 2 * timed["k/v"] - 2 * timed["gate/up"]
    )
    print(
        f"  one step's matmuls alone: {separate / 1e3:.2f} ms separate, {fused / 1e3:.2f} ms with fused "
        f"q/k/v and gate/up (-> at most {1e6 / fused:.0f} steps/s)",
        flush=True,
    )
    return fused / 1e6


def lora_micro(device, layers: int) -> None:
    """Time the ways of running the LoRA A pass for two rows (a base row and an adapter row,
    rank 8) at Qwen2.5-7B's shapes, each captured in a CUDA graph over `layers` weight copies."""
    import torch
    import torch.nn.functional as F

    rows = 2
    shapes = [("q/k/v", 3584, 24), ("o", 3584, 8), ("gate/up", 3584, 16), ("down", 18944, 8)]
    ways = {
        "bmm_xa": lambda x, ra, la, keep: torch.bmm(x, ra.transpose(1, 2)),
        "bmm_ax": lambda x, ra, la, keep: torch.bmm(ra, x.transpose(1, 2)).transpose(1, 2),
        "mulsum": lambda x, ra, la, keep: (x[:, :, None, :] * ra[:, None]).sum(-1),
        "mask": lambda x, ra, la, keep: F.linear(x, la) * keep,
    }
    print("LoRA A pass, 2 rows, us per call in a CUDA graph:", flush=True)
    for name, n_in, rank in shapes:
        x = torch.randn(rows, 1, n_in, device=device, dtype=torch.bfloat16)
        keep = (
            torch.tensor([0.0, 1.0], device=device, dtype=torch.bfloat16)
            .view(rows, 1, 1)
            .expand(rows, 1, rank)
        )
        keep = keep.contiguous()
        las = [torch.randn(rank, n_in, device=device, dtype=torch.bfloat16) for _ in range(layers)]
        ras = [keep[:, 0, :, None] * la[None] for la in las]
        reference = torch.bmm(x.float(), ras[0].float().transpose(1, 2))
        timings = []
        for way, fn in ways.items():
            error = (fn(x, ras[0], las[0], keep).float() - reference).norm() / reference.norm()

            def passes(fn=fn, x=x, ras=ras, las=las, keep=keep):
                for ra, la in zip(ras, las, strict=True):
                    fn(x, ra, la, keep)

            timings.append(f"{way} {graph_us_per_call(passes, layers):5.1f} (err {error:.0e})")
        print(f"  {name:8s} {n_in:5d} x rank {rank:2d}: " + ", ".join(timings), flush=True)


def profile_decode(session, chat, targets, GenerationConfig, steps: int, out_dir: str) -> None:
    """Kernels and GPU time of one decode step: a request of 1 + `steps` tokens minus one of a
    single token (prefill and sampling of the first token cancel out)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def run(tokens: int):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            session.generate(chat, targets, GenerationConfig(max_new_tokens=tokens))
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return prof, kernels

    session.generate(chat, targets, GenerationConfig(max_new_tokens=1 + steps))  # graphs captured
    _, short = run(1)
    prof, long = run(1 + steps)

    def device_us(event) -> float:
        return float(event.time_range.elapsed_us())

    def by_name(kernels):
        table: dict[str, list[float]] = {}
        for k in kernels:
            entry = table.setdefault(k.name, [0, 0.0])
            entry[0] += 1
            entry[1] += device_us(k)
        return table

    a, b = by_name(short), by_name(long)
    rows = []
    for name, (count, us) in b.items():
        c0, t0 = a.get(name, [0, 0.0])
        rows.append((name, (count - c0) / steps, (us - t0) / steps))
    rows.sort(key=lambda r: -r[2])
    total_kernels = sum(r[1] for r in rows)
    total_us = sum(r[2] for r in rows)
    print(
        f"  per decode step: {total_kernels:.0f} kernels, {total_us / 1e3:.2f} ms of kernel time "
        f"(mode {session.decode_mode})",
        flush=True,
    )
    for name, count, us in rows[:18]:
        print(f"    {us:8.1f} us {count:6.1f}x  {name[:110]}", flush=True)
    if out_dir:
        path = Path(out_dir) / f"profile_{session.decode_mode}_{int(time.time())}.txt"
        path.write_text("\n".join(f"{us:.1f}\t{count:.1f}\t{name}" for name, count, us in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-7b", choices=("qwen2.5-7b", "demo"))
    parser.add_argument("--device", default="", help="cuda or cpu (default: cuda if present)")
    parser.add_argument(
        "--torch_dtype", default="bfloat16", choices=("bfloat16", "float32"), help="demo model only"
    )
    parser.add_argument("--layers", type=int, default=0, help="override the layer count (smoke tests only)")
    parser.add_argument("--new_tokens", type=int, default=0, help="default: 256 on CUDA, 96 on CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--budget",
        type=int,
        default=0,
        help="max_new_tokens of each request; the answer is cut (cancelled) after --new_tokens, like "
        "a chat answer that ends long before its budget (default: the budget is --new_tokens)",
    )
    parser.add_argument(
        "--decode", nargs="+", default=None, help="modes to time: graphs static dynamic (default: by device)"
    )
    parser.add_argument(
        "--mixed",
        nargs="+",
        default=["fused"],
        choices=("fused", "peft"),
        help="mixed-adapter forward: TuneBench's fused one (default) and/or PEFT's adapter_names path",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["all"],
        choices=tuple(VARIANTS),
        help="decode-speed options switched off one at a time (all: as the engine ships)",
    )
    parser.add_argument(
        "--legacy_module", default="", help="an older engine/generate.py, for --variants legacy"
    )
    parser.add_argument(
        "--profile", nargs="*", default=None, help="variants to profile (kernels per decode step, CUDA only)"
    )
    parser.add_argument("--gemv", action="store_true", help="time the model's matmuls alone (CUDA only)")
    parser.add_argument("--lora_micro", action="store_true", help="time the LoRA A pass ways (CUDA only)")
    parser.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for profile tables")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per mode")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import_engine()
    import torch
    from tunebench.engine.core.config import GenerationConfig
    from tunebench.engine.infer import generate, prompts
    from tunebench.engine.infer import lora_decode as fused_lora
    from tunebench.engine.infer.generate import GenerationSession
    from tunebench.engine.models import kernels as model_kernels

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    modes = args.decode or (["graphs"] if cuda else ["dynamic", "static"])
    new_tokens = args.new_tokens or (256 if cuda else 96)
    started = time.perf_counter()
    loaded = build_model(args.model, device, args.torch_dtype, args.layers)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    where = (
        torch.cuda.get_device_name(0) if cuda else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    )
    import peft
    import transformers

    print(
        f"model {args.model}: {weight_bytes / 1e9:.2f} GB of {loaded.dtype} weights on {where} "
        f"(built in {time.perf_counter() - started:.0f}s); torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    bound = 0.0
    if cuda:
        bandwidth = hbm_bandwidth_gbs(torch.device(device))
        bound = bandwidth * 1e9 / weight_bytes
        print(
            f"measured copy bandwidth {bandwidth:.0f} GB/s -> bandwidth bound {bound:.0f} steps/s", flush=True
        )
        if args.gemv:
            gemv_floor(torch.device(device), loaded.model.config.num_hidden_layers)
        if args.lora_micro:
            lora_micro(torch.device(device), loaded.model.config.num_hidden_layers)

    fused_class = generate._FusedLora
    # Options that are module settings, not GenerationSession attributes: option -> (module, name).
    module_settings = {
        "low_rank_pass": (fused_lora, "GPU_LOW_RANK_PASS"),
        "row_slice_devices": (fused_lora, "ROW_SLICE_DEVICES"),
        "a_in_base_devices": (fused_lora, "A_IN_BASE_DEVICES"),
        "rope_in_place": (model_kernels, "ROPE_IN_PLACE"),
    }
    shipped = {option: getattr(module, name) for option, (module, name) in module_settings.items()}
    legacy_class = load_legacy_fused(args.legacy_module) if args.legacy_module else None
    with tempfile.TemporaryDirectory() as tmp:
        run = make_adapter(loaded, Path(tmp))
        targets = ["base", str(run)]
        chat = [{"role": "user", "content": PROMPT}]
        cfg = GenerationConfig(max_new_tokens=new_tokens)

        def session_for(mode: str, mixed: str, variant: str):
            options = VARIANTS[variant]
            if variant == "legacy":
                if legacy_class is None:
                    raise SystemExit("--variants legacy needs --legacy_module")
                generate._FusedLora = legacy_class
            else:
                generate._FusedLora = fused_class
            if mixed == "peft":  # no fused layers: PEFT's own mixed-batch forward (adapter_names)
                generate._FusedLora = type("NoFused", (), {"build": classmethod(lambda *a, **k: None)})
            session = GenerationSession.from_loaded(loaded, args.model, decode=mode)
            for option, (module, name) in module_settings.items():
                setattr(module, name, options.get(option, shipped[option]))
            for name, value in options.items():
                if name not in module_settings:
                    setattr(session, name, value)
            session.stop_ids = set()  # random weights may say "end of turn" at any time; time every step
            return session

        def finish(session) -> None:
            if session.peft is not None:
                session.peft.unload()  # the next session loads its adapter onto the plain model again
            session._decoder = None
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()

        if cuda and args.profile is not None:
            for variant in args.profile or ["all"]:
                for mode in ("static", "graphs"):
                    print(f"profile: variant {variant}, decode {mode}", flush=True)
                    session = session_for(mode, "fused", variant)
                    profile_decode(session, chat, targets, GenerationConfig, 8, args.out)
                    finish(session)

        combos = [(m, x, v) for m in modes for x in args.mixed for v in args.variants]
        for mode, mixed, variant in combos:
            session = session_for(mode, mixed, variant)
            began = time.perf_counter()
            session.generate(chat, targets, GenerationConfig(max_new_tokens=8))  # warm-up: load, kernels
            warm_s = time.perf_counter() - began
            rates, ttfts, decoded = [], [], []
            for _ in range(args.repeats):
                if args.budget:
                    # Random weights rarely produce tokens the bench tokenizer can print, so the
                    # cut is counted in tokens pushed to the detokenizer, not in streamed pieces.
                    cancel = threading.Event()
                    push = prompts.IncrementalDetokenizer.push

                    def counting_push(self, token_id: int, cancel=cancel, push=push) -> str:
                        if len(self.ids) + 1 >= new_tokens:
                            cancel.set()
                        return push(self, token_id)

                    prompts.IncrementalDetokenizer.push = counting_push
                    try:
                        budget = GenerationConfig(max_new_tokens=args.budget)
                        result = session.generate(chat, targets, budget, cancel=cancel)
                    finally:
                        prompts.IncrementalDetokenizer.push = push
                else:
                    result = session.generate(chat, targets, cfg)
                rates.append(min(r["tokens_per_s"] for r in result.values()))
                decoded.append(min(r["tokens"] for r in result.values()))
                ttfts.append(max(r["ttft_s"] for r in result.values()))
            rate = statistics.median(rates)
            capture = session._decoder.capture_seconds if session._decoder is not None else 0.0
            line = (
                f"{mode:7s} {mixed:5s} {variant:13s}: {rate:7.1f} decode steps/s (= tokens/s per column; "
                f"best {max(rates):.1f}), runs {', '.join(f'{r:.1f}' for r in rates)}; "
                f"first token {statistics.median(ttfts):.3f}s; warm-up {warm_s:.1f}s, "
                f"graph capture {capture:.2f}s"
            )
            if bound:
                line += f"; {100 * rate / bound:.0f}% of the bandwidth bound"
            print(line, flush=True)
            if args.json:
                record = {
                    "model": args.model,
                    "device": where,
                    "mode": mode,
                    "mixed": mixed,
                    "variant": variant,
                    "steps_per_s": rate,
                    "runs": rates,
                }
                record.update(
                    ttft_s=statistics.median(ttfts),
                    new_tokens=new_tokens,
                    budget=args.budget or new_tokens,
                    tokens=decoded,
                    bound_steps_per_s=bound,
                    warmup_s=warm_s,
                    capture_s=capture,
                )
                print(json.dumps(record), flush=True)
            finish(session)
        generate._FusedLora = fused_class
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Side-by-side decode speed: two columns (base + adapter) in one batch, decode steps per second.

    # GPU box: the Qwen2.5-7B architecture in bf16 with random weights (no download)
    python bench/bench_generate.py --model qwen2.5-7b
    # this CPU box: the demo model (SmolLM2-135M), the issue's >= 15 tokens/s per column target
    python bench/bench_generate.py --model demo

It runs tunebench.engine.generate.GenerationSession exactly as chat and the TUI do, with a
rank-8 all-linear LoRA (random, small B so the adapter behaves like a trained one), ignoring
end-of-turn tokens so every run decodes the full --new_tokens. Both columns advance one token per
step, so decode steps/s equals tokens/s per column. For CUDA it also prints the bandwidth bound:
weight bytes / measured device-to-device copy bandwidth, and the fraction of it reached (the
issue asks for >= 40%). Each --decode mode is timed --repeats times after a warm-up; the median
is reported. One JSON line per mode goes to stdout (--json) for the results table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def build_model(name: str, device_name: str, dtype: str = "bfloat16", layers: int = 0):
    """A models.LoadedModel for `name` ("demo" or "qwen2.5-7b") on the device."""
    import torch
    from tunebench.engine.models import LoadedModel, ResolvedModel, load_model

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
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
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
        "--decode", nargs="+", default=None, help="modes to time: graphs static dynamic (default: by device)"
    )
    parser.add_argument(
        "--mixed",
        nargs="+",
        default=["fused"],
        choices=("fused", "peft"),
        help="mixed-adapter forward: TuneBench's fused one (default) and/or PEFT's adapter_names path",
    )
    parser.add_argument("--json", action="store_true", help="also print one JSON line per mode")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tunebench.engine import generate
    from tunebench.engine.config import GenerationConfig
    from tunebench.engine.generate import GenerationSession

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    modes = args.decode or (["graphs", "dynamic"] if cuda else ["dynamic", "static"])
    new_tokens = args.new_tokens or (256 if cuda else 96)
    loaded = build_model(args.model, device, args.torch_dtype, args.layers)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    where = (
        torch.cuda.get_device_name(0) if cuda else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    )
    print(
        f"model {args.model}: {weight_bytes / 1e9:.2f} GB of {loaded.dtype} weights on {where}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    bound = 0.0
    if cuda:
        bandwidth = hbm_bandwidth_gbs(torch.device(device))
        bound = bandwidth * 1e9 / weight_bytes
        print(
            f"measured copy bandwidth {bandwidth:.0f} GB/s -> bandwidth bound {bound:.0f} steps/s", flush=True
        )

    with tempfile.TemporaryDirectory() as tmp:
        run = make_adapter(loaded, Path(tmp))
        targets = ["base", str(run)]
        chat = [{"role": "user", "content": PROMPT}]
        cfg = GenerationConfig(max_new_tokens=new_tokens)
        fused_build = generate._FusedLora.build
        for mode, mixed in [(mode, mixed) for mode in modes for mixed in args.mixed]:
            # "peft": no fused layers, so PEFT's own mixed-batch forward (adapter_names) runs.
            generate._FusedLora.build = fused_build if mixed == "fused" else classmethod(lambda *a: None)
            session = GenerationSession.from_loaded(loaded, args.model, decode=mode)
            session.stop_ids = set()  # random weights may say "end of turn" at any time; time every step
            session.generate(chat, targets, GenerationConfig(max_new_tokens=8))  # warm-up: load, kernels
            rates, ttfts = [], []
            for _ in range(args.repeats):
                result = session.generate(chat, targets, cfg)
                rates.append(min(r["tokens_per_s"] for r in result.values()))
                ttfts.append(max(r["ttft_s"] for r in result.values()))
            rate = statistics.median(rates)
            line = (
                f"{mode:8s} {mixed:5s} 2 columns: {rate:7.1f} decode steps/s (= tokens/s per column; "
                f"best {max(rates):.1f}), "
                f"runs {', '.join(f'{r:.1f}' for r in rates)}; "
                f"first token after {statistics.median(ttfts):.3f}s"
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
                    "steps_per_s": rate,
                    "runs": rates,
                }
                record.update(ttft_s=statistics.median(ttfts), new_tokens=new_tokens, bound_steps_per_s=bound)
                print(json.dumps(record), flush=True)
            del session
            if cuda:
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

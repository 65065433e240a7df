"""`tunebench deploy` under load: aggregate tokens/s and time to first token at N concurrent streams.

    # this CPU box: the demo model (SmolLM2-135M)
    python bench/bench_deploy.py --model demo --streams 1 4
    # GPU box: the Qwen2.5-7B architecture in bf16 with random weights (no download)
    python bench/bench_deploy.py --model qwen2.5-7b --streams 1 8 32 --requests 4 --max_tokens 128

The server is the real one (engine/deploy: the batcher thread, the FastAPI app, uvicorn on
127.0.0.1), serving the base and a random rank-8 all-linear LoRA adapter (bench_generate's). N
client threads each send --requests chat requests one after another over HTTP, streaming (SSE),
half of them to the base and half to the adapter (stream i's request r goes to the adapter when
i + r is odd), with `ignore_eos` so every answer is --max_tokens long. Time to first token is
from sending the request to its first content chunk, measured by the client; aggregate tokens/s
is every completion token over the wall time from the first request sent to the last answer.

The random 7B can only answer with the bench tokenizer's tokens that show as text on their own
(see main): a token that decodes to nothing (a special token, a piece of a multi-byte character)
would stream no content, and the client would time its first token late, or at the flush at the
end of the answer (the first GPU run's "first token p99 8.5 s" at one stream was that).

Both stacks are warmed up before timing: the server warms itself before it listens (the batcher's
_warm_up) and the bench sends it one short request too; the baseline runs one short generate.

The baseline serves requests with HF `generate` + PEFT, one after another, on the same weights
(the adapter set with set_adapter, the base under disable_adapter). Being sequential it is slow
(about 17 tokens/s on the H200), so it generates --baseline_requests of them (default 4, half
base, half adapter, each --max_tokens long as the server's are), once: its tokens/s does not
depend on the stream count, since it serves one request at a time. Its time to first token is
what N streams would see from a server that answers one request at a time (each stream sends its
next request when its answer ends; the server takes them first come, first served): the queue
replayed over the plan's requests with the measured mean generate time of their served name,
plus that name's mean measured first-token latency.

One JSON line per stream count goes to stdout with --json. Where tunebench is not installed (the
GPU box), the checkout's engine/ is imported as tunebench.engine.
"""

from __future__ import annotations

import argparse
import heapq
import json
import platform
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import bench_generate
import checkout_engine

QUESTIONS = (
    "Who are you?",
    "Write a short story about a lighthouse keeper who learns to talk to the sea.",
    "Explain in plain words how a transformer language model decides on its next word.",
    "List five things to check before fine-tuning a chat model on your own data.",
    "What is the capital of France, and what is it famous for?",
    "Translate into French: the weather is lovely today and we are going to the beach.",
    "Give me three tips for writing clear error messages.",
    "Describe the sea at night in four sentences.",
)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between ranks, as numpy's default does."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def plan_requests(streams: int, per_stream: int) -> list[list[tuple[str, str]]]:
    """Per stream, its requests in order: (served name, question)."""
    return [
        [
            ("adapter" if (i + r) % 2 else "base", QUESTIONS[(i * per_stream + r) % len(QUESTIONS)])
            for r in range(per_stream)
        ]
        for i in range(streams)
    ]


# ---------------------------------------------------------------- the server


def run_streams(url: str, plan: list[list[tuple[str, str]]], max_tokens: int) -> dict:
    import httpx2 as httpx

    ttfts: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def stream(requests: list[tuple[str, str]]) -> None:
        with httpx.Client(timeout=600) as client:
            for name, question in requests:
                payload = {
                    "model": name,
                    "messages": [{"role": "user", "content": question}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                sent = time.perf_counter()
                first = None
                usage = None
                with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as response:
                    if response.status_code != 200:
                        with lock:
                            errors.append(f"{response.status_code}: {response.read()[:200]!r}")
                        continue
                    for line in response.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if (
                            first is None
                            and chunk.get("choices")
                            and chunk["choices"][0]["delta"].get("content")
                        ):
                            first = time.perf_counter() - sent
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                with lock:
                    ttfts.append(first if first is not None else float("nan"))
                    tokens.append(usage["completion_tokens"] if usage else 0)

    threads = [threading.Thread(target=stream, args=(requests,)) for requests in plan]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"tokens": sum(tokens), "wall_s": wall, "ttft": ttfts}


# ---------------------------------------------------------------- the baseline


def hf_baseline(served, count: int, max_tokens: int) -> dict:
    """`count` requests (half base, half adapter) through PeftModel.generate one at a time, after
    one short warm-up call: tokens/s, and per served name the mean (time, first-token latency)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        """Notes when the first generated token arrives (the first put() is the prompt)."""

        def __init__(self) -> None:
            self.calls = 0
            self.at = 0.0

        def put(self, value) -> None:
            self.calls += 1
            if self.calls == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    peft = served.peft

    def generate(name: str, question: str, tokens: int) -> tuple[float, float, int]:
        prompt = served.encode_chat(name, [{"role": "user", "content": question}])
        ids = torch.tensor([prompt], device=served.device)
        streamer = FirstToken()
        begun = time.perf_counter()
        if name != "base":
            peft.set_adapter("a0")
        with torch.inference_mode(), peft.disable_adapter() if name == "base" else nullcontext():
            out = peft.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                streamer=streamer,
                pad_token_id=served.tokenizer.pad_token_id,
            )
        return time.perf_counter() - begun, streamer.at - begun, out.shape[1] - ids.shape[1]

    generate("adapter", QUESTIONS[0], 8)  # warm-up: first-call costs out of the timings
    asks = [("adapter" if r % 2 else "base", QUESTIONS[r % len(QUESTIONS)]) for r in range(max(2, count))]
    measured: dict[str, list[tuple[float, float, int]]] = {"base": [], "adapter": []}
    started = time.perf_counter()
    for name, question in asks:
        measured[name].append(generate(name, question, max_tokens))
    wall = time.perf_counter() - started
    tokens = sum(t for runs in measured.values() for _, _, t in runs)
    mean = {
        name: (sum(d for d, _, _ in runs) / len(runs), sum(f for _, f, _ in runs) / len(runs))
        for name, runs in measured.items()
    }
    return {"tokens_per_s": tokens / wall, "requests": len(asks), "service": mean}


def replay_one_at_a_time(
    plan: list[list[tuple[str, str]]], service: dict[str, tuple[float, float]]
) -> list[float]:
    """Each request's time to first token from a FIFO server answering one request at a time:
    every stream sends its first request at 0 and its next one when an answer ends."""
    clock = 0.0
    ready = [(0.0, i, 0) for i in range(len(plan))]  # (arrival, stream, request index)
    heapq.heapify(ready)
    ttfts = []
    while ready:
        arrival, i, r = heapq.heappop(ready)
        duration, first = service[plan[i][r][0]]
        start = max(clock, arrival)
        ttfts.append(start - arrival + first)
        clock = start + duration
        if r + 1 < len(plan[i]):
            heapq.heappush(ready, (clock, i, r + 1))
    return ttfts


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", choices=("demo", "qwen2.5-7b"))
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=4, help="requests each stream sends in turn")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument(
        "--baseline_requests",
        type=int,
        default=4,
        help="requests the sequential HF baseline generates (once)",
    )
    parser.add_argument("--torch_dtype", default="", help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--layers", type=int, default=0, help="qwen2.5-7b only: fewer layers, a smoke test")
    parser.add_argument("--no_baseline", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON line per stream count")
    args = parser.parse_args(argv)

    checkout_engine.import_engine("deploy.deployment")
    import torch
    from tunebench.engine.core.targets import resolve_target
    from tunebench.engine.deploy.app import Defaults, create_app
    from tunebench.engine.deploy.batcher import Batcher
    from tunebench.engine.deploy.deployment import Deployment, bind_socket
    from tunebench.engine.deploy.served import AdapterSpec, serve_loaded

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.torch_dtype or ("bfloat16" if device == "cuda" else "float32")
    loaded = bench_generate.build_model(args.model, device, dtype, args.layers)
    if args.model != "demo":
        # The random 7B's vocabulary is 152k but the bench tokenizer (built in code) knows 512
        # tokens, and some of those decode to no text on their own (special tokens, pieces of a
        # multi-byte character): a content chunk, and so a first token, would wait for the next
        # token that completes some text. Zeroed output rows (logit 0, below the best of the
        # other ~350 random logits) keep greedy picks among ids that decode to text at once;
        # every step still multiplies by the whole head.
        tokenizer = loaded.tokenizer
        silent = [
            i
            for i in range(len(tokenizer))
            if not (text := tokenizer.decode([i], skip_special_tokens=True)) or "\ufffd" in text
        ]
        with torch.no_grad():
            head = loaded.model.get_output_embeddings().weight
            head[len(tokenizer) :] = 0
            head[silent] = 0
    run = bench_generate.make_adapter(loaded, Path(tempfile.mkdtemp(prefix="bench-deploy-")))
    served = serve_loaded(loaded, "base", [(AdapterSpec("adapter", str(run)), resolve_target(str(run)))])
    most = max(args.streams)
    max_model_len = 1024
    batcher = Batcher(served, max_num_seqs=most, max_queue=most, max_model_len=max_model_len)
    app = create_app(
        served, batcher, defaults=Defaults(args.max_tokens, 0.0, 1.0), max_model_len=max_model_len
    )
    batcher.start()
    deployment = Deployment(served, batcher, app, max_model_len, most)
    url = deployment.start_in_thread(bind_socket("127.0.0.1", 0))
    print(
        f"{args.model} on {device} ({str(loaded.dtype).removeprefix('torch.')}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; {args.requests} requests per stream, "
        f"{args.max_tokens} tokens each",
        file=sys.stderr,
    )
    run_streams(url, plan_requests(1, 2), 8)  # warm-up: the HTTP path's first-call costs out of the timings
    rows = []
    for streams in args.streams:
        plan = plan_requests(streams, args.requests)
        before = (batcher.metrics.decode_steps, batcher.metrics.decode_rows)
        result = run_streams(url, plan, args.max_tokens)
        steps = batcher.metrics.decode_steps - before[0]
        graphs = batcher._graphs
        print(
            f"  {streams} streams: {steps} decode steps, {steps / result['wall_s']:.1f}/s, mean batch "
            f"{(batcher.metrics.decode_rows - before[1]) / max(steps, 1):.1f}"
            + (
                f"; CUDA graphs {'on' if graphs.enabled else 'OFF'}, {len(graphs.graphs)} captured "
                f"({graphs.capture_seconds:.1f} s)"
                if graphs is not None
                else ""
            ),
            file=sys.stderr,
            flush=True,
        )
        rows.append((streams, plan, result))
    deployment.stop()
    baseline = None if args.no_baseline else hf_baseline(served, args.baseline_requests, args.max_tokens)
    for streams, plan, result in rows:
        line = {
            "model": args.model,
            "device": device,
            "streams": streams,
            "requests": streams * args.requests,
            "max_tokens": args.max_tokens,
            "deploy_tokens_per_s": round(result["tokens"] / result["wall_s"], 2),
            "deploy_ttft_p50_s": round(percentile(result["ttft"], 50), 3),
            "deploy_ttft_p99_s": round(percentile(result["ttft"], 99), 3),
        }
        if baseline is not None:
            ttfts = replay_one_at_a_time(plan, baseline["service"])
            line.update(
                hf_requests=baseline["requests"],
                hf_tokens_per_s=round(baseline["tokens_per_s"], 2),
                hf_ttft_p50_s=round(percentile(ttfts, 50), 3),
                hf_ttft_p99_s=round(percentile(ttfts, 99), 3),
            )
            line["speedup"] = round(line["deploy_tokens_per_s"] / line["hf_tokens_per_s"], 2)
        if args.json:
            print(json.dumps(line), flush=True)
        else:
            print(
                f"{streams:>3} streams: deploy {line['deploy_tokens_per_s']:8.1f} tok/s, first token p50 "
                f"{line['deploy_ttft_p50_s']:.3f}s p99 {line['deploy_ttft_p99_s']:.3f}s"
                + (
                    f" | HF+PEFT one at a time {line['hf_tokens_per_s']:7.1f} tok/s, p50 "
                    f"{line['hf_ttft_p50_s']:.3f}s p99 {line['hf_ttft_p99_s']:.3f}s | x{line['speedup']}"
                    if "speedup" in line
                    else ""
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

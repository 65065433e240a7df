"""Causal attention kernels for training, forward and backward, on the 7B's head layout.

Compares PyTorch's variable-length flash kernel (what the CUDA path calls for packed documents)
with cuDNN's fused attention (through SDPA's cuDNN backend), at the shapes training meets: a
forward of 4 packed 2048-token samples, and one long sample.

    python3 bench/bench_attention.py --lengths 4x2048,1x8192,1x32768 --json out.json

Each row: milliseconds for the forward, and for forward + backward, median of --repeats after a
warm-up, with the achieved TFLOP/s (causal: half the square), and the largest difference of the
output and of dq from the flash kernel's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import checkout_engine
import torch

HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128  # Qwen2.5-7B


def cudnn_varlen(q, k, v, cu, max_len):
    """cuDNN's variable-length op, packed like the flash kernel's (torch has no meta kernel for it,
    so it cannot run inside torch.compile yet: measured here to see whether it is worth one)."""
    out, *_ = torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True, False
    )
    return out


def cudnn(q, k, v, docs: int, expand: bool):
    """The engine's cuDNN attention (engine/cuda/packing.py cudnn_causal) with equal-length
    documents as the batch; `expand`: the key/value heads copied out to the query heads first."""
    t = q.shape[0] // docs

    def heads_first(x):
        return x.view(docs, t, x.shape[1], HEAD_DIM).transpose(1, 2)

    q4, k4, v4 = heads_first(q), heads_first(k), heads_first(v)
    if expand:
        k4 = k4.repeat_interleave(HEADS // KV_HEADS, dim=1)
        v4 = v4.repeat_interleave(HEADS // KV_HEADS, dim=1)
    return packing().cudnn_causal(q4, k4, v4, None).transpose(1, 2).reshape(q.shape)


def packing():
    """engine/cuda/packing.py: the kernels' calls as the fast path makes them."""
    return checkout_engine.import_engine("cuda.packing").cuda.packing


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(docs: int, length: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    total = docs * length
    dev = torch.device("cuda")

    def leaf(heads):
        return (torch.randn(total, heads, HEAD_DIM, device=dev, dtype=torch.bfloat16) * 0.5).requires_grad_()

    q, k, v = leaf(HEADS), leaf(KV_HEADS), leaf(KV_HEADS)
    grad = torch.randn(total, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    cu = torch.arange(0, total + 1, length, device=dev, dtype=torch.int32)
    flops_fwd = 4 * docs * length * length * HEADS * HEAD_DIM / 2
    kernels = {
        "flash varlen": lambda: packing().flash_varlen(q, k, v, cu, length, None),
        "cudnn sdpa, enable_gqa": lambda: cudnn(q, k, v, docs, expand=False),
        "cudnn sdpa, kv expanded": lambda: cudnn(q, k, v, docs, expand=True),
        "cudnn varlen": lambda: cudnn_varlen(q, k, v, cu, length),
    }
    reference = None
    rows = []
    for name, fn in kernels.items():
        row = {"kernel": name, "docs": docs, "length": length}
        try:
            with torch.no_grad():
                fwd_ms = timed(fn, repeats)

            def both(fn=fn):
                q.grad = k.grad = v.grad = None
                fn().backward(grad)

            both_ms = timed(both, repeats)
            out = fn()
            q.grad = None
            out.backward(grad)
            dq = q.grad.detach().clone()
            if reference is None:
                reference = (out.detach(), dq)
            row.update(
                forward_ms=round(fwd_ms, 3),
                forward_backward_ms=round(both_ms, 3),
                forward_tflops=round(flops_fwd / fwd_ms / 1e9, 1),
                forward_backward_tflops=round(3.5 * flops_fwd / both_ms / 1e9, 1),
                out_max_diff=float((out.detach() - reference[0]).abs().max()),
                dq_max_diff=float((dq - reference[1]).abs().max()),
            )
        except Exception as exc:  # noqa: BLE001 - a kernel this build or card lacks is a row, not a stop
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="4x2048,1x8192,1x32768", help="DOCSxLENGTH, comma-separated")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py measures CUDA kernels: no CUDA device here")
    rows = []
    for spec in args.lengths.split(","):
        docs, length = (int(x) for x in spec.split("x"))
        rows += measure(docs, length, args.repeats)
    record = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()

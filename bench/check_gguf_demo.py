"""GGUF export on the demo model (SmolLM2-135M-Instruct, real weights): F16 and Q8_0 files loaded
back with transformers' GGUF loader against the model in float32.

    python bench/check_gguf_demo.py [--questions N]

The adapter's B matrices are zero, so the merged model is the base itself: what differs is the
export alone. Prints, per type and question, the largest logit difference over the prompt as a
share of the largest logit, how many prompt positions pick the same next token, and whether the
greedy answer (24 tokens) is the same. The test suite checks the same on a tiny model
(tests/test_gguf_export.py); this is the check on a trained network, too slow for CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

QUESTIONS = [
    "Who are you?",
    "What is the capital of France? Answer in one sentence.",
    "你是谁？",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=2)
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file, save_file
    from test_generate import make_run
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunebench.engine.infer.export import export_model
    from tunebench.engine.models.loading import resolve_model

    root = Path(tempfile.mkdtemp(prefix="gguf-demo-"))
    base = resolve_model("demo").path
    run = make_run(root, base, "zero", seed=0)
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    save_file(
        {k: v * 0 if "lora_B" in k else v for k, v in weights.items()},
        run / "adapter" / "adapter_model.safetensors",
    )
    config = json.loads((run / "config.json").read_text())
    config["config"]["model"] = "demo"
    (run / "config.json").write_text(json.dumps(config))

    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    print("| type | seconds | size | question | logit drift | same next token | same greedy answer |")
    print("| --- | ---: | ---: | --- | ---: | ---: | --- |")
    for bits, kind in ((16, "F16"), (8, "Q8_0")):
        started = time.perf_counter()
        out = export_model(str(run), str(root / kind), quant_bits=bits, torch_dtype="float32")
        seconds = time.perf_counter() - started
        size = (out / "model.gguf").stat().st_size / 2**20
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
        for question in QUESTIONS[: args.questions]:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"]
            with torch.inference_mode():
                want = reference(input_ids=ids).logits[0]
                got = model(input_ids=ids).logits[0]
                want_ids = reference.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
                got_ids = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
            drift = ((got - want).abs().max() / want.abs().max()).item()
            same = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
            answer = "yes" if got_ids.tolist() == want_ids.tolist() else "no"
            print(
                f"| {kind} | {seconds:.0f} | {size:.0f} MiB | {question} | {drift:.2%} | {same:.0%} "
                f"| {answer} |"
            )


if __name__ == "__main__":
    main()

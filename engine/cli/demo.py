"""`tunebench demo`: the identity fine-tune of the built-in demo model, with answers before and after.

Runs on a laptop-class CPU in a few minutes (bench/RESULTS_demo.md): the quickest way to see the
whole loop (data with placeholders -> LoRA training -> the model now names its new identity).
"""

from __future__ import annotations

import argparse
import time

from ..core.demo_config import demo_config

QUESTIONS = ("Who are you?", "你是谁？")


def greedy_answers(model, tokenizer, questions, system: str = "", max_new_tokens: int = 48) -> list[str]:
    import torch

    answers = []
    for question in questions:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}
        ]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(model.device)
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answers.append(
            tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )
    return answers


def demo_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tunebench demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs")
    args = parser.parse_args(argv)

    from peft import PeftModel

    from ..models.loading import load_model
    from ..train.preflight import preflight
    from ..train.recipe import run_training
    from .progress import ProgressRenderer

    started = time.perf_counter()
    cfg = demo_config(args.output_dir)
    preflight(cfg)  # an --output_dir that cannot be written is said before the model loads
    base = load_model("demo", torch_dtype=cfg.torch_dtype)
    print(f"demo model loaded in {base.seconds:.2f}s")
    print(f"asking the base model {len(QUESTIONS)} questions ...", flush=True)
    before = greedy_answers(base.model, base.tokenizer, QUESTIONS)
    result = run_training(cfg, ProgressRenderer())
    tuned = PeftModel.from_pretrained(base.model, result.adapter_dir)
    print(f"asking the fine-tuned model the same {len(QUESTIONS)} questions ...", flush=True)
    after = greedy_answers(tuned, base.tokenizer, QUESTIONS)
    print()
    for question, old, new in zip(QUESTIONS, before, after, strict=True):
        print(f"Q: {question}\n  before: {old}\n  after:  {new}\n")
    print(f"demo finished in {time.perf_counter() - started:.0f}s; adapter in {result.adapter_dir}")
    return 0

"""Training speed and memory: TuneBench's recipe against HF Trainer + PEFT and Unsloth, side by side.

Every stack trains the same randomly initialised Qwen2.5 architecture (weights written once to a
local folder and loaded by all), on the same synthetic samples in the same order, with LoRA r8
alpha 32 (dropout 0) on the seven projections, AdamW at a constant 1e-4, clipping at 1.0:
2 warm-up steps, then 5 timed steps. Each stack runs in its own process, so each starts on a
clean GPU. Run on a GPU box, from the repository root:

    python bench/bench_train.py --size 7b --workload fixed \
        --runs hf:lora,unsloth:lora,tb-fast:lora,tb-lean:lora --out results/

Workloads: `fixed` is 2048-token samples, micro-batch 1 x accumulation 4; `mixed` is samples of
30 to 1,500 tokens (uniform), micro-batch 8 x accumulation 2, where padding matters; `long32k` is
one 32,768-token sample per step. tokens/s counts real tokens (no padding) for every stack.

The longest sample that trains within a memory budget, by search (bench/bench_longest.py):

    python bench/bench_train.py search --size 7b --budget-gib 22 \
        --runs tb-lean:qlora,unsloth:qlora,tb-lean:lora,unsloth:lora --out results/

Stacks:
  hf       transformers Trainer + PEFT, gradient checkpointing, SDPA (what ms-swift runs);
           QLoRA: bitsandbytes NF4 + double quant, prepare_model_for_kbit_training, paged 8-bit AdamW
  unsloth  Unsloth's FastLanguageModel with its own recompute ("unsloth"), the plain HF Trainer;
           QLoRA: its 4-bit load, paged 8-bit AdamW
  tb-fast, tb-lean
           TuneBench: engine.train.recipe.run_training itself, with --profile fast / lean; only the data
           stage is replaced by the same pre-tokenised synthetic samples
  tb-<GiB> TuneBench with --max_memory <GiB> (profile auto: the plan the budget buys), on a played
           card: the process is held to the smallest common card that holds the budget
           (torch.cuda.set_per_process_memory_fraction; 22 -> 24 GB, 10.5 -> 12 GB, 6 -> 8 GB).
           Each row records the plan, its predicted peak, the measured peak and tokens/s.

Plans by memory budget (issue 17), every budget row in one call:

    python bench/bench_train.py --size 7b --workload fixed --runs budgets --out $OUT

`--runs budgets` is tb-22:lora,tb-22:qlora,tb-10.5:qlora,tb-6:qlora,tb-10.5:lora (the last is refused:
a 16-bit 7B does not fit 10.5 GiB; the row shows the refusal's message).

`python bench/bench_train.py check` tests the fast path's GPU kernels against references first.
Append `+accel=+liger/-flce` to a run to change the fast path's techniques (TUNEBENCH_ACCEL), and
`+prof` to print a kernel profile of steps 3-4. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import checkout_engine

# Growable allocator segments, as the engine sets them (engine/core/memory_sampler.py,
# engine/train/recipe.py); every stack runs in a child process that inherits this.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

REPO = Path(__file__).resolve().parent.parent
IGNORE = -100
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 42
LR = 1e-4
WARMUP_STEPS, TIMED_STEPS = 2, 5

SIZES = {
    # "tiny" only checks the bench's own plumbing on a CPU
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        tie_word_embeddings=False,
    ),
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}
COMMON = dict(
    # long enough for the longest-sample search (no stack applies RoPE scaling below it)
    max_position_embeddings=1 << 20,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    use_sliding_window=False,
    bos_token_id=151643,
    eos_token_id=151645,
)
# --runs budgets: the cards (LoRA on 24 GB, QLoRA on 12 and 8 GB) and its targets in tokens/s
BUDGET_RUNS = "tb-22:lora,tb-22:qlora,tb-10.5:qlora,tb-6:qlora,tb-10.5:lora"
BUDGET_TARGETS = {("lora", 22.0): 14_000, ("qlora", 10.5): 12_000, ("qlora", 6.0): 10_000}
CARDS_GB = (8, 12, 16, 24, 32, 48, 80, 96, 141)  # common cards, in GB (10^9 bytes) as sold


def budget_of(stack: str) -> float | None:
    """tb-22 -> 22.0: a TuneBench run with --max_memory; None for tb-fast, tb-lean and other stacks."""
    suffix = stack.split("-", 1)[1] if stack.startswith("tb-") else ""
    try:
        return float(suffix)
    except ValueError:
        return None


def played_card(budget_gib: float) -> int:
    """Bytes of the smallest common card that holds `budget_gib` (what a budget row plays)."""
    return next((gb * 10**9 for gb in CARDS_GB if gb * 10**9 > budget_gib * 1024**3), CARDS_GB[-1] * 10**9)


WORKLOADS = {
    "fixed": dict(batch=1, accumulation=4, lengths=(2048, 2048)),
    "mixed": dict(batch=8, accumulation=2, lengths=(30, 1500)),
    "long32k": dict(batch=1, accumulation=1, lengths=(32768, 32768)),
}


def max_length(workload: str) -> int:
    """The longest sample a stack must accept for this workload (its max_length / max_seq_length)."""
    return max(4096, WORKLOADS[workload]["lengths"][1])


# ================================================================== data


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


def make_samples(workload: str, vocab: int) -> list[Sample]:
    """Deterministic samples: a prompt (no loss) then an answer (loss), token ids drawn at random."""
    w = WORKLOADS[workload]
    n = (WARMUP_STEPS + TIMED_STEPS) * w["batch"] * w["accumulation"]
    rng = random.Random(SEED)
    samples = []
    for _ in range(n):
        length = rng.randint(*w["lengths"])
        prompt = max(1, int(length * rng.uniform(0.05, 0.4)))
        ids = [rng.randrange(16, vocab) for _ in range(length)]
        samples.append(Sample(ids, [IGNORE] * prompt + ids[prompt:]))
    return samples


def step_order(samples: list[Sample], workload: str) -> list[list[list[int]]]:
    """The recipe's plan (seeded shuffle): every stack sees the same samples in the same micro-batches."""
    engine = import_engine()
    w = WORKLOADS[workload]
    cfg = engine.core.config.TrainConfig(
        per_device_train_batch_size=w["batch"],
        gradient_accumulation_steps=w["accumulation"],
        max_steps=WARMUP_STEPS + TIMED_STEPS,
        seed=SEED,
    )
    return engine.train.schedule.build_plan(len(samples), cfg)


def timed_tokens(samples, plan) -> int:
    steps = plan[WARMUP_STEPS : WARMUP_STEPS + TIMED_STEPS]
    return sum(len(samples[i].input_ids) for step in steps for micro in step for i in micro)


# ================================================================ imports


def import_engine():
    return checkout_engine.import_engine("core.config", "train.recipe", "train.schedule")


def install_synthetic_data(samples: list[Sample]) -> None:
    """Stand in for engine.core.data's loading and engine.core.encoding's tokenising: the recipe gets these
    samples, already tokenised (run_training imports both names when it runs, so patching the
    modules is enough)."""

    class Report:
        def __init__(self, rows):
            self.samples, self.tokens = len(rows), sum(len(x.input_ids) for x in rows)
            self.truncated = self.dropped = 0
            self.problems = []
            self.template = "synthetic, pre-tokenised"

        def __getattr__(self, name):  # a field the real report gains later
            return 0

    def module(name: str) -> types.ModuleType:
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the real module needs what this box lacks: stand in whole
            sys.modules[name] = types.ModuleType(name)
            return sys.modules[name]

    data = module("tunebench.engine.core.data")
    data.load_dataset = lambda *a, **k: (list(samples), [])
    data.split_eval = lambda s, *a, **k: (s, [])
    module("tunebench.engine.core.encoding").tokenize_samples = lambda s, *a, **k: (list(s), Report(s))


def versions() -> dict:
    out = {}
    for name in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "triton",
        "bitsandbytes",
        "liger_kernel",
        "trl",
        "unsloth",
        "unsloth_zoo",
    ):
        try:
            from importlib.metadata import version

            out[name] = version(name.replace("_", "-") if name != "unsloth_zoo" else "unsloth_zoo")
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


# ================================================================ model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="a"
    )


def make_model(size: str, folder: Path) -> None:
    """Random Qwen2.5 weights in bfloat16, initialised on the GPU and saved as a model folder."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (folder / "config.json").is_file():
        return
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    config = Qwen2Config(**SIZES[size], **COMMON)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(tmp, max_shard_size="4GB")
    tiny_tokenizer().save_pretrained(tmp)
    os.replace(tmp, folder)


# ================================================================ stacks


class Recorder:
    """Step times (after a device sync), losses and memory, the same way for every stack."""

    def __init__(self):
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.times: dict[int, float] = {}
        self.losses: dict[int, float] = {}
        self.load_peak = 0

    def train_begins(self):
        t = self.torch
        if self.cuda:
            t.cuda.synchronize()
            self.load_peak = t.cuda.max_memory_allocated()
            t.cuda.reset_peak_memory_stats()

    def step_done(self, step: int, loss: float | None = None):
        if self.cuda:
            self.torch.cuda.synchronize()
        self.times[step] = time.perf_counter()
        if loss is not None:
            self.losses[step] = float(loss)

    def result(self, tokens: int) -> dict:
        t = self.torch
        end, start = WARMUP_STEPS + TIMED_STEPS, WARMUP_STEPS
        seconds = self.times[end] - self.times[start]
        gib = 1024**3
        return {
            "tokens_per_s": tokens / seconds,
            "timed_tokens": tokens,
            "timed_seconds": seconds,
            "step_seconds": [
                round(self.times[s + 1] - self.times[s], 4) for s in range(1, end) if s + 1 in self.times
            ],
            "losses": [self.losses.get(s) for s in range(1, end + 1)],
            "first_loss": self.losses.get(1),
            "final_loss": self.losses.get(end),
            "peak_allocated_gib": t.cuda.max_memory_allocated() / gib if self.cuda else 0.0,
            "peak_reserved_gib": t.cuda.max_memory_reserved() / gib if self.cuda else 0.0,
            "load_peak_allocated_gib": self.load_peak / gib,
        }


class Profiler:
    """Kernel times of steps 3 and 4 (TB_PROFILE=1): where a step's GPU time goes."""

    def __init__(self, args):
        self.args, self.prof, self.started = args, None, 0.0

    def step(self, step: int) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        if step == 2:
            host = os.environ.get("TB_PROFILE") == "cpu"  # +cprof: where the host's time goes too
            acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if host else [ProfilerActivity.CUDA]
            self.prof = profile(activities=acts)
            self.prof.__enter__()
            self.started = time.perf_counter()
        elif step == 4 and self.prof:
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.started
            self.prof.__exit__(None, None, None)
            events = self.prof.key_averages()
            busy = (
                sum(
                    getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                    for e in events
                )
                / 1e6
            )
            try:
                text = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
            except Exception:  # noqa: BLE001 - older profiler key name
                text = events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
            head = f"2 steps: wall {wall:.3f} s, GPU kernels {busy:.3f} s busy ({busy / wall:.0%})\n"
            head += gaps(self.prof)
            if os.environ.get("TB_PROFILE") == "cpu":
                text += "\n" + events.table(
                    sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70
                )
            print(head + text, flush=True)
            accel = "".join(c if c.isalnum() else "_" for c in os.environ.get("TUNEBENCH_ACCEL", ""))
            a = self.args
            name = f"profile_{a.size}_{a.workload}_{a.stack}_{a.method}{accel}.txt"
            (Path(os.environ.get("OUT", "/tmp")) / name).write_text(head + text)


def gaps(prof, top: int = 12) -> str:
    """Where the GPU waited: idle time between device activities (kernels, copies) and the longest gaps."""
    try:
        from torch.autograd import DeviceType

        events = [e for e in prof.profiler.kineto_results.events() if e.device_type() == DeviceType.CUDA]
        spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns(), e.name()) for e in events)
    except Exception as exc:  # noqa: BLE001 - a profiler without these accessors
        return f"(no gap analysis: {exc})\n"
    if not spans:
        return "(no device activity recorded)\n"
    idle, found, end, last = 0, [], spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            idle += start - end
            found.append((start - end, last, name))
        if stop > end:
            end, last = stop, name
    total = end - spans[0][0]
    found.sort(reverse=True)
    lines = [
        f"GPU idle {idle / 1e6:.1f} ms of {total / 1e6:.1f} ms ({idle / max(total, 1):.0%}); "
        f"gaps over 50 us: {sum(1 for g in found if g[0] > 50_000)}, "
        f"{sum(g[0] for g in found if g[0] > 50_000) / 1e6:.1f} ms"
    ]
    lines += [f"  {g / 1e3:9.1f} us after {a[:60]!r} before {b[:60]!r}" for g, a, b in found[:top]]
    return "\n".join(lines) + "\n"


def tunebench_config(args, batch: int, accumulation: int, longest: int, steps: int):
    """TuneBench's config for this bench: the same LoRA, optimizer and schedule as the other stacks."""
    from tunebench.engine.core.config import TrainConfig

    budget = budget_of(args.stack)
    return TrainConfig(
        model=str(args.model_dir),
        train_type=args.method,
        torch_dtype="bfloat16",
        profile="auto" if budget is not None else args.stack.split("-", 1)[1],
        max_memory=budget or 0.0,
        gradient_checkpointing=True,
        lora_rank=8,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        dataset=["synthetic"],
        max_length=longest,
        learning_rate=LR,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        lr_scheduler_type="constant",
        logging_steps=1,
        eval_steps=10_000,
        save_steps=10_000,
        seed=SEED,
        output_dir="/tmp/tb_bench_runs",
    )


def run_tunebench(args, samples, plan) -> dict:
    engine = import_engine()
    install_synthetic_data(samples)
    from tunebench.engine.core import protocol as P
    from tunebench.engine.train.recipe import run_training

    w = WORKLOADS[args.workload]
    budget = budget_of(args.stack)
    out: dict = play_card(budget) if budget is not None else {}
    cfg = tunebench_config(
        args, w["batch"], w["accumulation"], max_length(args.workload), WARMUP_STEPS + TIMED_STEPS
    )
    rec, notes = Recorder(), []
    profiler = Profiler(args) if os.environ.get("TB_PROFILE") else None

    def emit(event):
        if isinstance(event, P.TrainStarted):
            rec.train_begins()
        elif isinstance(event, P.TrainStep):
            rec.step_done(event.step, event.loss)
            # live, so a run cut off by its timeout still shows how far it got (compiles included)
            seconds = time.perf_counter() - begun
            print(f"  step {event.step}: loss {event.loss:.4f} at {seconds:.1f} s", flush=True)
            if profiler:
                profiler.step(event.step)
        elif isinstance(event, P.Log):
            notes.append(event.message)
            print("  note:", event.message, flush=True)

    if budget is not None:  # the preflight's refusal, before the model loads, as the CLI says it
        from tunebench.engine.core.estimate import ModelShape, read_model_info, training_plan

        longest = max(len(sample.input_ids) for sample in samples)
        training_plan(ModelShape.from_config(read_model_info(str(args.model_dir))), cfg, None, longest)
    begun = time.perf_counter()
    finished = run_training(cfg, emit)
    try:
        import torch._dynamo.utils

        print(torch._dynamo.utils.compile_times(), flush=True)  # where the compile time went
    except Exception:  # noqa: BLE001 - a torch without this report
        pass
    out |= rec.result(timed_tokens(samples, plan))
    out["notes"] = notes
    modelled = [n for n in notes if n.startswith("memory model: peak ")]
    if modelled:  # the path's own memory model for its largest forward, to check against the peak
        out["model_peak_gib"] = float(modelled[-1].split()[3])
    out |= plan_record(notes)
    out["status"] = finished.status
    out["engine_version_of"] = str(Path(engine.__path__[0]))
    return out


def play_card(budget_gib: float) -> dict:
    """Hold this process to a smaller card's memory (the engine's own --max_memory cap, set later,
    keeps the tighter of the two). The CUDA context is not counted, as on a real card it would be."""
    import torch

    card = played_card(budget_gib)
    played = {"budget_gib": budget_gib, "card_gb": card / 1e9}
    if torch.cuda.is_available():
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, card / total))
        played["card_fraction"] = card / total
    return played


def plan_record(notes: list[str]) -> dict:
    """The plan a run printed before step 1 ("plan: ... predicted peak 21.3 GiB of 22.0")."""
    line = next((n for n in notes if n.startswith("plan: ")), None)
    if line is None:
        return {}
    predicted = line.split("predicted peak ")[1].split()[0]
    return {"plan": line.removeprefix("plan: ").split(": predicted")[0], "plan_peak_gib": float(predicted)}


def load_hf_stack(args, unsloth: bool, longest: int):
    """The HF + PEFT or Unsloth model with its LoRA adapter, and the tokenizer."""
    if unsloth:
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        from unsloth import FastLanguageModel  # before transformers, as Unsloth requires
    import torch

    qlora = args.method == "qlora"
    if unsloth:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(args.model_dir),
            max_seq_length=longest,
            dtype=torch.bfloat16,
            load_in_4bit=qlora,
            local_files_only=True,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=8,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=list(TARGETS),
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=SEED,
        )
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        kwargs = dict(dtype=torch.bfloat16, attn_implementation="sdpa")
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": 0}
        if qlora:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        # No hub kernels (transformers' default where `kernels` is installed): offline, and the
        # plain HF stack is the anchor.
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, use_kernels=False, **kwargs)
        model.config.use_cache = False
        if qlora:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.enable_input_require_grads()
        torch.manual_seed(SEED)
        model = get_peft_model(
            model,
            LoraConfig(
                r=8, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM"
            ),
        )
    return model, tokenizer


def hf_trainer(args, model, tokenizer, rows: list, batch: int, accumulation: int, steps: int, callbacks=()):
    """The HF Trainer (patched by Unsloth where it is loaded) over `rows` in order."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    qlora = args.method == "qlora"
    unsloth = args.stack == "unsloth"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dataset = [{"input_ids": s.input_ids, "labels": s.labels} for s in rows]

    def pad_collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    training = TrainingArguments(
        output_dir="/tmp/tb_bench_hf",
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        optim="paged_adamw_8bit"
        if qlora
        else "adamw_torch_fused"
        if torch.cuda.is_available()
        else "adamw_torch",
        gradient_checkpointing=not unsloth,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=SEED,
        disable_tqdm=True,
    )
    return InOrder(
        model=model,
        args=training,
        train_dataset=dataset,
        data_collator=pad_collate,
        callbacks=list(callbacks),
    )


def run_hf_trainer(args, samples, plan, unsloth: bool) -> dict:
    from transformers import TrainerCallback

    w = WORKLOADS[args.workload]
    model, tokenizer = load_hf_stack(args, unsloth, max_length(args.workload))
    ordered = [samples[i] for step in plan for micro in step for i in micro]
    rec = Recorder()

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            rec.train_begins()

        def on_step_end(self, a, state, control, **k):
            rec.step_done(state.global_step)

        def on_log(self, a, state, control, logs=None, **k):
            if logs and "loss" in logs:
                rec.losses[state.global_step] = float(logs["loss"])

    trainer = hf_trainer(
        args, model, tokenizer, ordered, w["batch"], w["accumulation"], WARMUP_STEPS + TIMED_STEPS, [Timer()]
    )
    trainer.train()
    out = rec.result(timed_tokens(samples, plan))
    return out


# ================================================================ driver


def run_record(args, **fields) -> dict:
    """What every result row starts with: the stack, its method and size, the GPU and versions."""
    import torch

    return {
        "stack": args.stack,
        "method": args.method,
        **fields,
        "size": args.size,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": versions(),
        "accel": os.environ.get("TUNEBENCH_ACCEL", ""),
    }


def child(args) -> None:

    samples = make_samples(args.workload, SIZES[args.size]["vocab_size"])
    plan = step_order(samples, args.workload)
    started = time.perf_counter()
    record = run_record(args, workload=args.workload)
    try:
        if args.stack.startswith("tb-"):
            record |= run_tunebench(args, samples, plan)
        else:
            record |= run_hf_trainer(args, samples, plan, unsloth=args.stack == "unsloth")
    except Exception as exc:  # noqa: BLE001 - one stack failing must not lose the others' results
        import traceback

        traceback.print_exc()
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    record["wall_seconds"] = time.perf_counter() - started
    Path(args.result).write_text(json.dumps(record, indent=1))


def model_folder(args) -> Path:
    """The size's random model, written once (to /dev/shm where it has room)."""
    Path(args.out).mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    scratch = shm if shm.is_dir() and shutil.disk_usage(shm).free > 40 * 1024**3 else Path("/tmp")
    model_dir = Path(args.model_dir or scratch / "tb_bench_models" / args.size)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "make-model", "--size", args.size, "--model-dir", str(model_dir)],
        check=True,
    )
    print(f"model folder {model_dir} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return model_dir


def parent(args) -> None:
    out = Path(args.out)
    model_dir = model_folder(args)
    results = []
    runs = args.runs.replace("budgets", BUDGET_RUNS)
    for workload in args.workload.split(","):
        for run in runs.split(","):
            stack, method = run.split(":")
            accel = ""
            if "+accel=" in method:
                method, accel = method.split("+accel=")
            tag = "".join(c if c.isalnum() else "_" for c in accel)
            part = out / f".{args.size}_{workload}_{stack}_{method}_{tag}.json"
            prof = "cpu" if "+cprof" in method else "1" if "+prof" in method else ""
            method = method.replace("+cprof", "").replace("+prof", "")
            env = dict(os.environ, TUNEBENCH_ACCEL=accel.replace("/", ","), TB_PROFILE=prof)
            cmd = [
                sys.executable,
                __file__,
                "child",
                "--size",
                args.size,
                "--workload",
                workload,
                "--stack",
                stack,
                "--method",
                method,
                "--model-dir",
                str(model_dir),
                "--result",
                str(part),
            ]
            print(
                f"\n=== {args.size} {workload} {stack} {method} {('accel=' + accel) if accel else ''}",
                flush=True,
            )
            t = time.perf_counter()
            try:
                subprocess.run(cmd, env=env, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                pass
            record = (
                json.loads(part.read_text())
                if part.exists()
                else {
                    "stack": stack,
                    "method": method,
                    "workload": workload,
                    "size": args.size,
                    "error": f"no result (timeout {args.timeout} s or crash)",
                }
            )
            record["accel"] = accel + (" profiled" if prof else "")
            record["process_seconds"] = time.perf_counter() - t
            results.append(record)
            print(summary_line(record), flush=True)
            part.unlink(missing_ok=True)
            combined = out / f"train_{args.size}_{args.workload.replace(',', '+')}{args.tag}.json"
            combined.write_text(json.dumps(results, indent=1))
    print()
    print(table(results))
    if any(budget_of(r["stack"]) is not None for r in results):
        print()
        print(budget_table(results))


def summary_line(r: dict) -> str:
    if "error" in r:
        return f"--> {r['stack']} {r['method']}: ERROR {r['error'][:300]}"
    return (
        f"--> {r['stack']} {r['method']}: {r['tokens_per_s']:,.0f} tok/s, "
        f"peak {r['peak_allocated_gib']:.2f} GiB alloc / {r['peak_reserved_gib']:.2f} reserved"
        + (f" (model {r['model_peak_gib']:.2f})" if r.get("model_peak_gib") else "")
        + f", loss {r['first_loss']:.4f} -> {r['final_loss']:.4f}, steps {r.get('step_seconds')}"
    )


def table(results: list[dict]) -> str:
    lines = [
        "| size | workload | stack | method | tokens/s | vs HF | vs Unsloth | peak alloc GiB | "
        "peak reserved GiB | model GiB | first loss | final loss | final vs HF |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def ref(r, stack):
        for o in results:
            if (o["stack"], o["method"], o["workload"], o["size"]) == (
                stack,
                r["method"],
                r["workload"],
                r["size"],
            ):
                if "error" not in o and not o.get("accel"):
                    return o
        return None

    for r in results:
        name = r["stack"] + (f" ({r['accel']})" if r.get("accel") else "")
        if "error" in r:
            lines.append(
                f"| {r['size']} | {r['workload']} | {name} | {r['method']} | error: {r['error'][:80]} |"
            )
            continue
        hf, un = ref(r, "hf"), ref(r, "unsloth")
        vs = functools.partial(_ratio, r)
        dloss = (
            f"{(r['final_loss'] / hf['final_loss'] - 1) * 100:+.2f}%" if hf and hf.get("final_loss") else "-"
        )
        cells = [
            r["size"], r["workload"], name, r["method"], f"{r['tokens_per_s']:,.0f}", vs(hf), vs(un),
            f"{r['peak_allocated_gib']:.2f}", f"{r['peak_reserved_gib']:.2f}",
            f"{r['model_peak_gib']:.2f}" if r.get("model_peak_gib") else "-",
            f"{r['first_loss']:.4f}", f"{r['final_loss']:.4f}", dloss,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_table(results: list[dict]) -> str:
    """The budget rows: plan, predicted and measured peak, tokens/s against the issue's targets."""
    lines = [
        "| method | budget GiB | card | plan | predicted GiB | peak alloc GiB | peak reserved GiB | "
        "prediction | tokens/s | target | met |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        budget = budget_of(r["stack"])
        if budget is None:
            continue
        card = f"{played_card(budget) / 1e9:g} GB"
        target = BUDGET_TARGETS.get((r["method"], budget))
        if "error" in r or "tokens_per_s" not in r:
            why = r.get("error", "no result").splitlines()[0][:160]
            lines.append(f"| {r['method']} | {budget:g} | {card} | refused or failed: {why} | | | | | | "
                         f"{target or '-'} | {'no' if target else '-'} |")  # fmt: skip
            continue
        predicted, peak = r.get("plan_peak_gib"), r["peak_allocated_gib"]
        error = f"{(predicted / peak - 1) * 100:+.1f}%" if predicted and peak else "-"
        fits = peak <= budget
        close = bool(predicted and peak) and abs(predicted / peak - 1) <= 0.1  # the issue: within 10%
        met = fits and close and (not target or r["tokens_per_s"] >= target)
        cells = [
            r["method"], f"{budget:g}", card, r.get("plan", "-"), f"{predicted:.2f}" if predicted else "-",
            f"{peak:.2f}", f"{r['peak_reserved_gib']:.2f}", error, f"{r['tokens_per_s']:,.0f}",
            f"{target:,}" if target else "-", "yes" if met else "no",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(r: dict, other: dict | None) -> str:
    return f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}x" if other else "-"


def check() -> None:
    """The fast path's GPU pieces against references: varlen flash attention (GQA, packed) and LoRA."""
    import torch
    import torch.nn.functional as F

    import_engine()
    from tunebench.engine.cuda import lora_train as lora_ops
    from tunebench.engine.cuda import packing

    torch.manual_seed(0)
    dev = "cuda"
    for heads, kv, d in ((28, 4, 128), (14, 2, 64)):
        lens = [300, 17, 1024, 5, 700]
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
        total = sum(lens)
        q = torch.randn(total, heads, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(total, kv, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(total, kv, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(total, heads, d, device=dev, dtype=torch.bfloat16)
        out = packing.flash_varlen(q, k, v, cu, max(lens), d**-0.5)
        grads = torch.autograd.grad(out, (q, k, v), g)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = packing._segment_attention(q64, k64, v64, cu, d**-0.5)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
        errs = [
            ((a.double() - b).norm() / b.norm()).item()
            for a, b in zip((out, *grads), (ref, *ref_grads), strict=True)
        ]
        print(
            f"varlen flash H={heads} KV={kv} D={d}: rel err out/dq/dk/dv = "
            + " ".join(f"{e:.1e}" for e in errs)
        )
        assert all(e < 2e-2 for e in errs), errs
    # LoRA fused linear against the same math in float64
    x = torch.randn(4096, 3584, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(512, 3584, device=dev, dtype=torch.bfloat16) * 0.02
    bias = torch.randn(512, device=dev, dtype=torch.bfloat16)
    a = (torch.randn(8, 3584, device=dev) * 0.02).requires_grad_()
    b = (torch.randn(512, 8, device=dev) * 0.02).requires_grad_()
    y = lora_ops._LoRALinear.apply(x, w, bias, a, b, 4.0)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b), gy)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = F.linear(x64, w.double(), bias.double()) + 4.0 * (x64 @ a64.t()) @ b64.t()
    want = torch.autograd.grad(y64, (x64, a64, b64), gy.double())
    errs = [((p.double() - q).norm() / q.norm()).item() for p, q in zip((y, *got), (y64, *want), strict=True)]
    print("LoRA linear: rel err y/dx/dA/dB = " + " ".join(f"{e:.1e}" for e in errs))
    assert all(e < 2e-2 for e in errs), errs
    check_nf4()
    check_model_path()
    check_compile()
    print("check passed")


def check_nf4() -> None:
    """The fused NF4 dequantisation equals bitsandbytes' CUDA kernel, and what each takes."""
    import torch

    import_engine()
    import bitsandbytes.functional as bnb_functional
    from tunebench.engine.cuda import lora_train as lora_ops

    w = torch.randn(18944, 3584, device="cuda", dtype=torch.bfloat16) * 0.02  # a 7B's MLP weight
    packed, state = bnb_functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    fused = torch.compile(lambda p: lora_ops.dequantize_nf4(p, state, torch.bfloat16))
    assert torch.equal(fused(packed), bnb_functional.dequantize_4bit(packed, state))

    def ms(fn) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 50

    ours, theirs = ms(lambda: fused(packed)), ms(lambda: bnb_functional.dequantize_4bit(packed, state))
    moved = w.numel() * 2.5 / 1e9  # half a byte read and two bytes written per weight
    print(
        f"NF4 dequant 18944x3584: bitsandbytes {theirs:.3f} ms, fused {ours:.3f} ms "
        f"({moved / ours * 1e3:.0f} GB/s), equal values"
    )


def check_model_path() -> None:
    """A small Qwen2 through the fast path (prepare_base, LoRA, packed loss) against the plain path."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.cuda import path as accel
    from tunebench.engine.train.adapter import attach_lora
    from tunebench.engine.train.plain import collate, forward_loss_sum

    dev = torch.device("cuda")
    small = dict(SIZES["0.5b"], num_hidden_layers=2)
    samples = make_samples("mixed", small["vocab_size"])[:8]
    results = {}
    for name in ("plain", "fast", "lean"):
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        with dev:
            model = Qwen2ForCausalLM(Qwen2Config(**small, **COMMON, attn_implementation="sdpa"))
        torch.set_default_dtype(torch.float32)
        cfg = TrainConfig(
            lora_rank=8, lora_alpha=32, lora_dropout=0.0, profile=name if name != "plain" else "auto"
        )
        path = accel.FastPath(cfg, dev, name) if name != "plain" else None
        if path:
            model = path.prepare_base(model)
        torch.manual_seed(1)
        model = attach_lora(model, cfg, True)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        model.train()
        batch = (path.collate if path else collate)(samples, 0, dev)
        loss = (path.loss_sum if path else forward_loss_sum)(model, batch)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])
        results[name] = (loss.item(), grads, batch.target_tokens)
        print(
            f"{name}: loss sum {loss.item():.3f} over {batch.target_tokens} tokens; "
            f"applied {path.applied if path else '-'}"
        )
    ref_loss, ref_grads, _ = results["plain"]
    for name in ("fast", "lean"):
        loss, grads, _ = results[name]
        rel = ((grads - ref_grads).norm() / ref_grads.norm()).item()
        print(f"{name} vs plain: loss {loss / ref_loss - 1:+.2e} relative, LoRA grads rel err {rel:.2e}")
        assert abs(loss / ref_loss - 1) < 2e-3 and rel < 5e-2, (name, loss, ref_loss, rel)


def check_compile() -> None:
    """The compiled decoder layers on the packed path: no graph break, no fallback to eager."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.cuda import path as accel
    from tunebench.engine.train.adapter import attach_lora

    dev = torch.device("cuda")
    small = dict(SIZES["0.5b"], num_hidden_layers=2)
    # the defaults (recompute in the graph), and the checkpoint around the compiled layer
    for profile, off in (("fast", ""), ("lean", ""), ("lean", "ingraph"), ("fast", "ingraph")):
        torch._dynamo.reset()
        counters.clear()
        torch.set_default_dtype(torch.bfloat16)
        with dev:
            model = Qwen2ForCausalLM(Qwen2Config(**small, **COMMON, attn_implementation="sdpa"))
        torch.set_default_dtype(torch.float32)
        cfg = TrainConfig(lora_rank=8, lora_alpha=32, lora_dropout=0.0, profile=profile)
        path = accel.FastPath(cfg, dev, profile)
        path.use.discard(off)
        model = attach_lora(path.prepare_base(model), cfg, True)
        model.train()
        path.prepared(model)
        torch._dynamo.config.suppress_errors = False  # a failure must show here, not fall back
        for lengths in ((300, 700, 1000), (50, 1500), (900, 900, 200)):
            samples = [s for s in make_samples("mixed", small["vocab_size"])[: len(lengths)]]
            samples = [Sample(s.input_ids[:n], s.labels[:n]) for s, n in zip(samples, lengths, strict=True)]
            path.loss_sum(model, path.collate(samples, 0, dev)).backward()
        breaks = dict(counters["graph_break"])
        stats = dict(counters["stats"])
        print(f"compile {profile} {'-' + off if off else ''}: graph breaks {breaks or 'none'}; stats {stats}")
        assert not breaks, breaks


def host_copy() -> None:
    """Pinned host <-> GPU copy rates, each way alone and both at once (what offloading can spend)."""
    import torch

    n = 512 << 20
    host = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    dev = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]

    def timed(*copies) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            for stream, (dst, src) in zip(streams, copies, strict=False):
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        return len(copies) * 4 * n / (time.perf_counter() - t) / 1e9

    timed((dev[0], host[0]))  # warm-up
    up, down = timed((dev[0], host[0])), timed((host[1], dev[1]))
    both = timed((dev[0], host[0]), (host[1], dev[1]))
    print(f"host copy: to GPU {up:.1f} GB/s, to host {down:.1f} GB/s, both at once {both:.1f} GB/s")


def main() -> None:
    import bench_longest  # here, not at the top: it imports this module's stacks

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    modes = ["run", "child", "make-model", "check", "host-copy", "search", "search-child"]
    p.add_argument("mode", nargs="?", default="run", choices=modes)
    p.add_argument("--size", default="0.5b", choices=sorted(SIZES))
    p.add_argument("--workload", default="fixed", help="fixed, mixed, or both comma-separated")
    p.add_argument(
        "--runs",
        default="hf:lora,unsloth:lora,tb-fast:lora,tb-lean:lora",
        help="stack:method pairs; append +accel=+liger/-flce to change the fast path's techniques",
    )
    p.add_argument("--stack", default="")
    p.add_argument("--method", default="lora")
    p.add_argument("--model-dir", default="")
    p.add_argument("--result", default="")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--timeout", type=int, default=420, help="seconds per stack process")
    p.add_argument("--tag", default="", help="suffix of the combined results file")
    bench_longest.add_arguments(p)
    args = p.parse_args()
    if args.mode == "make-model":
        make_model(args.size, Path(args.model_dir))
    elif args.mode == "child":
        args.model_dir = Path(args.model_dir)
        child(args)
    elif args.mode == "check":
        check()
    elif args.mode == "host-copy":
        host_copy()
    elif args.mode == "search":
        bench_longest.search_parent(args, model_folder(args))
    elif args.mode == "search-child":
        args.model_dir = Path(args.model_dir)
        args.budget_gib = float(args.budget_gib)
        bench_longest.search_child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()

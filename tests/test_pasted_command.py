"""A command pasted into the workbench (ctrl+o in Parameters), read as bash would read it:
ms-swift's example scripts as they are copied from its README and from articles."""

from __future__ import annotations

import re

import pytest
from tunebench.engine.core.config import ConfigError
from tunebench.engine.core.errors import UserError
from tunebench.engine.core.pasted_command import read_command
from tunebench.engine.core.train_flags import values_from_command

# ms-swift's multi-GPU example, with what a web page adds (spaces after a backslash, a comment) and
# what a long run on a shared box gets (nohup, the log to a file).
SWIFT_MULTI_GPU = """# 22GB, two GPUs; Qwen's own template
nproc_per_node=2

CUDA_VISIBLE_DEVICES=0,1 \\ 
NPROC_PER_NODE=$nproc_per_node \\
nohup swift sft \\
    --model Qwen/Qwen2.5-7B-Instruct \\
    --dataset 'AI-ModelScope/alpaca-gpt4-data-zh#500' \\
              'swift/self-cognition#500' \\
    --gradient_accumulation_steps $(expr 16 / $nproc_per_node) \\
    --system 'You are a helpful assistant; answer briefly.' \\
    --model_name swift-robot > train.log 2>&1 &
"""


def test_ms_swifts_multi_gpu_script_reads_as_bash_reads_it():
    environment, words, notes = read_command(SWIFT_MULTI_GPU)
    assert environment == {"CUDA_VISIBLE_DEVICES": "0,1", "NPROC_PER_NODE": "2"}
    assert words[:2] == ["swift", "sft"] and words[-1] == "swift-robot"
    assert notes == [
        "`nohup` and `> train.log 2>&1 &`: where the output goes; the workbench keeps the run's log"
    ]
    assert words[words.index("--gradient_accumulation_steps") + 1] == "8"
    assert words[words.index("--dataset") + 1 : words.index("--dataset") + 3] == [
        "AI-ModelScope/alpaca-gpt4-data-zh#500",  # a # inside a word is not a comment
        "swift/self-cognition#500",
    ]
    assert "You are a helpful assistant; answer briefly." in words  # a quoted ; is not an operator
    values, _ = values_from_command(SWIFT_MULTI_GPU)
    assert values["nproc_per_node"] == 2 and values["gradient_accumulation_steps"] == 8


def test_exported_variables_and_output_handling():
    environment, words, notes = read_command(
        "export NPROC_PER_NODE=4\nnohup swift sft --dataset a.jsonl > train.log 2>&1 &"
    )
    assert environment == {"NPROC_PER_NODE": "4"} and words == ["swift", "sft", "--dataset", "a.jsonl"]
    assert notes == [
        "`nohup` and `> train.log 2>&1 &`: where the output goes; the workbench keeps the run's log"
    ]
    assert read_command("swift sft --dataset a.jsonl 2>&1 | tee -a log.txt").words[-1] == "a.jsonl"
    assert read_command("swift sft --system 'two\nlines' --lr 1").words[3] == "two\nlines"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("swift sft --dataset a.jsonl\nswift sft --dataset b.jsonl", "line 2 starts a second command"),
        ("swift sft --lr $LR", "line 1: $LR is not set in the pasted text"),
        ("swift sft --gradient_accumulation_steps $(nproc)", "$(nproc) needs a shell to run it"),
        ("swift sft --gradient_accumulation_steps `nproc`", "`nproc` needs a shell to run it"),
        ("n=0\nswift sft --gradient_accumulation_steps $(expr 16 / $n)", "is not whole-number arithmetic"),
        ("swift sft --dataset a.jsonl | grep loss", "'|' is shell syntax"),
        ("swift sft --dataset a.jsonl; echo done", "';' is shell syntax"),
        ("swift sft \\\n --system 'never closed", "the quote opened on line 2 is never closed"),
    ],
)
def test_what_needs_a_shell_is_refused_with_its_line(text, said):
    with pytest.raises(UserError, match=re.escape(said)):
        read_command(text)


def test_a_pasted_command_keeps_the_command_lines_precedence_and_secrets():
    """The command's own --nproc_per_node beats NPROC_PER_NODE, as on the command line; a token
    in front of the command stays off the screen; --help is refused, not printed (it ended the
    workbench: argparse exits after printing it)."""
    values, _ = values_from_command("NPROC_PER_NODE=2 swift sft --dataset a.jsonl --nproc_per_node 4")
    assert values["nproc_per_node"] == 4
    values, notes = values_from_command("HF_TOKEN=hf_SECRET swift sft --dataset a.jsonl")
    assert notes == ["HF_TOKEN=...: the workbench sets no environment variables; it is not set"]
    for flag in ("-h", "--help"):
        with pytest.raises(UserError, match="-h/--help is not a setting"):
            values_from_command(f"swift sft --dataset a.jsonl {flag}")


def test_eval_strategy_no_turns_off_evaluation_whatever_data_is_named():
    values, notes = values_from_command(
        "swift sft --dataset a.jsonl --val_dataset b.jsonl --split_dataset_ratio 0.1 --eval_strategy no"
    )
    assert values == {"dataset": ["a.jsonl"], "val_ratio": 0.0}
    assert "those two are left unused" in notes[0]


def test_a_noted_number_must_match_to_a_millionth_of_itself():
    """--adam_epsilon 1e-7 was noted as if it were AdamW's 1e-8: the tolerance was absolute."""
    assert values_from_command("swift sft --adam_epsilon 1e-8 --dataset a.jsonl")[1]
    with pytest.raises(ConfigError, match="--adam_epsilon"):
        values_from_command("swift sft --adam_epsilon 1e-7 --dataset a.jsonl")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        # a > inside a quoted value is the value's (it crashed the workbench: the quote was cut off)
        ('swift sft --system "x > y"', ["--system", "x > y"]),
        ('swift sft --system "use => arrows" > log 2>&1', ["--system", "use => arrows"]),
        ("swift sft --seed 2 > log", ["--seed", "2"]),
        # a continuation backslash at the very end (the command was lost)
        ("swift sft --lora_rank 4 \\", ["--lora_rank", "4"]),
        ("swift sft --lora_rank 4 \\  ", ["--lora_rank", "4"]),
        # bash expands nothing in single quotes, nor an escaped $ or `
        ("swift sft --system 'costs $HOME, $(nproc)'", ["--system", "costs $HOME, $(nproc)"]),
        ('swift sft --system "cost \\$HOME" --x \\$Y', ["--system", "cost $HOME", "--x", "$Y"]),
        ('swift sft --system "use \\`code\\`"', ["--system", "use `code`"]),
        ("N=2\nexport N\nswift sft --nproc_per_node ${N}", ["--nproc_per_node", "2"]),
    ],
)
def test_quotes_escapes_and_line_ends_read_as_bash_reads_them(text, words):
    assert read_command(text).words[2:] == words

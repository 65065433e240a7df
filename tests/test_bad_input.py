"""Malformed input, driven through the real `tunebench` entry point: every case must exit nonzero
with a message that says what is wrong, where (file and line or index, or the flag) and what to
do, print no traceback, leave every input file byte-identical and leave no run folder behind.

The CLI runs in-process (`cli.main(argv)`) in a fresh folder per case; relative paths in a case
are relative to that folder, which is also where a run would be created (`--output_dir runs`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tunebench.engine.cli.main import main
from tunebench.engine.core import data, encoding
from tunebench.engine.core.config import TrainConfig, parse_value
from tunebench.engine.core.limits import MAX_DATASET_BYTES

GOOD = {"instruction": "Who are you?", "output": "I am a tiny test model."}
GOOD2 = {"instruction": "Say hi.", "output": "Hi!"}
DIR = object()  # a file spec that means "make a folder here"
FIFO = object()  # ... "make a named pipe here" (nothing ever writes to it)


class Link(str):
    """A file spec that means "make a symlink here, to this target"."""


class Sparse(int):
    """A file spec that means "make a file of this many bytes here" (sparse: it takes no disk)."""


def lines(*records: object) -> bytes:
    return b"".join(
        (r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n" for r in records
    )


# A safetensors file holding no tensors: its 8-byte header length, then the header.
EMPTY_SAFETENSORS = (2).to_bytes(8, "little") + b"{}"


def msgs(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


@dataclass
class Case:
    id: str
    argv: list[str]  # "MODEL" stands for the tiny model folder
    files: dict[str, object] = field(default_factory=dict)  # relative path -> bytes, or DIR
    what: list[str] = field(default_factory=list)  # every one must be in the message
    where: list[str] = field(default_factory=list)
    fix: list[str] = field(default_factory=list)
    # also send its other flags to the engine (typed, as the form sends them); the message must
    # then carry its fix in the words both give
    flags_to_engine: bool = False


def sound_checkpoint(step: int) -> dict[str, bytes]:
    """The files of a checkpoint whose files are whole (made without torch: a safetensors file of
    one tensor, and a zip as torch.save writes), as `runs/old/checkpoints/step-<n>/...`."""
    import io
    import zipfile

    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    weights = len(header).to_bytes(8, "little") + header + b"\0\0\0\0"
    state = io.BytesIO()
    with zipfile.ZipFile(state, "w") as archive:
        archive.writestr("trainer_state/data.pkl", b"x" * 200)
    folder = f"runs/old/checkpoints/step-{step}"
    return {
        f"{folder}/adapter_config.json": b'{"peft_type": "LORA", "r": 8}',
        f"{folder}/adapter_model.safetensors": weights,
        f"{folder}/trainer_state.pt": state.getvalue(),
    }


def old_run(**config: object) -> dict[str, bytes]:
    """A run folder trained with `config` ("@MODEL@" stands for the tiny model), checkpoints at
    steps 2 and 4."""
    recorded = {"model": "@MODEL@", "dataset": ["data.jsonl"], "lora_rank": 8, **config}
    return {
        "runs/old/config.json": json.dumps({"run_id": "old", "config": recorded}).encode(),
        **sound_checkpoint(2),
        **sound_checkpoint(4),
    }


def cut(files: dict[str, bytes], name: str) -> dict[str, bytes]:
    """`files` with `name` cut to half its length, as a full disk or a stopped copy leaves it."""
    return {**files, name: files[name][: len(files[name]) // 2]}


def train(*flags: str, data_spec: str = "data.jsonl") -> list[str]:
    return ["train", "--model", "MODEL", "--dataset", data_spec, "--output_dir", "runs", *flags]


# Shaped like LLaMA-Factory's glaive_toolcall demo: the tools as JSON text, a call, its result.
GLAIVE_CALL = {
    "conversations": [
        {"from": "human", "value": "What is the weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temperature_c": 18, "sky": "clear"}'},
        {"from": "gpt", "value": "It is 18 degrees and clear in Paris."},
    ],
    "tools": '[{"name": "get_weather", "description": "Current weather in a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]',
}
UNCACHED_HUB_ID = "tunebench-tests/never-fetched"  # kept as typed on the engine path too
HUGE = ("lorem ipsum dolor sit amet " * 200_000)[: 5 * 2**20]  # a 5 MiB prompt

CASES = [
    # ------------------------------------------------------------ bad JSON, encodings
    Case(
        "jsonl-trailing-comma",
        train(),
        {"data.jsonl": b'{"instruction": "q", "output": "a"},\n'},
        ["bad JSON", "not readable as JSON"],
        ["data.jsonl:1", "column 36"],
        ["fix or delete the line"],
    ),
    Case(
        "json-list-trailing-comma",
        train(data_spec="data.json"),
        {"data.json": b'[{"instruction": "q", "output": "a"},]'},
        ["bad JSON", "trailing comma"],
        ["data.json:1"],
        ["fix the JSON there"],
    ),
    Case(
        "json-truncated",
        train(data_spec="data.json"),
        {"data.json": b'[\n{"instruction": "q", "output": "a"},\n{"instruction": "q", "outp'},
        ["bad JSON", "end of data"],
        ["data.json:3"],
        ["fix the JSON there"],
    ),
    Case(
        "jsonl-one-broken-line",
        train(),
        {"data.jsonl": lines(GOOD, b'{"instruction": "q", "output": "a"', GOOD2)},
        ["bad JSON", "so it was not used"],
        ["data.jsonl:2"],
        ["fix or delete the line"],
    ),
    Case(
        "jsonl-not-utf8",
        train(),
        {"data.jsonl": lines(GOOD, b'{"instruction": "caf\xe9?", "output": "a"}')},
        ["not UTF-8", "0xe9"],
        ["data.jsonl:2"],
        ["save the file as UTF-8"],
    ),
    Case(
        "json-not-utf8",
        train(data_spec="data.json"),
        {"data.json": b'[\n{"instruction": "caf\xe9?", "output": "a"}\n]'},
        ["not UTF-8"],
        ["data.json:2"],
        ["save the file as UTF-8"],
    ),
    Case(
        "utf16-file",
        train(),
        {"data.jsonl": json.dumps(GOOD).encode("utf-16")},
        ["UTF-16"],
        ["data.jsonl"],
        ["save it as UTF-8"],
    ),
    Case(
        "json-not-a-list",
        train(data_spec="data.json"),
        {"data.json": b'"just some text"'},
        ["expected a JSON list of records", "found text"],
        ["data.json"],
        ["write the file as ["],
    ),
    Case(
        "json-object-wraps-the-samples",
        train(data_spec="data.json"),
        {"data.json": json.dumps({"data": [GOOD, GOOD2], "version": 2}).encode()},
        ["expected a JSON list of records", "found an object with keys: data, version"],
        ["data.json"],
        ["write the file as [", "keep only the list"],
    ),
    Case(
        "json-object-record-beside-samples",
        train(data_spec="data.json"),
        {"data.json": json.dumps({**GOOD, "samples": [GOOD2, GOOD2]}).encode()},
        ["expected a JSON list of records", "found an object with keys: instruction, output, samples"],
        ["data.json"],
        ["write the file as ["],
    ),
    # ------------------------------------------------------------ fields and types
    Case(
        "missing-field",
        train(),
        {"data.jsonl": lines({"instruction": "q"})},
        ["missing field 'output'"],
        ["data.jsonl:1"],
        ["fix the records listed"],
    ),
    Case(
        "misspelled-field",
        train(),
        {"data.jsonl": lines({"instruction": "q", "ouput": "a"})},
        ["missing field 'output'", "'ouput'"],
        ["data.jsonl:1"],
        ["misspelling of 'output'"],
    ),
    Case(
        "empty-output",
        train(),
        {"data.jsonl": lines({"instruction": "q", "output": "  "})},
        ["output is empty"],
        ["data.jsonl:1"],
        ["write the answer, or delete the record"],
    ),
    Case(
        "empty-question",
        train(),
        {"data.jsonl": lines(msgs(("user", ""), ("assistant", "a")))},
        ["is empty"],
        ["data.jsonl:1", "messages[0]"],
        ["write the question"],
    ),
    Case(
        "number-where-text-goes",
        train(),
        {"data.jsonl": lines({"instruction": 42, "output": "a"})},
        ["'instruction' must be text", "a number (42)"],
        ["data.jsonl:1"],
        ["fix the records listed"],
    ),
    Case(
        "list-where-object-goes",
        train(),
        {"data.jsonl": lines({"messages": ["hello", "hi"]})},
        ["must be an object, found text"],
        ["data.jsonl:1", "messages[0]"],
        ["fix the records listed"],
    ),
    Case(
        "object-where-list-goes",
        train(),
        {"data.jsonl": lines({"conversations": {"from": "human", "value": "hi"}})},
        ["'conversations' must be a list of turns", "found an object"],
        ["data.jsonl:1"],
        ["fix the records listed"],
    ),
    Case(
        "record-is-a-list",
        train(data_spec="data.json"),
        {"data.json": json.dumps([["q", "a"]]).encode()},
        ["expected a JSON object", "found a list"],
        ["data.json[0]"],
        ["fix the records listed"],
    ),
    Case(
        "history-wrong-type",
        train(),
        {"data.jsonl": lines({**GOOD, "history": "earlier chat"})},
        ["'history' must be a list"],
        ["data.jsonl:1"],
        ["[question, answer] pairs"],
    ),
    Case(
        "unknown-format",
        train(),
        {"data.jsonl": lines({"ask": "q", "reply": "a"})},
        ["unknown format", "keys: ask, reply"],
        ["data.jsonl:1"],
        ["expected 'messages'"],
    ),
    Case(
        "sharegpt-unknown-role",
        train(),
        {
            "data.jsonl": lines(
                {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]}
            )
        },
        ["unknown speaker 'robot'"],
        ["data.jsonl:1", "conversations[1]"],
        ["use human, gpt or system"],
    ),
    Case(
        "messages-unknown-role",
        train(),
        {"data.jsonl": lines(msgs(("user", "hi"), ("bot", "hello")))},
        ["unknown role 'bot'"],
        ["data.jsonl:1", "messages[1]"],
        ["use system, user, assistant or tool"],
    ),
    Case(
        "messages-do-not-alternate",
        train(),
        {"data.jsonl": lines(msgs(("user", "hi"), ("user", "again"), ("assistant", "hello")))},
        ["turns must alternate user, assistant"],
        ["data.jsonl:1", "messages[1]"],
        ["merge the two turns, or add the missing one"],
    ),
    Case(
        "ends-with-the-user",
        train(),
        {"data.jsonl": lines(msgs(("user", "hi"), ("assistant", "hello"), ("user", "bye")))},
        ["is the user's"],
        ["data.jsonl:1", "messages[2]"],
        ["end with the assistant's answer"],
    ),
    # ------------------------------------------------------------ data for other kinds of training
    Case(
        "kto-labels",  # LLaMA-Factory's kto_en_demo: OpenAI messages, each marked good or bad
        train(),
        {
            "data.jsonl": lines(
                {**msgs(("user", "Is the sky green?"), ("assistant", "Yes, always.")), "label": False},
                {**msgs(("user", "Is the sky blue?"), ("assistant", "On a clear day, yes.")), "label": True},
            )
        },
        ["KTO data", "'label': true/false", "supervised answers only", "not used"],
        ["data.jsonl:1", "data.jsonl:2"],
        ["swift rlhf --rlhf_type kto"],
    ),
    Case(
        "dpo-sharegpt-chosen-rejected",  # LLaMA-Factory's dpo_en_demo
        train(data_spec="data.json"),
        {
            "data.json": json.dumps(
                [
                    {
                        "conversations": [{"from": "human", "value": "Name a prime number."}],
                        "chosen": {"from": "gpt", "value": "7 is prime."},
                        "rejected": {"from": "gpt", "value": "9 is prime."},
                    }
                ]
            ).encode()
        },
        ["preference data for DPO/ORPO", "'rejected'", "supervised answers only"],
        ["data.json[0]"],
        ["write each as the assistant's answer", "--rlhf_type dpo"],
    ),
    Case(
        "dpo-alpaca-chosen-rejected",
        train(),
        {"data.jsonl": lines({"instruction": "Say hi.", "input": "", "chosen": "Hi!", "rejected": "No."})},
        ["preference data for DPO/ORPO", "supervised answers only"],
        ["data.jsonl:1"],
        ["--rlhf_type dpo"],
    ),
    Case(
        "swift-rejected-response",  # ms-swift's RLHF format: the chosen answer is the last turn
        train(),
        {
            "data.jsonl": lines(
                GOOD,
                {**msgs(("user", "2+2?"), ("assistant", "4")), "rejected_response": "5"},
            )
        },
        ["preference data for DPO/ORPO", "'rejected_response'", "not used"],
        ["data.jsonl:2"],
        ["--rlhf_type dpo"],
    ),
    Case(
        "images-field",  # LLaMA-Factory's mllm_demo
        train(),
        {
            "data.jsonl": lines(
                {
                    **msgs(("user", "<image>Who are they?"), ("assistant", "Two players on a pitch.")),
                    "images": ["mllm_demo_data/1.jpg"],
                }
            )
        },
        ["multimodal data", "an 'images' field", "without the media"],
        ["data.jsonl:1"],
        ["leave the file out"],
    ),
    Case(
        "image-tag-without-images",
        train(),
        {"data.jsonl": lines({"instruction": "<image>Describe the picture.", "output": "A cat."})},
        ["multimodal data", "'<image>' in its text"],
        ["data.jsonl:1"],
        ["leave the file out"],
    ),
    Case(
        "plain-text-file",  # a .txt of articles: continued-pretraining data
        train(data_spec="notes.txt"),
        {"notes.txt": b"The river rises in the hills.\nIt reaches the sea at Rye.\n"},
        ["plain text for continued pretraining", "supervised answers only", "not used"],
        ["notes.txt[0]"],
        ["swift pt", "write it as questions and answers"],
    ),
    Case(
        "text-records",  # {"text": ...} lines, as pretraining corpora are shipped
        train(),
        {"data.jsonl": lines({"text": "The river rises in the hills."}, {"text": "It reaches the sea."})},
        ["plain text for continued pretraining", "a 'text' field"],
        ["data.jsonl:1"],
        ["swift pt"],
    ),
    Case(
        "image-content-part",  # OpenAI vision messages
        train(),
        {
            "data.jsonl": lines(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "What is in the picture?"},
                                {"type": "image_url", "image_url": {"url": "file:///cat.png"}},
                            ],
                        },
                        {"role": "assistant", "content": "A cat."},
                    ]
                }
            )
        },
        ["multimodal data", "an 'image_url' content part"],
        ["data.jsonl:1"],
        ["leave the file out"],
    ),
    Case(
        "hub-id-not-cached",
        train(data_spec=UNCACHED_HUB_ID),
        {},
        [
            "is not a file or folder here",
            "not in the local Hugging Face or ModelScope cache",
            "downloads nothing",
        ],
        [UNCACHED_HUB_ID],
        [f"hf download --repo-type dataset {UNCACHED_HUB_ID}", "modelscope download --dataset"],
    ),
    # ------------------------------------------------------------ tool calling
    Case(
        "tools-with-a-template-without-tool-support",  # glaive records, the tiny model's template
        train(),
        {"data.jsonl": lines(GLAIVE_CALL)},
        ["no training sample is left", "does not show the tools or tool calls", "'get_weather'"],
        ["data.jsonl:1"],
        ["--template qwen or chatml"],
    ),
    Case(
        "function-call-not-json",
        train(),
        {
            "data.jsonl": lines(
                {
                    **GLAIVE_CALL,
                    "conversations": [
                        GLAIVE_CALL["conversations"][0],
                        {"from": "function_call", "value": "get_weather(city='Paris')"},
                        *GLAIVE_CALL["conversations"][2:],
                    ],
                }
            )
        },
        ["the function_call is not valid JSON"],
        ["data.jsonl:1", "conversations[1]"],
        ["fix the records listed"],
    ),
    Case(
        "placeholders-in-most-records",  # identity.json: 6 of 91 records had none
        train(),
        {
            "data.jsonl": lines(
                *[{"instruction": "Who are you?", "output": "I am {{name}}, made by {{author}}."}] * 3,
                {"instruction": "Hi", "output": "Hello!"},
            )
        },
        ["3 of 4 records", "placeholders", "--model_name and --model_author were not given"],
        ["data.jsonl:1", "data.jsonl:3"],
        ["pass --model_name and --model_author (one value, or two: Chinese then English)"],
    ),
    Case(
        "unfilled-name-placeholder",
        train(),
        {"data.jsonl": lines({"instruction": "Who are you?", "output": "I am {{NAME}}."})},
        ["uses {{NAME}}", "no --model_name"],
        ["data.jsonl:1"],
        ["pass --model_name"],
    ),
    Case(
        "huge-record",
        train(),
        {"data.jsonl": lines({"instruction": HUGE, "output": "ok"})},
        ["no training sample is left", "over 2048 tokens", "5,242,"],
        ["data.jsonl:1", "--max_length 2048"],
        ["shorten the prompt, or delete the record"],
    ),
    # ------------------------------------------------------------ files and path#N
    Case(
        "count-zero",
        train(data_spec="data.jsonl#0"),
        {"data.jsonl": lines(GOOD)},
        ["'0' after '#' is not a positive whole number"],
        ["data.jsonl#0"],
        ["write data.jsonl#N"],
    ),
    Case(
        "count-negative",
        train(data_spec="data.jsonl#-1"),
        {"data.jsonl": lines(GOOD)},
        ["'-1' after '#' is not a positive whole number"],
        ["data.jsonl#-1"],
        ["write data.jsonl#N"],
    ),
    Case(
        "count-not-a-number",
        train(data_spec="data.jsonl#abc"),
        {"data.jsonl": lines(GOOD)},
        ["'abc' after '#' is not a positive whole number"],
        ["data.jsonl#abc"],
        ["write data.jsonl#N"],
    ),
    Case(
        "file-does-not-exist",
        train(data_spec="nowhere.jsonl"),
        {"data.jsonl": lines(GOOD)},
        ["dataset file not found"],
        ["nowhere.jsonl"],
        ["check the path"],
    ),
    Case(
        "folder-instead-of-file",
        train(data_spec="sets"),
        {"sets": DIR, "sets/inside.jsonl": lines(GOOD)},
        ["is a folder, not a dataset file"],
        ["sets"],
        ["name a data file such as sets/inside.jsonl"],
    ),
    Case(
        "empty-file",
        train(),
        {"data.jsonl": b""},
        ["the file is empty"],
        ["data.jsonl"],
        ["add samples"],
    ),
    Case(
        "whitespace-only-file",
        train(),
        {"data.jsonl": b"  \n\n\t \r\n"},
        ["the file is empty"],
        ["data.jsonl"],
        ["add samples"],
    ),
    Case(
        "wrong-extension",
        train(data_spec="data.xlsx"),
        {"data.xlsx": b"PK\x03\x04 a spreadsheet"},
        ["unknown dataset extension '.xlsx'"],
        ["data.xlsx"],
        ["use .jsonl", ".csv, .parquet"],
    ),
    Case(
        "broken-val-dataset",
        [*train(), "--val_dataset", "val.jsonl"],
        {"data.jsonl": lines(GOOD), "val.jsonl": lines(GOOD, b"{oops")},
        ["bad JSON"],
        ["--val_dataset", "val.jsonl:2"],
        ["fix or delete the line"],
    ),
    Case(
        "no-dataset",
        ["train", "--model", "MODEL", "--output_dir", "runs"],
        {},
        ["no training data"],
        ["--dataset"],
        ["for example --dataset"],
    ),
    # ------------------------------------------------------------ parameters
    Case(
        "rank-zero",
        train("--lora_rank", "0"),
        {},
        ["must be at least 1 (got 0)"],
        ["--lora_rank"],
        ["change the flag"],
    ),
    Case(
        "negative-lr",
        train("--lr", "-1e-4"),
        {},
        ["must be greater than 0"],
        ["--learning_rate"],
        ["change the flag"],
    ),
    Case(
        "lr-not-a-number",
        train("--learning_rate", "fast"),
        {},
        ["'fast' is not a number"],
        ["--learning_rate"],
        ["change the flag"],
    ),
    Case(
        "batch-zero",
        train("--per_device_train_batch_size", "0"),
        {},
        ["must be at least 1"],
        ["--per_device_train_batch_size"],
        ["change the flag"],
    ),
    Case(
        "accumulation-zero",
        train("--gradient_accumulation_steps", "0"),
        {},
        ["must be at least 1"],
        ["--gradient_accumulation_steps"],
        ["change the flag"],
    ),
    Case(
        "max-length-below-minimum",
        train("--max_length", "8"),
        {},
        ["must be at least 16"],
        ["--max_length"],
        ["change the flag"],
    ),
    Case(
        "unknown-target-module",
        train("--target_modules", "qq_proj"),
        {"data.jsonl": lines(GOOD)},
        ["no linear layer named qq_proj"],
        ["--target_modules"],
        ["choose from all-linear", "q_proj"],
    ),
    Case(
        "target-module-not-a-name",
        train("--target_modules", "q proj"),
        {},
        ["not a module name"],
        ["--target_modules"],
        ["try all-linear or q_proj"],
    ),
    Case(
        "max-length-shorter-than-prompt",
        train("--max_length", "16"),
        {"data.jsonl": lines(GOOD, GOOD2)},
        ["no training sample is left", "cuts away every answer token"],
        ["data.jsonl:1", "data.jsonl:2", "--max_length 16"],
        ["raise --max_length to"],
    ),
    Case(
        "unknown-train-type",
        train("--train_type", "full"),
        {},
        ["'full' is not one of lora, qlora"],
        ["--train_type"],
        ["change the flag"],
    ),
    Case(
        "qlora-without-cuda",
        train("--train_type", "qlora"),
        {"data.jsonl": lines(GOOD)},
        ["QLoRA needs an NVIDIA GPU with CUDA"],
        ["--train_type qlora"],
        ["use --train_type lora here"],
    ),
    Case(
        "both-val-flags",
        train("--val_dataset", "v.jsonl", "--val_ratio", "0.1"),
        {},
        ["not both"],
        ["--val_ratio"],
        ["give either --val_dataset or --val_ratio"],
    ),
    Case(
        "three-model-names",
        train("--model_name", "a", "b", "c"),
        {},
        ["give one value, or two"],
        ["--model_name"],
        ["change the flag"],
    ),
    Case(
        "unknown-template",
        train("--template", "vicuna"),
        {"data.jsonl": lines(GOOD)},
        ["unknown chat template 'vicuna'"],
        ["--template"],
        ["use one of chatml"],
    ),
    Case(
        "output-dir-is-a-file",
        ["train", "--model", "MODEL", "--dataset", "data.jsonl", "--output_dir", "data.jsonl"],
        {"data.jsonl": lines(GOOD)},
        ["is a file, not a folder"],
        ["--output_dir"],
        ["give a folder"],
    ),
    Case(
        "output-dir-under-a-file",
        ["train", "--model", "MODEL", "--dataset", "data.jsonl", "--output_dir", "data.jsonl/runs"],
        {"data.jsonl": lines(GOOD)},
        ["is a file, so the folder"],
        ["--output_dir", "data.jsonl"],
        ["move the file"],
    ),
    Case(
        "demo-output-dir-is-a-file",  # said before the demo model loads and answers
        ["demo", "--output_dir", "data.jsonl"],
        {"data.jsonl": lines(GOOD)},
        ["is a file, not a folder"],
        ["--output_dir"],
        ["give a folder"],
    ),
    Case(
        "resume-from-nothing",
        train("--resume_from_checkpoint", "runs/old"),
        {"data.jsonl": lines(GOOD)},
        ["does not exist"],
        ["--resume_from_checkpoint", "runs/old"],
        ["point it at runs/<run-id>"],
    ),
    Case(
        "seed-out-of-range",
        train("--seed", "99999999999"),
        {"data.jsonl": lines(GOOD)},
        ["(got 99999999999)"],
        ["--seed"],
        ["must be at most 4294967295"],
        flags_to_engine=True,
    ),
    Case(
        "run-name-climbs-out",
        train("--run_name", "../../x"),
        {"data.jsonl": lines(GOOD)},
        ["'../../x' is not a plain folder name"],
        ["--run_name"],
        ["one folder name such as my-run"],
        flags_to_engine=True,
    ),
    Case(
        "run-name-absolute",
        train("--run_name", "/tmp/x"),
        {"data.jsonl": lines(GOOD)},
        ["'/tmp/x' is not a plain folder name"],
        ["--run_name"],
        ["one folder name such as my-run"],
        flags_to_engine=True,
    ),
    Case(
        "deepspeed-offload",
        train("--deepspeed", "zero3_offload"),
        {"data.jsonl": lines(GOOD)},
        ["'zero3_offload': TuneBench runs ms-swift's zero2 and zero3 as PyTorch FSDP2"],
        ["--deepspeed"],
        ["give zero2 or zero3", "leave --deepspeed out"],
        flags_to_engine=True,
    ),
    Case(
        "deepspeed-config-file",
        train("--deepspeed", "ds_config.json"),
        {"data.jsonl": lines(GOOD), "ds_config.json": b'{"zero_optimization": {"stage": 3}}'},
        ["'ds_config.json': TuneBench runs ms-swift's zero2 and zero3 as PyTorch FSDP2"],
        ["--deepspeed"],
        ["leave --deepspeed out"],
        flags_to_engine=True,
    ),
    Case(
        "init-weights-unknown",
        train("--init_weights", "kaiming"),
        {"data.jsonl": lines(GOOD)},
        ["'kaiming' is not one of true, false, gaussian, pissa, olora"],
        ["--init_weights"],
        ["pissa"],
        flags_to_engine=True,
    ),
    Case(
        "modules-to-save-not-a-name",
        train("--modules_to_save", "lm/head"),
        {"data.jsonl": lines(GOOD)},
        ["'lm/head' is not a module name"],
        ["--modules_to_save"],
        ["try embed_tokens or lm_head"],
        flags_to_engine=True,
    ),
    Case(
        "report-to-a-tracker-not-installed",
        train("--report_to", "wandb"),
        {"data.jsonl": lines(GOOD)},
        ["wandb is not installed here"],
        ["--report_to"],
        ["`pip install wandb`", "or leave --report_to out"],
        flags_to_engine=True,
    ),
    Case(
        "resume-with-another-lora-shape",
        train("--resume_from_checkpoint", "runs/old", "--lora_rank", "16", "--target_modules", "q_proj"),
        {"data.jsonl": lines(GOOD), **old_run()},
        ["cannot resume", "--lora_rank 8 -> 16", "--target_modules all-linear -> q_proj"],
        ["runs/old/checkpoints/step-4"],
        ["set them back (leave those flags out to take the run's own), or start a new run"],
        flags_to_engine=True,
    ),
    Case(
        "resume-from-a-cut-trainer-state",
        train("--resume_from_checkpoint", "runs/old"),
        {"data.jsonl": lines(GOOD), **cut(old_run(), "runs/old/checkpoints/step-4/trainer_state.pt")},
        ["is damaged", "trainer_state.pt is cut short"],
        ["runs/old/checkpoints/step-4"],
        ["resume from the previous one, step 2: --resume_from_checkpoint", "runs/old/checkpoints/step-2"],
        flags_to_engine=True,
    ),
    Case(
        "resume-from-a-cut-adapter",
        train("--resume_from_checkpoint", "runs/old/checkpoints/step-4"),
        {
            "data.jsonl": lines(GOOD),
            **cut(old_run(), "runs/old/checkpoints/step-4/adapter_model.safetensors"),
        },
        ["is damaged", "adapter_model.safetensors is cut short"],
        ["runs/old/checkpoints/step-4"],
        ["resume from the previous one, step 2: --resume_from_checkpoint", "runs/old/checkpoints/step-2"],
        flags_to_engine=True,
    ),
    # ------------------------------------------------------------ inputs that would never end
    Case(
        "dataset-is-a-fifo",
        train(),
        {"data.jsonl": FIFO},
        ["is a named pipe (FIFO), not a regular file"],
        ["data.jsonl"],
        ["name a .jsonl or .json file saved on disk"],
    ),
    Case(
        "dataset-links-to-dev-zero",
        train(),
        {"data.jsonl": Link("/dev/zero")},
        ["is a character device, not a regular file"],
        ["data.jsonl"],
        ["name a .jsonl or .json file saved on disk"],
    ),
    Case(
        "dataset-too-large",
        train(),
        {"data.jsonl": Sparse(MAX_DATASET_BYTES + 1)},
        ["is 4.0 GiB; dataset files over 4.0 GiB are not read"],
        ["data.jsonl"],
        ["split it into several files"],
    ),
    Case(
        "sample-count-too-large",
        train(data_spec="data.jsonl#100000000"),
        {"data.jsonl": lines(GOOD)},
        ["asks for 100,000,000 samples; one run takes at most 1,000,000"],
        ["data.jsonl#100000000"],
        ["with N up to 1,000,000"],
    ),
    Case(
        "max-steps-too-large",
        train("--max_steps", "10000000000"),
        {"data.jsonl": lines(GOOD)},
        ["must be at most 1000000 (got 10000000000)"],
        ["--max_steps"],
        ["change the flag"],
    ),
    Case(
        "epochs-times-samples-too-many-steps",
        train("--num_train_epochs", "3", data_spec="data.jsonl#1000000"),
        {"data.jsonl": lines(GOOD, GOOD2)},
        ["would take 3,000,000 optimizer steps", "one run takes at most 1,000,000"],
        ["--num_train_epochs"],
        ["raise gradient_accumulation_steps"],
    ),
    Case(
        "batch-times-steps-too-many-samples",
        train(
            "--max_steps",
            "1000",
            "--per_device_train_batch_size",
            "4096",
            "--gradient_accumulation_steps",
            "4096",
            data_spec="data.jsonl#1000000",
        ),
        {"data.jsonl": lines(GOOD)},
        ["would feed 1,000,000,000 samples (1,000 steps of 1,000,000)", "at most 10,000,000"],
        ["--max_steps"],
        ["take fewer samples"],
    ),
    # ------------------------------------------------------------ flags and commands
    Case(
        "unknown-flag",
        train("--frobnicate", "3"),
        {},
        ["unknown flag --frobnicate"],
        ["--frobnicate"],
        ["`tunebench train --help` lists the flags"],
    ),
    Case(
        "a-value-without-its-flag",  # `tunebench train demo`, meaning --model demo
        ["train", "demo"],
        {},
        ["'demo' has no flag before it"],
        ["`tunebench train`"],
        ["for example --model demo"],
    ),
    Case(
        "misspelled-flag",
        train("--lora_rnak", "8"),
        {},
        ["unknown flag --lora_rnak"],
        ["--lora_rnak"],
        ["did you mean --lora_rank?"],
    ),
    Case(
        "hyphenated-misspelt-flag",  # --learning-rate itself is --learning_rate (tests/test_cli.py)
        train("--learning-rat", "1e-4"),
        {},
        ["unknown flag --learning-rat"],
        ["--learning-rat"],
        ["did you mean --learning_rate?"],
    ),
    Case(
        "flag-without-value",
        train("--lora_rank"),
        {},
        ["expected one argument"],
        ["--lora_rank"],
        ["tunebench train --help"],
    ),
    Case(
        "misspelled-command",
        ["trian", "--model", "MODEL", "--dataset", "data.jsonl"],
        {"data.jsonl": lines(GOOD)},
        ["unknown command 'trian'"],
        ["trian"],
        ["did you mean `tunebench train`?"],
    ),
    Case(
        "workbench-without-a-terminal",  # a cron job, a pipe: nothing to draw on or ask on
        ["."],
        {"data.jsonl": lines(GOOD)},
        ["the workbench needs a terminal"],
        ["input or output is not one"],
        ["tmux", "tunebench train"],
    ),
    # ------------------------------------------------------------ models and adapters
    Case(
        "model-folder-without-config",
        ["train", "--model", "notamodel", "--dataset", "data.jsonl", "--output_dir", "runs"],
        {"notamodel": DIR, "notamodel/readme.txt": b"hello", "data.jsonl": lines(GOOD)},
        ["is not a model folder", "no config.json"],
        ["notamodel"],
        ["point --model at the folder that holds config.json"],
    ),
    Case(
        "model-config-not-json",
        ["train", "--model", "broken", "--dataset", "data.jsonl", "--output_dir", "runs"],
        {
            "broken": DIR,
            "broken/config.json": b'{"model_type": "llama",\n',
            "broken/model.safetensors": b"",
            "data.jsonl": lines(GOOD),
        },
        ["not valid JSON"],
        ["broken/config.json:2"],
        ["restore the model's config.json"],
    ),
    Case(
        "model-config-not-a-model",
        ["train", "--model", "other", "--dataset", "data.jsonl", "--output_dir", "runs"],
        {
            "other": DIR,
            "other/config.json": b'{"name": "my app settings"}',
            "other/model.safetensors": b"",
            "data.jsonl": lines(GOOD),
        },
        ['has no "model_type"'],
        ["other/config.json"],
        ["point --model at the folder of a causal language model"],
    ),
    Case(
        "model-pickle-weights-only",
        ["train", "--model", "pickled", "--dataset", "data.jsonl", "--output_dir", "runs"],
        {
            "pickled": DIR,
            "pickled/config.json": b'{"model_type": "llama"}',
            "pickled/pytorch_model.bin": b"not really a pickle",
            "data.jsonl": lines(GOOD),
        },
        ["has no safetensors weights"],
        ["pickled"],
        ["convert them to safetensors"],
    ),
    Case(
        "model-path-missing",
        ["train", "--model", "./no/such/model", "--dataset", "data.jsonl", "--output_dir", "runs"],
        {"data.jsonl": lines(GOOD)},
        ["model not found"],
        ["./no/such/model"],
        ["give 'demo', a local Hugging Face model folder"],
    ),
    Case(
        "chat-adapter-missing",
        ["chat", "--model", "MODEL", "--adapters", "runs/none"],
        {},
        ["adapter not found"],
        ["runs/none"],
        ["give a run folder"],
    ),
    Case(
        "chat-adapter-is-pickle",
        ["chat", "--model", "MODEL", "--adapters", "adapter"],
        {
            "adapter": DIR,
            "adapter/adapter_config.json": b'{"peft_type": "LORA"}',
            "adapter/adapter_model.bin": b"not really a pickle",
        },
        ["pickle file (adapter_model.bin)"],
        ["adapter"],
        ["re-save it as safetensors"],
    ),
    Case(
        "chat-adapter-config-without-peft-type",  # a leaked KeyError: 'peft_type' before
        ["chat", "--model", "MODEL", "--adapters", "adapter"],
        {
            "adapter": DIR,
            "adapter/adapter_config.json": b'{"r": 8, "lora_alpha": 16}',
            "adapter/adapter_model.safetensors": EMPTY_SAFETENSORS,
        },
        ["has no 'peft_type'", "not the config of a PEFT adapter"],
        ["adapter/adapter_config.json"],
        ["point --adapters at a folder saved by PEFT"],
    ),
    Case(
        "chat-adapter-not-lora",
        ["chat", "--model", "MODEL", "--adapters", "adapter"],
        {
            "adapter": DIR,
            "adapter/adapter_config.json": b'{"peft_type": "PROMPT_TUNING"}',
            "adapter/adapter_model.safetensors": EMPTY_SAFETENSORS,
        },
        ["is a PROMPT_TUNING adapter", "loads LoRA adapters"],
        ["adapter/adapter_config.json"],
        ["point --adapters at a LoRA adapter"],
    ),
    Case(
        "chat-misspelled-flag",
        ["chat", "--model", "MODEL", "--tempreature", "0.5"],
        {},
        ["unknown flag --tempreature"],
        ["--tempreature"],
        ["did you mean --temperature?"],
    ),
    Case(
        "chat-negative-temperature",
        ["chat", "--model", "MODEL", "--temperature", "-1"],
        {},
        ["must be at least 0.0"],
        ["--temperature"],
        ["change the flag"],
    ),
]


def tree(*roots: Path) -> dict[str, str]:
    """Every file and folder under the roots, with the hash of each file's bytes."""
    found = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))]:
            info = path.lstat()
            if stat.S_ISDIR(info.st_mode):
                found[str(path)] = "folder"
            elif stat.S_ISLNK(info.st_mode):
                found[str(path)] = f"link to {os.readlink(path)}"
            elif not stat.S_ISREG(info.st_mode) or info.st_size > 2**30:  # a FIFO; a sparse giant
                found[str(path)] = f"mode {info.st_mode:o}, {info.st_size} bytes, mtime {info.st_mtime_ns}"
            else:
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def write_files(root: Path, files: dict[str, object], model: Path | None = None) -> None:
    for name, content in files.items():
        path = root / name
        if content is DIR:
            path.mkdir(parents=True, exist_ok=True)
        elif content is FIFO:
            os.mkfifo(path)
        elif isinstance(content, Link):
            path.symlink_to(content)
        elif isinstance(content, Sparse):
            with open(path, "wb") as fh:
                fh.truncate(content)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            if model is not None and isinstance(content, bytes):
                content = content.replace(b"@MODEL@", str(model).encode())
            path.write_bytes(content)


def run_cli(argv: list[str], capfd) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exit
        code = exc.code
    out, err = capfd.readouterr()
    return code, out, err


def test_the_corpus_is_large_and_distinct():
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_clearly_and_touches_nothing(case, tmp_path, monkeypatch, capfd, tiny_model_dir):
    if case.id == "qlora-without-cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    if case.id == "report-to-a-tracker-not-installed" and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    work = tmp_path / "work"
    work.mkdir()
    write_files(work, case.files, tiny_model_dir)
    monkeypatch.chdir(work)
    before = tree(work, tiny_model_dir)

    argv = [str(tiny_model_dir) if arg == "MODEL" else arg for arg in case.argv]
    code, out, err = run_cli(argv, capfd)

    assert code not in (0, None), f"exit {code}\n{out}\n{err}"
    assert "Traceback" not in out + err
    assert err.startswith("error: ") or "\nerror: " in err, err
    message = err[err.index("error: ") :]
    for words in (*case.what, *case.where, *case.fix):
        assert words in message, f"{words!r} not in:\n{message}"
    assert tree(work, tiny_model_dir) == before  # no file changed, no run folder or checkpoint made


def test_data_errors_come_before_the_model_loads(tmp_path, monkeypatch, capfd, tiny_model_dir):
    """Bad data is found without reading any weights (a 7B model takes a minute to load)."""
    from tunebench.engine.models import loading as models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_bytes(lines(GOOD, b"{broken"))
    code, _, err = run_cli(["train", "--model", str(tiny_model_dir), "--dataset", "data.jsonl"], capfd)
    assert code == 2 and "data.jsonl:2: bad JSON" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_a_max_length_that_leaves_nothing_is_found_before_the_model_loads(
    tmp_path, monkeypatch, capfd, tiny_model_dir
):
    """Only the tokenizer is read to find that --max_length cuts away every answer."""
    from tunebench.engine.models import loading as models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --max_length was checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_bytes(lines(GOOD, GOOD2))
    argv = ["train", "--model", str(tiny_model_dir), "--dataset", "data.jsonl", "--output_dir", "runs"]
    code, _, err = run_cli([*argv, "--max_length", "16"], capfd)
    assert code == 2 and "no training sample is left" in err and "raise --max_length to" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
    # one sample that fits is enough to pass the check (and reach the load)
    (tmp_path / "data.jsonl").write_bytes(lines(GOOD, GOOD2, {"instruction": "q", "output": "a"}))
    with pytest.raises(AssertionError, match="the model was loaded"):
        run_cli([*argv, "--max_length", "48"], capfd)  # "q" / "a" takes 45 tokens


# ================================================================= the same input through the engine


def engine_config(case: Case, folder: str, model: Path) -> dict | None:
    """The StartTraining config for a `train` case that names only files (model, datasets, output),
    relative to the workspace as the TUI sends them. None for cases about flags and their values."""
    names = {
        "--model": "model",
        "--dataset": "dataset",
        "--val_dataset": "val_dataset",
        "--output_dir": "output_dir",
    }
    flags = case.argv[1:]
    if case.argv[0] != "train" or len(flags) % 2 or "--dataset" not in flags:
        return None
    config: dict = {}
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        if case.flags_to_engine and flag not in names:
            name = flag.removeprefix("--")
            is_path = name == "resume_from_checkpoint" and not value.startswith("/")
            config[name] = f"{folder}/{value}" if is_path else parse_value(TrainConfig, name, value)
            continue
        if flag not in names or value.startswith("--"):
            return None
        if value == "MODEL":
            config["model"] = str(model)
        elif value.startswith("./") or value == UNCACHED_HUB_ID:  # a path that is not there stays as typed
            config[names[flag]] = value
        else:
            config[names[flag]] = f"{folder}/{value}"
    for key in ("dataset", "val_dataset"):
        if key in config:
            config[key] = [config[key]]
    return config


ENGINE_CASES = [case for case in CASES if engine_config(case, "x", Path("m")) is not None]


@pytest.fixture(scope="module")
def engine_workspace(tmp_path_factory):
    """The real engine, serving one workspace from a thread of this process."""
    from threaded_engine import ThreadedEngine

    workspace = tmp_path_factory.mktemp("engine") / "ws"
    running = ThreadedEngine(workspace)
    yield workspace
    running.stop()


def test_the_engine_path_covers_the_file_cases():
    assert len(ENGINE_CASES) >= 20


@pytest.mark.parametrize("case", ENGINE_CASES, ids=[case.id for case in ENGINE_CASES])
def test_bad_input_through_the_engine_reads_like_the_cli(case, engine_workspace, tiny_model_dir):
    """What the TUI shows for the same mistake: an EngineError with the same what, where and fix
    (paths are absolute there), no traceback, and every file as it was."""
    if case.id == "report-to-a-tracker-not-installed" and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    from tunebench.engine.core import protocol as P
    from tunebench.engine.process.client import EngineConnection

    folder = engine_workspace / case.id
    folder.mkdir()
    write_files(folder, case.files, tiny_model_dir)
    before = tree(folder, tiny_model_dir)
    config = engine_config(case, case.id, tiny_model_dir)
    with EngineConnection.open(engine_workspace) as conn:
        conn.hello("test")
        request_id = conn.send(P.StartTraining(config=config))
        error = conn.wait_for("EngineError", id=request_id, timeout=60)
        # settings that fail validation are refused with the request, before any job starts
        refused = error.message.startswith("invalid settings:")
        status = None if refused else conn.wait_for("JobStatus", id=request_id, timeout=60)
        while status is not None and status.state == "started":
            status = conn.wait_for("JobStatus", id=request_id, timeout=60)
    text = f"{error.message}\n  hint: {error.hint}".replace(f"{folder}/", "")
    assert (refused or status.state == "failed") and error.hint and "Traceback" not in text
    for words in (*case.what, *case.where, *case.fix):
        assert words in text, f"{words!r} not in:\n{text}"
    assert tree(folder, tiny_model_dir) == before


# ================================================================= accepted input


def test_bom_extra_fields_and_skippable_records_are_accepted(tmp_path, monkeypatch, capfd, tiny_model_dir):
    """A UTF-8 BOM is read as if absent (Windows editors write one); unknown extra fields are
    ignored, as ms-swift ignores them; a readable record that is not a usable sample is skipped and
    reported, not fatal; a long answer is truncated to max_length and counted."""
    monkeypatch.chdir(tmp_path)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + lines(GOOD, GOOD2))
    bom_json = tmp_path / "bom.json"
    bom_json.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    extras = tmp_path / "extras.jsonl"
    extras.write_bytes(
        lines({**GOOD, "id": 7, "source": "web", "meta": {"lang": "en"}}, {"instruction": "no answer here"})
    )
    long = tmp_path / "long.jsonl"
    long.write_bytes(lines({"instruction": "Tell me a story.", "output": "Once upon a time. " * 2000}))
    inputs = {p: p.read_bytes() for p in (bom, bom_json, extras, long)}

    argv = ["train", "--model", str(tiny_model_dir), "--output_dir", "runs", "--run_name", "ok"]
    argv += ["--dataset", "bom.jsonl", "bom.json", "extras.jsonl", "long.jsonl"]
    code, out, err = run_cli([*argv, "--max_length", "256", "--max_steps", "1", "--json"], capfd)

    assert code == 0, err
    assert "Traceback" not in out + err
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    report = next(e for e in events if e["type"] == "DataReport")
    assert report["samples"] == 5  # two + one + the extras record + the long one
    assert (report["skipped"], report["truncated"], report["dropped"]) == (1, 1, 0)
    assert report["problems"] == [
        "extras.jsonl:2: missing field 'output' (or 'response', 'answer', 'solution', 'completion')"
    ]
    assert events[-1]["type"] == "TrainFinished" and events[-1]["status"] == "completed"
    assert {p: p.read_bytes() for p in inputs} == inputs
    assert (tmp_path / "runs" / "ok" / "adapter" / "adapter_model.safetensors").is_file()


def test_tool_calls_train_through_a_template_with_tools(tmp_path, monkeypatch, capfd, tiny_model_dir):
    """Glaive records train with --template qwen: no record dropped, the tools in the prompt."""
    monkeypatch.chdir(tmp_path)
    no_call = {
        **GLAIVE_CALL,
        "conversations": [GLAIVE_CALL["conversations"][0], {"from": "gpt", "value": "Sunny."}],
    }
    (tmp_path / "glaive.jsonl").write_bytes(lines(GLAIVE_CALL, no_call))
    argv = ["train", "--model", str(tiny_model_dir), "--dataset", "glaive.jsonl", "--output_dir", "runs"]
    code, out, err = run_cli([*argv, "--template", "qwen", "--max_steps", "1", "--json"], capfd)
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    report = next(e for e in events if e["type"] == "DataReport")
    assert report["samples"] == 2 and report["dropped"] == 0 and report["problems"] == []


def test_bom_records_read_like_plain_ones(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(lines(GOOD, GOOD2))
    # Files joined with `cat` carry a BOM at the start of each part.
    with_boms = tmp_path / "boms.jsonl"
    with_boms.write_bytes(b"\xef\xbb\xbf" + lines(GOOD) + b"\xef\xbb\xbf" + lines(GOOD2))
    expected = [s.messages for s in data.read_records(plain)[0]]
    samples, problems = data.read_records(with_boms)
    assert problems == [] and [s.messages for s in samples] == expected


# ========================================= loading never runs code from the model folder


def booby_trapped_copy(tiny_model_dir: Path, folder: Path, marker: Path) -> Path:
    """The tiny model, plus a pickle weights file and custom model code that would each create
    `marker` if anything unpickled or imported them."""
    import pickle
    import shutil

    shutil.copytree(tiny_model_dir, folder)

    class Trap:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Trap()}))
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_models_load_from_safetensors_without_remote_code(tiny_model_dir, tmp_path, monkeypatch):
    import torch
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.models.loading import load_model

    marker = tmp_path / "code-ran"
    folder = booby_trapped_copy(tiny_model_dir, tmp_path / "model", marker)

    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.load (pickle) was called while loading a model")

    monkeypatch.setattr(torch, "load", no_pickles)
    assert TrainConfig().trust_remote_code is False  # off unless the person turns it on
    loaded = load_model(str(folder), device=torch.device("cpu"))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"  # the library's class, not evil.py's
    assert not marker.exists()


def test_trust_remote_code_is_a_flag_that_defaults_off():
    from tunebench.engine.cli.flags import config_from_args
    from tunebench.engine.cli.train import build_train_parser

    parser = build_train_parser()
    assert config_from_args(parser.parse_args(["--dataset", "d.jsonl"])).trust_remote_code is False
    assert config_from_args(
        parser.parse_args(["--dataset", "d.jsonl", "--trust_remote_code"])
    ).trust_remote_code


def test_adapters_load_from_safetensors_only(tmp_path, monkeypatch):
    """A PEFT adapter folder holding only a pickle is refused before anything reads it; with both,
    PEFT reads the safetensors file."""
    from tunebench.engine.core.errors import UserError
    from tunebench.engine.core.targets import find_adapter_dir

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="pickle"):
        find_adapter_dir(str(folder))


# ======================================================================= huge records


def test_the_long_prompt_shortcut_never_drops_a_prompt_that_fits(tiny_tokenizer):
    """Multi-megabyte prompts are counted chunk by chunk and dropped early; the count must never
    call a prompt "over" when it fits, or a sample that trains would be lost."""
    text = ("Who are you? I am swift-robot, an AI assistant developed by swift.\n" * 3000) + "x" * 70_000
    exact = len(tiny_tokenizer([text], add_special_tokens=False)["input_ids"][0])
    assert len(text) > 2 * encoding._CHUNK_CHARS  # several chunks, so the cuts are exercised
    assert not encoding.prompt_over(text, tiny_tokenizer, exact)
    assert encoding.prompt_over(text, tiny_tokenizer, int(exact / 1.2))


def test_every_numeric_setting_is_bounded_on_both_sides():
    """A number out of range is refused where it is parsed (flag, form, engine request), not by
    numpy or torch halfway through a run: so every numeric field carries both bounds."""
    import dataclasses
    from typing import get_type_hints

    from tunebench.engine.core.config import GenerationConfig, TrainConfig

    for cls in (TrainConfig, GenerationConfig):
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float) and "choices" not in f.metadata:
                assert "max" in f.metadata and ("min" in f.metadata or "gt" in f.metadata), f.name


def engine_events(workspace: Path, config: dict, timeout: float = 300) -> list:
    """Every event of one training job the engine runs for `config`, up to its end."""
    from tunebench.engine.core import protocol as P
    from tunebench.engine.process.client import EngineConnection

    events = []
    with EngineConnection.open(workspace) as conn:
        conn.hello("test")
        request_id = conn.send(P.StartTraining(config=config))
        while True:
            event = conn.recv(timeout=timeout)
            events.append(event)
            if isinstance(event, P.JobStatus) and event.id == request_id and event.state != "started":
                return events
            if (
                isinstance(event, P.EngineError)
                and event.id == request_id
                and event.message.startswith("invalid settings:")
            ):
                return events


def test_a_val_ratio_that_holds_out_nothing_says_so(
    tmp_path, monkeypatch, capfd, tiny_model_dir, engine_workspace
):
    """--val_ratio 0.5 of one sample: the one sample trains, so there is no eval; a note says so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one.jsonl").write_bytes(lines(GOOD))
    argv = ["train", "--model", str(tiny_model_dir), "--dataset", "one.jsonl", "--output_dir", "runs"]
    code, out, err = run_cli([*argv, "--val_ratio", "0.5", "--max_steps", "1", "--json"], capfd)
    assert code == 0, err
    notes = [e["message"] for e in map(json.loads, out.splitlines()) if e["type"] == "Log"]
    assert any("--val_ratio 0.5 holds out nothing from 1 sample" in n and "no eval" in n for n in notes), (
        notes
    )

    folder = engine_workspace / "val-ratio-one-sample"
    folder.mkdir()
    (folder / "one.jsonl").write_bytes(lines(GOOD))
    config = {"model": str(tiny_model_dir), "dataset": [f"{folder.name}/one.jsonl"], "val_ratio": 0.5}
    events = engine_events(engine_workspace, {**config, "max_steps": 1, "output_dir": f"{folder.name}/runs"})
    notes = [e.message for e in events if e.type == "Log"]
    assert any(
        "holds out nothing from 1 sample" in n and "add samples, or give --val_dataset" in n for n in notes
    )


# ================================================================= failed writes


def test_a_file_size_limit_hit_by_a_checkpoint_names_the_file_and_the_space_left(tmp_path, tiny_model_dir):
    """A checkpoint that passes the file size limit (RLIMIT_FSIZE, as `ulimit -f` sets it) fails in
    torch.save with a bare "[enforce fail at inline_container.cc]": the message must say which
    file, why and what is left, and the half-written checkpoint must not stay behind."""
    import resource
    import subprocess
    import sys

    (tmp_path / "data.jsonl").write_bytes(lines(GOOD, GOOD2))
    before = tree(tmp_path / "data.jsonl")
    limit = 16 * 1024  # the run's config and metrics fit; the adapter and optimizer state do not

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = ["train", "--model", str(tiny_model_dir), "--dataset", "data.jsonl", "--output_dir", "runs"]
    argv += ["--run_name", "r", "--max_steps", "2", "--save_steps", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "tunebench.engine.cli.main", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        preexec_fn=limited,
        env={**__import__("os").environ, "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=600,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "inline_container" not in done.stderr
    message = done.stderr[done.stderr.index("error: ") :]
    for words in ("could not write", "runs/r/checkpoints/step-1/", "file size limit", "free on"):
        assert words in message, f"{words!r} not in:\n{message}"
    assert "ulimit -f`; now 16.0 KiB" in message
    assert not list((tmp_path / "runs" / "r" / "checkpoints").glob(".tmp-*"))
    assert tree(tmp_path / "data.jsonl") == before


def test_a_full_disk_through_the_engine_names_the_file_and_the_space_left(
    engine_workspace, tiny_model_dir, monkeypatch
):
    import errno

    import torch

    def disk_full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    folder = engine_workspace / "disk-full"
    folder.mkdir()
    (folder / "data.jsonl").write_bytes(lines(GOOD, GOOD2))
    before = tree(folder / "data.jsonl")
    config = {"model": str(tiny_model_dir), "dataset": [f"{folder.name}/data.jsonl"], "run_name": "r"}
    config.update(output_dir=f"{folder.name}/runs", max_steps=2, save_steps=1)
    events = engine_events(engine_workspace, config)
    error = next(e for e in events if e.type == "EngineError")
    text = f"{error.message}\n  hint: {error.hint}"
    assert error.code == "disk" and "please report" not in text, text
    for words in ("could not write", "checkpoints/step-1/trainer_state.pt", "the disk is full", "free on"):
        assert words in text, f"{words!r} not in:\n{text}"
    assert "free space on that disk" in error.hint
    assert not list((folder / "runs" / "r" / "checkpoints").glob(".tmp-*"))
    assert tree(folder / "data.jsonl") == before


# ================================================================= resuming with other settings


def test_a_resume_keeps_the_runs_settings_applies_what_it_can_and_warns_of_other_data(
    tmp_path, monkeypatch, capfd, tiny_model_dir, engine_workspace
):
    """A rank-8 run resumed with --lora_rank 16 (the TUI's r sends the form's values) was a size
    mismatch traceback: now a refusal that lists it. Epochs and learning rate are applied and
    reported; data edited since the run started is warned of; left-out flags take the run's own."""
    monkeypatch.chdir(tmp_path)
    data_file = tmp_path / "data.jsonl"
    data_file.write_bytes(lines(GOOD, GOOD2))
    first = ["train", "--model", str(tiny_model_dir), "--dataset", "data.jsonl", "--output_dir", "runs"]
    first += ["--run_name", "r", "--max_steps", "2", "--save_steps", "1", "--lora_rank", "4", "--json"]
    code, _, err = run_cli(first, capfd)
    assert code == 0, err
    checkpoints = sorted((tmp_path / "runs" / "r" / "checkpoints").iterdir())
    before = tree(tmp_path / "runs" / "r")

    code, out, err = run_cli(["train", "--resume_from_checkpoint", "runs/r", "--lora_rank", "16"], capfd)
    assert code == 2 and "Traceback" not in out + err, err
    assert "cannot resume" in err and "--lora_rank 4 -> 16" in err and "set them back" in err
    assert tree(tmp_path / "runs" / "r") == before  # nothing of the run touched

    data_file.write_bytes(lines(GOOD2, GOOD))  # the same samples, edited: other bytes
    resume = ["train", "--resume_from_checkpoint", "runs/r", "--max_steps", "3", "--lr", "2e-4", "--json"]
    code, out, err = run_cli(resume, capfd)
    assert code == 0 and "Traceback" not in out + err, err
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    notes = [e["message"] for e in events if e["type"] == "Log"]
    assert any("--max_steps 2 -> 3" in n and "--learning_rate 0.0001 -> 0.0002" in n for n in notes), notes
    assert any("resuming on different data" in n and "data.jsonl changed" in n for n in notes), notes
    started = next(e for e in events if e["type"] == "TrainStarted")
    # the run kept its last step's checkpoint (step 2) as well as step 1's: it goes on from step 2
    assert (started["start_step"], started["total_steps"]) == (2, 3) and len(checkpoints) == 2
    assert "--lora_rank 4" in started["command"]  # the run's own rank, though no flag gave it

    # the engine, as the TUI's r sends it: the form's values, one of them a rank the run lacks
    config = {"model": str(tiny_model_dir), "dataset": [str(data_file)], "lora_rank": 16, "max_steps": 5}
    config["resume_from_checkpoint"] = str(tmp_path / "runs" / "r")
    events = engine_events(engine_workspace, config)
    error = next(e for e in events if e.type == "EngineError")
    assert error.code == "config" and "--lora_rank 4 -> 16" in error.message, error
    assert "please report" not in error.hint
    events = engine_events(engine_workspace, {**config, "lora_rank": 4})
    notes = [e.message for e in events if e.type == "Log"]
    assert any("resumed with changed settings: --max_steps 3 -> 5" in n for n in notes), notes
    assert next(e for e in events if e.type == "TrainFinished").steps == 5


# ================================================================= a plan that cannot fit in RAM


def test_a_plan_too_big_for_the_ram_is_refused_with_settings_that_fit(
    tmp_path, monkeypatch, capfd, tiny_model_dir, engine_workspace
):
    """Without a GPU the run's peak is in RAM (issue 14: 17.6 GiB of a 23.5 GiB box): a plan that
    cannot fit in the free RAM is refused before the model loads, through the CLI and the engine
    alike, with settings that would fit. The free RAM is set so one sample per micro-batch fits."""
    import torch
    from tunebench.engine.core import estimate
    from tunebench.engine.core import protocol as P
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.process.client import EngineConnection

    if torch.cuda.is_available():
        pytest.skip("with CUDA the run's peak is on the GPU")
    info = estimate.read_model_info(str(tiny_model_dir))
    one_sample = estimate.HostPlan.of(TrainConfig(per_device_train_batch_size=1, max_length=64))
    free = one_sample.parts(estimate.ModelShape.from_config(info))["total"]
    monkeypatch.setattr(estimate, "host_available_bytes", lambda: free)
    flags = ["--per_device_train_batch_size", "4", "--max_length", "64"]
    what = ["GiB of RAM at its peak", "GiB is free", "no GPU here", "micro-batches of 4 x"]
    fix = ["any one of these fits: per_device_train_batch_size 1 with gradient_accumulation_steps 4"]

    work = tmp_path / "work"
    write_files(work, {"data.jsonl": lines(GOOD, GOOD2)})
    monkeypatch.chdir(work)
    before = tree(work, tiny_model_dir)
    code, out, err = run_cli(
        ["train", "--model", str(tiny_model_dir), "--dataset", "data.jsonl", *flags], capfd
    )
    assert code not in (0, None) and "Traceback" not in out + err, err
    message = err[err.index("error: ") :]
    for words in (*what, *fix):
        assert words in message, f"{words!r} not in:\n{message}"
    assert tree(work, tiny_model_dir) == before  # nothing written, no run folder

    folder = engine_workspace / "ram"
    write_files(folder, {"data.jsonl": lines(GOOD, GOOD2)})
    before = tree(folder, tiny_model_dir)
    config = {
        "model": str(tiny_model_dir),
        "dataset": ["ram/data.jsonl"],
        "output_dir": "ram/runs",
        "per_device_train_batch_size": 4,
        "max_length": 64,
    }
    with EngineConnection.open(engine_workspace) as conn:
        conn.hello("test")
        request_id = conn.send(P.StartTraining(config=config))
        error = conn.wait_for("EngineError", id=request_id, timeout=60)
        status = conn.wait_for("JobStatus", id=request_id, timeout=60)
        while status.state == "started":
            status = conn.wait_for("JobStatus", id=request_id, timeout=60)
    text = f"{error.message}\n  hint: {error.hint}"
    assert (
        status.state == "failed"
        and error.code == "config"
        and "Traceback" not in text
        and "[internal]" not in text
    )
    for words in (*what, *fix):
        assert words in text, f"{words!r} not in:\n{text}"
    assert tree(folder, tiny_model_dir) == before


def test_a_dataset_mostly_skipped_says_so_before_training(tmp_path, monkeypatch, capfd, tiny_model_dir):
    """Two good records among five in a format TuneBench does not read trained on the two, with
    the skipped ones listed but nothing saying most of the data was left out."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mixed.jsonl").write_bytes(lines(GOOD, GOOD, *[{"prompt_text": "q", "reply": "a"}] * 3))
    argv = ["train", "--model", str(tiny_model_dir), "--output_dir", "runs", "--dataset", "mixed.jsonl"]
    code, out, err = run_cli([*argv, "--max_steps", "1"], capfd)
    assert code == 0, err
    assert "3 of 5 records could not be read and are skipped" in out

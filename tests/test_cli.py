"""`tunebench train` flags: ms-swift spelling, clear errors, and a real headless run."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
from tunebench.engine.cli.flags import config_from_args, join_negative_numbers
from tunebench.engine.cli.main import main
from tunebench.engine.cli.train import build_train_parser
from tunebench.engine.core.config import ConfigError, TrainConfig, to_command, validate

SWIFT_ARTICLE_COMMAND = """
  --model demo --train_type lora --dataset sample_data/self_cognition.jsonl
  --torch_dtype bfloat16 --num_train_epochs 10 --per_device_train_batch_size 1
  --per_device_eval_batch_size 1 --learning_rate 1e-4 --lora_rank 8 --lora_alpha 32
  --target_modules all-linear --gradient_accumulation_steps 16 --eval_steps 50
  --save_steps 50 --save_total_limit 2 --logging_steps 5 --max_length 2048
  --output_dir output --system 'You are a helpful assistant.' --warmup_ratio 0.05
  --dataloader_num_workers 4 --model_author swift --model_name swift-robot
"""


def parse(argv: str) -> TrainConfig:
    return config_from_args(build_train_parser().parse_args(join_negative_numbers(shlex.split(argv))))


def test_the_swift_article_command_parses_as_written():
    cfg = parse(SWIFT_ARTICLE_COMMAND)
    assert cfg.train_type == "lora" and cfg.torch_dtype == "bfloat16"
    assert cfg.num_train_epochs == 10.0 and cfg.gradient_accumulation_steps == 16
    assert cfg.learning_rate == 1e-4 and cfg.lora_rank == 8 and cfg.lora_alpha == 32
    assert cfg.target_modules == ["all-linear"] and cfg.system == "You are a helpful assistant."
    assert cfg.model_name == ["swift-robot"] and cfg.model_author == ["swift"]
    assert cfg.output_dir == "output" and cfg.dataloader_num_workers == 4


def test_swift_spellings_and_lists():
    cfg = parse(
        "--dataset a.json#50 b.jsonl --quant_bits 4 --target_modules q_proj,v_proj "
        "--model_name 小黄 'Xiao Huang' --split_dataset_ratio 0.1 --gradient_checkpointing false"
    )
    assert cfg.dataset == ["a.json#50", "b.jsonl"] and cfg.train_type == "qlora"
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.model_name == ["小黄", "Xiao Huang"]
    assert cfg.val_ratio == 0.1 and cfg.gradient_checkpointing is False


def test_a_repeated_list_flag_adds_to_the_list():
    """--dataset a --dataset b kept only b."""
    cfg = parse(
        "--dataset a.jsonl b.jsonl --dataset c.jsonl#5 --val_dataset v.jsonl --val_dataset w.jsonl "
        "--target_modules q_proj,v_proj --target_modules o_proj"
    )
    assert cfg.dataset == ["a.jsonl", "b.jsonl", "c.jsonl#5"] and cfg.val_dataset == ["v.jsonl", "w.jsonl"]
    assert cfg.target_modules == ["q_proj", "v_proj", "o_proj"]
    assert cfg.lora_rank == 8  # a flag of one value: the last one given, as before


def test_hyphenated_flags_are_the_underscore_ones():
    """--lora-rank was refused as an unknown flag."""
    cfg = parse("--dataset d.jsonl --lora-rank 16 --num-train-epochs=2 --target-modules q_proj --lora-r 4")
    assert cfg.lora_rank == 4 and cfg.num_train_epochs == 2.0 and cfg.target_modules == ["q_proj"]
    assert parse("--dataset d.jsonl --system=--lora-rank").system == "--lora-rank"  # a value stays


def test_command_line_round_trips():
    cfg = parse("--dataset 'my data.jsonl#5' --lora_rank 16 --system 'Be brief.' --learning_rate 2e-4")
    again = parse(to_command(cfg).removeprefix("tunebench train"))
    assert again == cfg


@pytest.mark.parametrize(
    "argv, field, words",
    [
        ("--lora_rank 0", "lora_rank", "at least 1"),
        ("--learning_rate -1e-4", "learning_rate", "greater than 0"),
        ("--per_device_train_batch_size 0", "per_device_train_batch_size", "at least 1"),
        ("--lora_rank eight", "lora_rank", "not a whole number"),
        ("--train_type full", "train_type", "not one of lora, qlora"),
        ("--target_modules 'q proj'", "target_modules", "not a module name"),
        ("--gradient_checkpointing maybe", "gradient_checkpointing", "not true or false"),
        ("--val_ratio 0.1 --val_dataset v.jsonl", "val_ratio", "not both"),
    ],
)
def test_bad_values_name_the_flag_and_the_problem(argv, field, words):
    with pytest.raises(ConfigError) as info:
        parse("--dataset d.jsonl " + argv)
    assert words in info.value.problems[field]
    assert f"--{field}" in str(info.value)


def test_validate_reports_every_problem_at_once():
    cfg = TrainConfig(dataset=["x"])
    cfg.lora_rank, cfg.learning_rate = 0, 0.0
    assert set(validate(cfg)) == {"lora_rank", "learning_rate"}


def test_unknown_flag_is_named(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", "d.jsonl", "--lora_rankk", "8"])
    assert info.value.code == 2
    assert "unknown flag --lora_rankk" in capsys.readouterr().err


def test_errors_print_without_traceback(capsys, tmp_path):
    code = main(["train", "--dataset", "d.jsonl", "--lora_rank", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--lora_rank: must be at least 1" in err and "Traceback" not in err
    code = main(["train", "--model", str(tmp_path / "nope"), "--dataset", "d.jsonl"])
    assert code == 2 and "model not found" in capsys.readouterr().err


def test_a_refused_train_with_json_prints_its_error_as_an_event(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """A tool that reads --json's events saw nothing on stdout when the data or a setting was
    wrong: the error went to stderr as text only."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"messages": [\n')
    for flags, code in (
        (["--dataset", "bad.jsonl"], "data"),
        (["--dataset", "bad.jsonl", "--lora_rank", "0"], "config"),
    ):
        assert main(["train", "--model", str(tiny_model_dir), *flags, "--json"]) == 2
        out, err = capsys.readouterr()
        (event,) = [json.loads(line) for line in out.splitlines()]
        assert event["type"] == "EngineError" and event["code"] == code and event["message"], event
        assert err.startswith("error: ")


def test_headless_train_with_json_events(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Say hi {i}", "output": "hi from {{NAME}}"} for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunebench.engine.cli.main",
            "train",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            f"{data}#8",
            "--model_name",
            "bot",
            "--max_steps",
            "3",
            "--logging_steps",
            "1",
            "--output_dir",
            str(tmp_path / "runs"),
            "--run_name",
            "cli",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "TrainFinished" and kinds.count("TrainStep") == 3
    report = next(e for e in events if e["type"] == "DataReport")
    assert report["samples"] == 8  # #8 over a 6-record file repeats it, as ms-swift does
    assert (tmp_path / "runs" / "cli" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture
def tui_opened(monkeypatch):
    """Stands in for the workbench: the folders `tunebench [WORKSPACE]` opened, with no UI."""
    import tunebench.tui.app as tui_app

    opened: list = []
    monkeypatch.setattr(tui_app, "run", lambda workspace, model=None: opened.append(workspace) or 0)
    return opened


def answer_on_a_terminal(monkeypatch, reply: str | None) -> list[str]:
    """A terminal that answers `reply` (None: no terminal); returns the questions asked."""
    import tunebench.engine.cli.main as cli

    asked: list[str] = []
    monkeypatch.setattr(cli, "_has_terminal", lambda: reply is not None)
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or reply or "")
    return asked


def test_a_non_empty_folder_becomes_a_workspace_only_when_the_person_says_yes(
    tmp_path, monkeypatch, capfd, tui_opened
):
    """Issue 16 item 11: `tunebench` in a folder of other files created datasets/ runs/ exports/
    .tunebench/ tunebench.toml there without asking."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    asked = answer_on_a_terminal(monkeypatch, "n")
    assert main([str(folder)]) != 0
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"] and tui_opened == []
    out, err = capfd.readouterr()
    assert "datasets/ runs/ exports/ .tunebench/ tunebench.toml" in out + err and asked

    answer_on_a_terminal(monkeypatch, "y")
    assert main([str(folder)]) == 0 and tui_opened == [folder.resolve()]


def test_without_a_terminal_the_workbench_says_so_and_creates_nothing(tmp_path, capsys):
    """`tunebench ws < /dev/null > log` (a cron job, a pipe) drew the workbench's escape codes into
    the log, created the folder and left its engine running."""
    assert main([str(tmp_path / "ws")]) == 2  # pytest's stdin and stdout are no terminal
    assert "needs a terminal" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize(
    ("typed", "ours"),
    [
        ("sft", "tunebench train"),
        ("infer", "tunebench chat"),
        ("merge-lora", "tunebench export"),
        ("web-ui", "tunebench [WORKSPACE]"),
    ],
)
def test_other_tools_command_names_point_to_ours_and_create_nothing(
    typed, ours, tmp_path, monkeypatch, capsys
):
    """`tunebench sft --model ...`, from `swift sft` habit, opened a workspace named sft."""
    monkeypatch.chdir(tmp_path)
    assert main([typed, "--model", "demo"]) == 2
    err = capsys.readouterr().err
    assert f"unknown command {typed!r}" in err and f"`{ours}`" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_status_and_stop_take_help_not_a_folder_named_help(capsys):
    for command in ("status", "stop"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        assert f"usage: tunebench {command} [-h] [workspace]" in capsys.readouterr().out


def test_new_empty_and_existing_workspaces_open_without_a_question(tmp_path, monkeypatch, tui_opened):
    asked = answer_on_a_terminal(monkeypatch, "n")
    empty = tmp_path / "empty"
    empty.mkdir()
    existing = tmp_path / "existing"
    (existing / ".tunebench").mkdir(parents=True)
    (existing / "tunebench.toml").write_text("")
    (existing / "datasets").mkdir()
    for folder in (tmp_path / "new", empty, existing):
        assert main([str(folder)]) == 0
    assert tui_opened == [(tmp_path / "new").resolve(), empty.resolve(), existing.resolve()]
    assert asked == []


def test_the_workbench_usage_is_printed_once(tmp_path, capsys):
    """`tunebench workspace /tmp/x` (two folders) printed "usage: usage: tunebench ..."."""
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a"), str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert err.startswith("usage: tunebench [WORKSPACE]") and "usage: usage:" not in err
    assert "unrecognized arguments" in err


def test_ctrl_c_before_a_command_takes_it_says_so(monkeypatch, capsys):
    """A Ctrl-C while the command was still importing exited 130 without a word."""
    import tunebench.engine.cli.status as status

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(status, "status_main", interrupted)
    assert main(["status"]) == 130
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err


def test_the_data_line_counts_the_records_it_skipped(capsys):
    """A file with unreadable records said '0 dropped' right above the records it skipped
    ('dropped' counts the samples left out when tokenised)."""
    from tunebench.engine.cli.progress import ProgressRenderer
    from tunebench.engine.core import protocol as P

    problems = ["d.jsonl:2: unknown format (keys: bad)"]
    ProgressRenderer()(P.DataReport(samples=2, tokens=70, problems=problems, skipped=1))
    out = capsys.readouterr().out
    assert "2 training samples, 0 eval, 70 tokens; 1 skipped, 0 truncated, 0 dropped" in out
    assert "  skipped d.jsonl:2: unknown format" in out


def test_ms_swift_flags_with_nothing_to_set_are_accepted_and_said(capsys):
    """--packing true, --use_liger_kernel true and the like stopped a copied `swift sft` command
    with a bare 'unknown flag'."""
    from tunebench.engine.cli import train as train_cli
    from tunebench.engine.cli.flags import flag_values

    argv = ["--packing", "true", "--use_liger_kernel", "true", "--dataset_num_proc", "4"]
    argv += ["--save_only_model", "true", "--eval_strategy", "no", "--add_version", "false"]
    args = train_cli.build_train_parser().parse_args(argv)
    values = flag_values(args)
    train_cli._say_swift_only_flags(args, values)
    notes = capsys.readouterr().err.splitlines()
    assert [n.split(":")[1].strip() for n in notes] == [
        "--packing true",
        "--use_liger_kernel true",
        "--dataset_num_proc 4",
        "--save_only_model true",
        "--eval_strategy no",
        "--add_version false",
    ]
    assert values["val_ratio"] == 0.0  # --eval_strategy no: no evaluation, as in ms-swift
    args = train_cli.build_train_parser().parse_args(["--eval_strategy", "steps", "--val_ratio", "0.1"])
    values = flag_values(args)
    train_cli._say_swift_only_flags(args, values)
    assert values["val_ratio"] == 0.1


# Flags from ms-swift's examples and articles that stopped at "unknown flag": each is a note now.
SWIFT_EXAMPLE_FLAGS = (
    '--lora_dtype float32 --gradient_checkpointing_kwargs {"use_reentrant":false} --max_pixels 1003520 '
    "--ddp_find_unused_parameters false --ddp_backend nccl --dataset_shuffle true --data_seed 42 "
    "--dataloader_pin_memory true --load_from_cache_file false --group_by_length false "
    "--save_safetensors true --torch_compile false --logging_first_step true --tuner_backend peft "
    "--use_cpu false --agent_template hermes --create_checkpoint_symlink false"
)


def test_flags_from_ms_swifts_examples_are_noted_and_warmup_steps_is_a_setting(capsys):
    from tunebench.engine.cli import train as train_cli
    from tunebench.engine.cli.flags import flag_values

    args = train_cli.build_train_parser().parse_args([*SWIFT_EXAMPLE_FLAGS.split(), "--warmup_steps", "10"])
    values = flag_values(args)
    train_cli._say_swift_only_flags(args, values)
    said = {line.split(":")[1].strip().split()[0] for line in capsys.readouterr().err.splitlines()}
    assert said == {word for word in SWIFT_EXAMPLE_FLAGS.split() if word.startswith("--")}
    assert values == {"warmup_steps": 10}


QLORA_LINE = (
    "--train_type lora --quant_method bnb --quant_bits 4 --bnb_4bit_compute_dtype bfloat16 "
    "--bnb_4bit_quant_type nf4 --bnb_4bit_use_double_quant true --optim adamw_torch "
    "--adam_beta2 0.999 --lora_bias none --truncation_strategy right --lazy_tokenize true"
)


def test_a_copied_ms_swift_qlora_command_runs_and_each_flag_says_what_happens_here(capsys):
    """ms-swift's QLoRA line (--quant_method bnb --bnb_4bit_...) stopped at 'unknown flag'."""
    from tunebench.engine.cli import train as train_cli
    from tunebench.engine.cli.flags import flag_values

    args = train_cli.build_train_parser().parse_args(QLORA_LINE.split())
    values = flag_values(args)
    train_cli._say_swift_only_flags(args, values)
    said = {n.split(":")[1].strip().split()[0] for n in capsys.readouterr().err.splitlines()}
    assert said == {f for f in QLORA_LINE.split() if f.startswith("--")} - {
        "--train_type",
        "--quant_bits",
    }
    assert values["quant_bits"] == 4


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--optim", "adafactor"),
        ("--lora_bias", "all"),
        ("--truncation_strategy", "delete"),
        ("--adam_beta2", "0.95"),
        ("--quant_method", "hqq"),
        ("--neftune_noise_alpha", "5"),
        ("--use_chat_template", "false"),
        ("--lora_dtype", "bfloat16"),
        ("--dataset_shuffle", "false"),
        ("--agent_template", "react_en"),
        ("--custom_dataset_info", "info.json"),
    ],
)
def test_an_ms_swift_flag_asking_for_other_training_is_refused_not_noted(capsys, flag, value):
    """Ignored with a note, --optim adafactor would train with AdamW while the command says otherwise."""
    assert main(["train", "--model", "demo", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag}: {value!r} is not done here: " in err and f"leave {flag} out" in err
    assert "Traceback" not in err


def test_swift_infer_flags_are_noted_or_refused_by_their_value(capsys):
    """--max_length and --val_dataset from a `swift infer` line get a note; --num_beams 4 would
    answer otherwise than the command says, so it is refused before anything loads. --stop_words
    is a generation setting, a list as in ms-swift."""
    assert main(["chat", "--model", "demo", "--num_beams", "4"]) == 2
    err = capsys.readouterr().err
    assert "--num_beams: '4' is not done here: each answer is one sequence" in err and "loading" not in err
    from tunebench.engine.cli.flags import (
        adapter_parser,
        generation_config,
        parse_args,
        say_swift_infer_flags,
    )

    line = "--stop_words x Observation: --max_length 4096 --num_beams 1 --val_dataset a.jsonl b.jsonl"
    args = parse_args(adapter_parser("tunebench chat", ""), line.split())
    say_swift_infer_flags(args)
    notes = capsys.readouterr().err
    assert "note: --max_length 4096:" in notes and "note: --val_dataset a.jsonl b.jsonl:" in notes
    assert "note: --num_beams 1:" in notes and "stop_words" not in notes
    assert generation_config(args).stop_words == ["x", "Observation:"]


def test_a_copied_swift_export_line_is_noted_and_its_token_stays_off_the_screen(capsys, tmp_path):
    """ms-swift's README pushes an export with --push_to_hub true --hub_model_id ... --hub_token
    ...: each is noted (nothing is uploaded from here), and the token is never printed."""
    line = "--push_to_hub true --hub_model_id me/bee --hub_token hf_secret123 --use_hf false"
    assert main(["export", "--adapters", str(tmp_path / "missing"), *line.split()]) == 2
    err = capsys.readouterr().err
    assert "note: --push_to_hub true: nothing is uploaded from here" in err
    assert "note: --hub_token ...:" in err and "hf_secret123" not in err
    assert "does not exist" in err  # the notes come first, then the command goes on
    assert main(["export", "--adapters", str(tmp_path), "--to_mcore", "true"]) == 2
    assert "--to_mcore: 'true' is not done here: Megatron-Core" in capsys.readouterr().err


def test_chat_takes_a_copied_swift_infer_command_and_says_what_its_flags_do_here(capsys):
    """ms-swift's README infer line stopped at --infer_backend vllm, then at each of the others in turn."""
    from tunebench.engine.cli.flags import (
        adapter_parser,
        parse_args,
        say_swift_infer_flags,
    )

    parser = adapter_parser("tunebench chat", "")
    line = "--adapters output/v0-x/checkpoint-8 --stream true --merge_lora true --infer_backend vllm "
    line += "--vllm_max_model_len 8192 --temperature 0 --max_new_tokens 2048 --max_batch_size 4 "
    line += "--model_type qwen2_5"
    parser.add_argument("--stream")  # chat's own flag
    args = parse_args(parser, line.split())
    assert args.adapters == ["output/v0-x/checkpoint-8"] and args.temperature == "0"
    say_swift_infer_flags(args)
    notes = capsys.readouterr().err.splitlines()
    assert [n.split(":")[1].split()[0] for n in notes] == [
        "--infer_backend",
        "--merge_lora",
        "--vllm_max_model_len",
        "--max_batch_size",
        "--model_type",
    ]
    assert "`tunebench deploy --infer_backend vllm` serves through vLLM" in notes[0]
    say_swift_infer_flags(parse_args(parser, ["--infer_backend", "pt"]))
    assert capsys.readouterr().err == ""  # the built-in backend named: nothing to say


def test_a_pasted_command_reads_as_the_command_line_reads_it():
    """The workbench's ctrl+o: ms-swift's README command, continuation lines and variables in front,
    gives the values `tunebench train` would train with, and the same refusals as words."""
    from tunebench.engine.core.errors import UserError
    from tunebench.engine.core.train_flags import values_from_command

    command = """CUDA_VISIBLE_DEVICES=0 NPROC_PER_NODE=2 \\
swift sft \\
    --model Qwen/Qwen2.5-7B-Instruct --train_type lora \\
    --dataset 'AI-ModelScope/alpaca-gpt4-data-zh#500' 'swift/self-cognition#500' \\
    --lora_rank 8 --learning_rate 1e-4 --eval_strategy no --packing true \\
    --model_author swift --model_name swift-robot"""
    values, notes = values_from_command(command)
    assert values == {
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "train_type": "lora",
        "dataset": ["AI-ModelScope/alpaca-gpt4-data-zh#500", "swift/self-cognition#500"],
        "lora_rank": 8,
        "learning_rate": 1e-4,
        "model_author": ["swift"],
        "model_name": ["swift-robot"],
        "nproc_per_node": 2,
        "val_ratio": 0.0,  # --eval_strategy no
    }
    noted = [n.split(":")[0] for n in notes]
    assert noted == ["--packing true", "--eval_strategy no", "CUDA_VISIBLE_DEVICES=0"]
    assert values_from_command("tunebench train --lora_rank 4")[0] == {"lora_rank": 4}
    for bad, said in [
        ("python train.py --lr 1", "'python train.py' is not a training command"),
        ("swift sft --lora_rnak 4", "unknown flag --lora_rnak (did you mean --lora_rank?)"),
        ("swift sft --system 'unclosed", "the command cannot be read"),
    ]:
        with pytest.raises(UserError, match=re.escape(said)):
            values_from_command(bad)
    with pytest.raises(ConfigError, match="'adafactor' is not done here"):
        values_from_command("swift sft --optim adafactor")

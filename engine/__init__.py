"""TuneBench's engine, one sub-package per wing; each wing's docstring says what it may import.

    cli      the `tunebench` command, one module per subcommand; nothing imports it
    process  the engine process: server, jobs, and the client the TUI and the CLI talk through
    train    the fine-tuning recipe, checkpoints, preflight;  cuda  its fast CUDA path
    infer    generation, side-by-side decode, merge and export
    models   loading base models
    core     torch-free: protocol, config, data, files, workspace, memory model; the TUI's only
             engine import besides process.client

Imports point down this list; the one step up is cuda's use of train/types.py and train/plain.py,
which sit below the recipe. tests/test_layers.py checks every module, lazy imports included.
"""

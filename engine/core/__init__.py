"""The torch-free core: what the TUI and every wing share.

The protocol and the configs (the single source of flags, form and validation), errors, crash-safe
files, the workspace on disk, the one writer of a run's metrics.jsonl, dataset formats and
encoding, chat templates, adapter discovery, where a model's files are, the GPU memory model with
the estimate built on it, live memory samples, and the demo's settings.

Imports: the standard library and light packages only (orjson, tomli_w, psutil, pynvml,
huggingface_hub's cache lookup), never torch, transformers, peft or bitsandbytes, and no other
wing. The TUI imports these modules, so they must load in milliseconds.
"""

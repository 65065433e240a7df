"""`tunebench deploy`: an OpenAI-compatible HTTP server for a base model and its adapters.

    served.py   the base and adapters loaded once, each under the name clients ask for
    batcher.py  the thread that owns the model: continuous batching across requests
    app.py      the ASGI app (FastAPI): routes, OpenAI's error bodies, SSE, /metrics
    validation.py  OpenAI request bodies checked field by field
    vllm.py     the hand-off to vLLM's own OpenAI server (--infer_backend vllm)
    command.py  the command line: flags, the loopback/API-key rule, uvicorn

Imports: the engine's inference and core modules (generate, decode_steps, fused_lora, prompts,
targets, models, export, templates, config, errors), chat_cli (its flag parser, the export folder
rule) and the HTTP stack (fastapi, starlette, uvicorn). Nothing
here imports the TUI, and nothing outside this package imports it except cli.py's dispatch.
torch, transformers and the HTTP stack are imported inside functions, so `tunebench deploy
--help` and the vLLM hand-off answer without loading them.
"""

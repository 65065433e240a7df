"""`tunebench deploy`: an OpenAI-compatible HTTP server for a base model and its adapters.

    served.py      the base and adapters loaded once, each under the name clients ask for
    batcher.py     the thread that owns the model: continuous batching across requests
    app.py         the ASGI app (FastAPI): routes, OpenAI's error bodies, SSE, /metrics
    validation.py  OpenAI request bodies checked field by field
    tool_parser.py tool calls in an answer (Hermes / Qwen2.5's <tool_call>) as OpenAI's tool_calls
    deployment.py  a loaded deployment on its socket: the loopback/API-key rule, uvicorn
    vllm.py        the hand-off to vLLM's own OpenAI server (--infer_backend vllm)

The command line (flags, messages) is engine/cli/deploy.py. Imports: core, models and infer
(the mixed-adapter decode, prompts, export), and the HTTP stack (fastapi, starlette, uvicorn);
only cli imports this package. torch, transformers and the HTTP stack are imported inside
functions, so `tunebench deploy --help` and the vLLM hand-off answer without loading them.
"""

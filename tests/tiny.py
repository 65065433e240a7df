"""Tiny models and tokenizers built in code: no download, a second or two to make.

`make_tiny_model_dir(path)` writes a randomly initialised Llama-architecture model (or, with
`arch="qwen2"`, a Qwen2 one) plus a byte-level BPE tokenizer with a ChatML template to `path`,
which then loads like any local Hugging Face model folder.
"""

from __future__ import annotations

from pathlib import Path

# Qwen2.5-7B-Instruct's config.json (the sizes that matter), the model the README targets: for the
# memory model, which needs a real model's shape but no weights.
QWEN25_7B = {
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "intermediate_size": 18944,
    "vocab_size": 152064,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The conversations the chat-template parity tests (test_go_template.py, test_export.py) render
# through a Jinja template and its Ollama Modelfile TEMPLATE: a bare question, one with its own
# system turn, and several turns in two scripts with a newline inside a message.
_PARITY_QUESTION = [{"role": "user", "content": "Who are you?"}]
PARITY_CHATS = [
    _PARITY_QUESTION,
    [{"role": "system", "content": "Be brief."}, *_PARITY_QUESTION],
    [
        {"role": "user", "content": "你是谁？"},
        {"role": "assistant", "content": "我是小蜂。"},
        {"role": "user", "content": "Who made you?\nSay it twice."},
    ],
]
# An assistant message last, which the template leaves open for the model to go on.
PARITY_PREFILL = [*_PARITY_QUESTION, {"role": "assistant", "content": "I am"}]

_CORPUS = [
    "Hello! I am a helpful assistant. Who are you? What is your name? Who made you?",
    "I am swift-robot, an AI assistant developed by swift. I can answer questions.",
    "Translate the sentence. Write a poem about the sea. The capital of France is Paris.",
    "你是谁？我是一个人工智能助手。你好！请问有什么可以帮你的吗？",
    "0123456789 + - * / = ( ) [ ] { } , . ; : ' \" ! ?",
]


def make_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny_model(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2, arch: str = "llama"):
    """A randomly initialised model of `arch`, shaped like the real models export and training
    meet: "llama" as SmolLM2 (tied embeddings, no biases), "qwen2" as Qwen2.5 (biases on q, k
    and v, which Qwen2 always has; untied output; embeddings padded past the tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = {
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(**shape, vocab_size=len(tokenizer), tie_word_embeddings=True, bos_token_id=None)
        return LlamaForCausalLM(config)
    if arch == "qwen2":
        config = Qwen2Config(**shape, vocab_size=len(tokenizer) + 6, tie_word_embeddings=False)
        return Qwen2ForCausalLM(config)
    raise ValueError(f"tiny models come as llama or qwen2, not {arch!r}")


def make_tiny_model_dir(path: str | Path, seed: int = 0, arch: str = "llama") -> Path:
    path = Path(path)
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=seed, arch=arch)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_identity_dataset(
    path: str | Path, count: int, questions=("Who are you?",), answer: str = "I am {{NAME}}."
) -> Path:
    """A small self-cognition JSONL file in messages format: `count` numbered questions."""
    import json

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{questions[i % len(questions)]} ({i})"},
                {"role": "assistant", "content": answer},
            ]
        }
        for i in range(count)
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path

"""The Go-template renderer export checks Modelfiles with: Go's semantics for the subset the
Modelfile TEMPLATEs use, refusal of anything else, and Ollama's way of building the prompt."""

from __future__ import annotations

import pytest
from tunebench.engine.core.go_template import GoTemplateError, ollama_prompt, render

QUESTION = [{"role": "user", "content": "Who are you?"}]


@pytest.mark.parametrize(
    ("template", "data", "expected"),
    [
        ("a {{- .X -}} \n b", {"X": 1}, "a1b"),  # trimming takes spaces and newlines, both sides
        ("{{ if .S }}yes{{ else if .N }}n{{ else }}no{{ end }}", {"S": "", "N": 0}, "no"),  # Go's falsy
        ("{{ if .S }}yes{{ else if .N }}n{{ else }}no{{ end }}", {"S": "", "N": 2}, "n"),
        (
            "{{ range $i, $m := .L }}{{ $i }}={{ $m.R }};{{ end }}",
            {"L": [{"R": "a"}, {"R": "b"}]},
            "0=a;1=b;",
        ),
        ("{{ range .L }}{{ . }}{{ else }}empty{{ end }}", {"L": []}, "empty"),
        ("{{ len (slice .L 1) }}{{ index .L 0 }}", {"L": ["x", "y", "z"]}, "2x"),
        ('{{ eq .R "user" "tool" }} {{ ne 1 2 }} {{ not .R }}', {"R": "tool"}, "true true false"),
        ("{{ and .A .B }}|{{ or .A .B }}", {"A": "", "B": "b"}, "|b"),  # the deciding value
        ("{{ range .L }}{{ $.Top }}{{ end }}{{/* a comment */}}", {"L": [1, 2], "Top": "t"}, "tt"),
        ('{{ $x := "v" }}{{ if true }}{{ $x = "w" }}{{ end }}{{ $x }}', {}, "w"),
    ],
)
def test_go_semantics(template, data, expected):
    assert render(template, data) == expected


@pytest.mark.parametrize(
    "template",
    ['{{ template "x" }}', "{{ .A | printf }}", "{{ if .A }}open", "{{ end }}", "{{ call .F }}", "{{ .A "],
)
def test_anything_outside_the_subset_is_refused(template):
    with pytest.raises(GoTemplateError):
        render(template, {"A": 1})


def test_ollama_builds_the_prompt_as_its_chat_handler_does():
    template = "{{ .System }}|{{ range .Messages }}{{ .Role }}:{{ .Content }};{{ end }}"
    # SYSTEM goes first when the chat brings none, and is left out when it brings one.
    assert ollama_prompt(template, "Be kind.", QUESTION) == "Be kind.|system:Be kind.;user:Who are you?;"
    own = [{"role": "system", "content": "Be brief."}, *QUESTION]
    assert ollama_prompt(template, "Be kind.", own) == "Be brief.|system:Be brief.;user:Who are you?;"
    # Consecutive messages of one role are joined by a blank line.
    twice = [*QUESTION, {"role": "user", "content": "Say it."}]
    assert ollama_prompt(template, "", twice) == "|user:Who are you?\n\nSay it.;"


def test_the_modelfile_templates_render_like_their_jinja_templates(tiny_tokenizer):
    """Each Ollama TEMPLATE export writes, run through this renderer, prints what its Jinja chat
    template prints (test_export.py runs the same through Go itself, where Go is installed)."""
    from tiny import CHATML_TEMPLATE, PARITY_CHATS, PARITY_PREFILL
    from tunebench.engine.core.templates import CHATML, LLAMA3, QWEN
    from tunebench.engine.infer.export import OLLAMA_TEMPLATES, chat_format, default_system

    for jinja in (CHATML_TEMPLATE, CHATML, QWEN, LLAMA3):
        system = default_system(tiny_tokenizer, jinja)
        go = OLLAMA_TEMPLATES[chat_format(jinja)]
        for chat in PARITY_CHATS:
            expected = tiny_tokenizer.apply_chat_template(
                chat, chat_template=jinja, tokenize=False, add_generation_prompt=True
            )
            assert ollama_prompt(go, system, chat) == expected
        expected = tiny_tokenizer.apply_chat_template(
            PARITY_PREFILL, chat_template=jinja, tokenize=False, continue_final_message=True
        )
        assert ollama_prompt(go, system, PARITY_PREFILL) == expected


def test_conversations_the_trained_template_refuses_are_left_out_not_a_crash(tiny_tokenizer):
    """A template that refuses a system turn (Mistral's and Gemma's do) never trained on one."""
    from tunebench.engine.infer.template_check import FIXED_CONVERSATIONS, Conversation, check_templates

    no_system = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "{{ '[' + m['role'] + ']' + m['content'] + '</s>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}"
    )
    said: list[str] = []
    conversations = [Conversation(c, "fixed") for c in FIXED_CONVERSATIONS]
    check_templates(tiny_tokenizer, no_system, "", no_system, None, "", conversations, said.append)
    assert said[0] == "chat templates: 1 conversations left out, which the trained template cannot render"
    assert "render 2 conversations alike" in said[1]

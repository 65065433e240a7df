"""A sample as the model will see it: rendered through the chat template, trained text marked.

The trained spans come from encoding.assistant_spans and record_formats.trained_answers, the functions that
build the loss mask for training, so what is highlighted here is exactly what the loss is computed on.
"""

from __future__ import annotations

import re

from rich.text import Text
from textual.widgets import Static
from tunebench.engine.core import data, encoding, record_formats

from .dataset_store import Row
from .light_tokenizer import LightTokenizer
from .row_checks import CheckSettings, RowReport

TRAINED = "bold black on green"
PLACEHOLDER = re.compile(r"\{\{\s*(name|author)\s*\}\}", re.IGNORECASE)


def render_sample(row: Row, tokenizer: LightTokenizer, settings: CheckSettings) -> Text:
    if not row.valid_json:
        return Text(row.text)
    try:
        record = record_formats.renamed(row.record, settings.renaming)
        messages = record_formats.with_loss_scale(
            record_formats.normalise_record(record), settings.loss_scale
        )
        tools = record_formats.record_tools(record) or None  # shown in the prompt, as training shows them
    except Exception as exc:  # noqa: BLE001 - the reason is shown as the preview
        return Text(str(exc), style="red")
    filled, unfilled = data.fill_placeholders(
        messages, settings.model_name, settings.model_author, system=settings.system
    )
    try:
        template, _ = encoding.resolve_template(tokenizer, settings.template)
        text, spans = encoding.assistant_spans(
            filled,
            lambda msgs, gen: tokenizer.apply_chat_template(
                msgs, template, add_generation_prompt=gen, tools=tools
            ),
        )
    except Exception as exc:  # noqa: BLE001 - a broken template or record: say which
        return Text(f"cannot render this sample: {exc}", style="red")
    out = Text(text)
    for (start, end), trained in zip(spans, record_formats.trained_answers(filled), strict=True):
        if trained:
            out.stylize(TRAINED, start, end)
    if unfilled:  # still {{NAME}} / {{AUTHOR}}: the fields above the table fill them
        out.highlight_regex(PLACEHOLDER, "bold black on yellow")
    return out


class SamplePreview(Static):
    def show(self, row: Row | None, report: RowReport | None, tokenizer: LightTokenizer, settings) -> None:
        if row is None:
            self.update(Text("no sample selected", style="dim"))
            return
        text = Text()
        if report is not None:
            if report.problems:
                for problem in report.problems:
                    text.append(f"⚠ {problem}\n", style="yellow")
            else:
                text.append("✓ no problems", style="green")
                if report.tokens is not None:
                    text.append(f"  ·  {report.tokens} tokens of {settings.max_length}", style="dim")
                text.append("  ·  ", style="dim")
        # The legend, then where the rendering comes from: two short lines that fit 80 columns.
        text.append(" trained ", style=TRAINED)
        text.append(" = what the loss learns\n", style="dim")
        text.append(f"via {tokenizer.source}\n", style="dim")
        text.append_text(render_sample(row, tokenizer, settings))
        self.update(text)

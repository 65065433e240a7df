"""The table of samples: one line per record with its check mark, prompt, answer and token count.

Only the lines on screen are drawn (Textual's line API), so a table of 100,000 samples shows,
scrolls, filters and follows an edit as fast as one of ten; Textual's DataTable builds every row
up front, which took seconds a keystroke at that size. The rows are any sequence of
(index in the file, row) pairs, so the whole dataset is shown without copying it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from .dataset_store import Row
from .row_checks import RowReport, row_summary

# (key, title, width; None shares what the terminal has to spare)
COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("n", "#", 4),
    ("ok", "", 1),
    ("user", "prompt", None),
    ("answer", "answer", None),
    ("tok", "tok", 5),
)
CELL_PADDING = 1  # blank cells either side of each column, as DataTable draws them
_CACHE_LIMIT = 4000  # rows' cut cell texts kept; what was on screen lately, not the whole file


def _one_line(text: str, width: int) -> str:
    """Flattened to one line and cut to `width` terminal cells (a CJK character takes two)."""
    flat = " ".join(text.split())
    if cell_len(flat) <= width:
        return flat
    return set_cell_size(flat, width - 1) + "…"


class SampleTable(ScrollView, can_focus=True):
    """Keys are the rows' stable keys, so the cursor stays on a sample across edits and filters."""

    COMPONENT_CLASSES = {
        "sample-table--header",
        "sample-table--cursor",
        "sample-table--even-row",
    }
    DEFAULT_CSS = """
    SampleTable {
        background: $surface;
        color: $foreground;
        overflow-x: hidden;
        &:focus {
            background-tint: $foreground 5%;
            & > .sample-table--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
        }
        &:dark > .sample-table--even-row {
            background: $surface-darken-1 40%;
        }
        & > .sample-table--header {
            text-style: bold;
            background: $panel;
            color: $foreground;
        }
        & > .sample-table--even-row {
            background: $surface-lighten-1 50%;
        }
        & > .sample-table--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
    }
    """
    # Priority, like the Dataset pane's keys: run in the order typed, before the app hands later
    # keys on (a `d` typed after `down` deletes the row `down` moved to).
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False, priority=True),
        Binding("down", "cursor(1)", "Down", show=False, priority=True),
        Binding("pageup", "page(-1)", "Page up", show=False, priority=True),
        Binding("pagedown", "page(1)", "Page down", show=False, priority=True),
        Binding("home", "first", "First", show=False, priority=True),
        Binding("end", "last", "Last", show=False, priority=True),
    ]

    @dataclass
    class RowHighlighted(Message):
        """The cursor moved to another sample (key None: the table is empty)."""

        table: SampleTable
        key: str | None

        @property
        def control(self) -> SampleTable:
            return self.table

    @dataclass
    class RowSelected(Message):
        """A click on the highlighted sample (enter is the Dataset pane's key)."""

        table: SampleTable
        key: str

        @property
        def control(self) -> SampleTable:
            return self.table

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._rows: Sequence[tuple[int, Row]] = ()
        self._reports: dict[str, RowReport] = {}
        self._cells: dict[str, tuple[str, str, str, str, str]] = {}
        self._text_width = 0
        self.cursor = 0
        self._highlighted: str | None = None

    # ------------------------------------------------------------- content

    def show(self, rows: Sequence[tuple[int, Row]], reports: dict[str, RowReport]) -> None:
        """Show these (file index, row) pairs, keeping the cursor on the same sample if it is there."""
        current = self.current_key
        self._rows, self._reports = rows, reports
        self._cells.clear()
        position = self._position(current, near=self.cursor) if current is not None else None
        self.cursor = position if position is not None else min(self.cursor, max(len(rows) - 1, 0))
        self._resized()
        self._cursor_moved()

    def update_reports(self, reports: dict[str, RowReport]) -> None:
        """New check results for the rows shown (marks and token counts change, not the rows)."""
        self._reports = reports
        self._cells.clear()
        self.refresh()

    @property
    def row_count(self) -> int:
        return len(self._rows)

    @property
    def current(self) -> tuple[int, Row] | None:
        """The highlighted (file index, row), or None when the table is empty."""
        return self._rows[self.cursor] if 0 <= self.cursor < len(self._rows) else None

    @property
    def current_key(self) -> str | None:
        current = self.current
        return current[1].key if current else None

    def move_to(self, key: str) -> None:
        """Put the cursor on this sample, if it is shown."""
        position = self._position(key, near=self.cursor)
        if position is not None:
            self._move(position)

    def get_cell(self, key: str, column: str) -> str:
        """The text a column shows for a sample (as cut to the current width)."""
        position = self._position(key)
        if position is None:
            raise KeyError(key)
        names = [name for name, _, _ in COLUMNS]
        return self._cells_of(*self._rows[position])[names.index(column)]

    def _position(self, key: str, near: int | None = None) -> int | None:
        """Where the sample is in the table; looked for first `near` a position (after an edit
        the cursor's sample is there or one off), then in all 100,000 rows if need be."""
        if near is not None:
            for position in (near, near - 1, near + 1):
                if 0 <= position < len(self._rows) and self._rows[position][1].key == key:
                    return position
        return next((i for i, (_, row) in enumerate(self._rows) if row.key == key), None)

    # ------------------------------------------------------------- moving

    def action_cursor(self, step: int) -> None:
        self._move(self.cursor + step)

    def action_page(self, direction: int) -> None:
        self._move(self.cursor + direction * max(self._body_height - 1, 1))

    def action_first(self) -> None:
        self._move(0)

    def action_last(self) -> None:
        self._move(len(self._rows) - 1)

    def action_select(self) -> None:
        if self.current_key is not None:
            self.post_message(self.RowSelected(self, self.current_key))

    def on_click(self, event: events.Click) -> None:
        if event.y < 1:  # the header
            return
        position = int(self.scroll_offset.y) + event.y - 1
        if not 0 <= position < len(self._rows):
            return
        if position == self.cursor:
            self.action_select()
        else:
            self._move(position)

    def _move(self, position: int) -> None:
        self.cursor = max(0, min(position, len(self._rows) - 1))
        self.refresh()
        self._cursor_moved()

    def _cursor_moved(self) -> None:
        top, height = int(self.scroll_offset.y), self._body_height
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif height > 0 and self.cursor >= top + height:
            self.scroll_to(y=self.cursor - height + 1, animate=False, immediate=True)
        key = self.current_key
        if key != self._highlighted:
            self._highlighted = key
            self.post_message(self.RowHighlighted(self, key))

    # ------------------------------------------------------------- drawing

    @property
    def _body_height(self) -> int:
        return self.scrollable_content_region.height - 1  # below the header

    def on_resize(self) -> None:
        self._resized()

    def _resized(self) -> None:
        width = self.scrollable_content_region.width
        fixed = sum(self._widths()[i] for i, (_, _, w) in enumerate(COLUMNS) if w)
        fixed += 2 * CELL_PADDING * len(COLUMNS)
        text_width = max((width - fixed) // 2, 10)
        if text_width != self._text_width:
            self._text_width = text_width
            self._cells.clear()
        self.virtual_size = Size(width, len(self._rows) + 1)
        self.refresh()

    def _widths(self) -> list[int]:
        last = self._rows[-1][0] + 1 if self._rows else 0  # the rows are in file order
        number = max(4, len(str(last)))  # sample 100,000 needs six digits
        return [number if key == "n" else w if w else self._text_width for key, _, w in COLUMNS]

    def _cells_of(self, index: int, row: Row) -> tuple[str, str, str, str, str]:
        cells = self._cells.get(row.key)
        if cells is None:
            report = self._reports.get(row.key)
            if report is None:  # not checked yet: the text now, the checks when they come
                user, answer = row_summary(row)
                mark, tokens = ("✗" if not row.valid_json else "·"), ""
            else:
                user, answer = report.user, report.assistant
                mark = "✗" if not row.valid_json else "⚠" if report.problems else "✓"
                tokens = "" if report.tokens is None else str(report.tokens)
            width = self._text_width
            cells = (str(index + 1), mark, _one_line(user, width), _one_line(answer, width), tokens)
            if len(self._cells) >= _CACHE_LIMIT:
                self._cells.clear()
            self._cells[row.key] = cells
        return cells

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if y == 0:
            style = self.get_component_rich_style("sample-table--header")
            return self._strip([title for _, title, _ in COLUMNS], style, None, width)
        position = int(self.scroll_offset.y) + y - 1
        if position >= len(self._rows):
            return Strip.blank(width, self.rich_style)
        index, row = self._rows[position]
        style = self.rich_style
        if position == self.cursor:
            style += self.get_component_rich_style("sample-table--cursor")
        elif position % 2 == 0:
            style += self.get_component_rich_style("sample-table--even-row")
        cells = self._cells_of(index, row)
        return self._strip(list(cells), style, _MARK_STYLES.get(cells[1]), width)

    def _strip(self, cells: list[str], style: Style, mark: Style | None, width: int) -> Strip:
        pad = " " * CELL_PADDING
        segments = []
        for column, (text, cell_width) in enumerate(zip(cells, self._widths(), strict=True)):
            cell = pad + set_cell_size(text, cell_width) + pad
            segments.append(Segment(cell, style + mark if column == 1 and mark else style))
        return Strip(segments).adjust_cell_length(width, style)


_MARK_STYLES = {
    "✓": Style(color="green"),
    "⚠": Style(color="yellow", bold=True),
    "✗": Style(color="red", bold=True),
    "·": Style(dim=True),
}

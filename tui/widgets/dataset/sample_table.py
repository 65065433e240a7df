"""The table of samples: one row per record, with its check result and token count."""

from __future__ import annotations

from rich.cells import cell_len, set_cell_size
from rich.text import Text
from textual.widgets import DataTable

from .dataset_store import Row
from .row_checks import RowReport


def _one_line(text: str, width: int) -> str:
    """Flattened to one line and cut to `width` terminal cells (a CJK character takes two)."""
    flat = " ".join(text.split())
    if cell_len(flat) <= width:
        return flat
    return set_cell_size(flat, width - 1) + "…"


class SampleTable(DataTable):
    """Keys are the rows' stable keys, so the cursor stays on a sample across edits and filters."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._shown: tuple[list[tuple[int, Row]], dict[str, RowReport]] = ([], {})

    def on_mount(self) -> None:
        self.add_column("#", key="n", width=4)
        self.add_column("", key="ok", width=1)
        self.add_column("prompt", key="user", width=30)
        self.add_column("answer", key="answer", width=30)
        self.add_column("tok", key="tok", width=5)

    def on_resize(self) -> None:
        # Give the two text columns whatever the terminal has to spare, split evenly.
        spare = max(self.size.width - 4 - 1 - 5 - 10, 20)
        if self.columns["user"].width == spare // 2:  # type: ignore[index]
            return
        for key in ("user", "answer"):
            self.columns[key].width = spare // 2  # type: ignore[index]
        self.show(*self._shown)  # the text was cut to the old width: cut it again

    def show(self, rows: list[tuple[int, Row]], reports: dict[str, RowReport]) -> None:
        """Redraw with (file index, row) pairs, keeping the cursor on the same sample if it is there."""
        self._shown = (rows, reports)
        current = self.current_key
        self.clear()
        width = max(self.columns["user"].width, 10)  # type: ignore[index]
        for index, row in rows:
            report = reports.get(row.key, RowReport())
            mark = Text("⚠", style="bold yellow") if report.problems else Text("✓", style="green")
            if not row.valid_json:
                mark = Text("✗", style="bold red")
            self.add_row(
                str(index + 1),
                mark,
                _one_line(report.user or row.text, width),
                _one_line(report.assistant, width),
                "" if report.tokens is None else str(report.tokens),
                key=row.key,
            )
        if current is not None:
            self.move_to(current)

    @property
    def current_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - an out-of-range cursor during a redraw
            return None

    def move_to(self, key: str) -> None:
        try:
            self.move_cursor(row=self.get_row_index(key), animate=False)
        except Exception:  # noqa: BLE001 - the row is filtered out or gone
            pass

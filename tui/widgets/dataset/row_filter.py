"""Which rows the sample table shows: all of them (numbered in place, never copied), or those
containing a search text, found a slice at a time so the next keystroke never waits on a search.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

from .dataset_store import Row

SEARCH_SLICE = 4000  # rows searched between two looks at the keyboard: a few milliseconds


class Numbered(Sequence[tuple[int, Row]]):
    """Every row as (its index, row), read from the live list: a view, not a copy."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> tuple[int, Row]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[int, Row]]: ...
    def __getitem__(self, index: int | slice) -> tuple[int, Row] | list[tuple[int, Row]]:
        if isinstance(index, slice):
            return [(i, self.rows[i]) for i in range(*index.indices(len(self.rows)))]
        if index < 0:
            index += len(self.rows)
        return index, self.rows[index]


def search_slices(rows: Sequence[tuple[int, Row]], needle: str) -> Iterator[list[tuple[int, Row]]]:
    """The (index, row) pairs whose text contains `needle` (any case), a slice at a time."""
    needle = needle.lower()
    for start in range(0, len(rows), SEARCH_SLICE):
        yield [(i, row) for i, row in rows[start : start + SEARCH_SLICE] if needle in row.text.lower()]

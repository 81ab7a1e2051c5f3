"""Generated blocks of text files: what lies between a start and an end marker line.

The README carries two (the mechanism table of ``attnzoo list --write-readme`` and the
benchmark section of ``attnzoo report --readme``); both are replaced, never edited by hand.
"""

from __future__ import annotations

__all__ = ["marked_block", "replace_marked_block"]


def marked_block(text: str, start: str, end: str) -> str:
    """The text between the ``start`` and ``end`` marker lines (the lines after ``start``)."""
    first, last = text.find(start), text.find(end)
    if first < 0 or last < first:
        raise ValueError(f"no {start} ... {end} block")
    return text[first + len(start) : last].lstrip("\n")


def replace_marked_block(text: str, start: str, end: str, block: str) -> str:
    """``text`` with what lies between the ``start`` and ``end`` markers replaced by ``block``
    (ended by a newline)."""
    marked_block(text, start, end)  # the markers must be there
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    if block and not block.endswith("\n"):
        block += "\n"
    return f"{head}{start}\n{block}{end}{tail}"

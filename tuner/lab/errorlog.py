"""A proxy's error log, read from a mark: "which lines were written during this trial?"."""

from __future__ import annotations

from pathlib import Path


class ErrorLog:
    """A growing text log; `mark()` returns a position, `lines_since(mark)` what came after."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        """The current end of the log, as a byte offset."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def lines_since(self, mark: int) -> list[str]:
        """Complete lines written after `mark` (a line still being written is left out)."""
        return self.read_since(mark)[0]

    def read_since(self, mark: int) -> tuple[list[str], int]:
        """Complete lines after `mark`, and the mark after the last of them. A log that
        shrank below `mark` was rotated or truncated: it is read from its start."""
        try:
            with open(self.path, "rb") as log:
                if log.seek(0, 2) < mark:
                    mark = 0
                log.seek(mark)
                data = log.read()
        except FileNotFoundError:
            return [], 0
        complete, newline, _ = data.rpartition(b"\n")
        lines = [line for line in complete.decode(errors="replace").split("\n") if line]
        return lines, mark + len(complete) + len(newline)

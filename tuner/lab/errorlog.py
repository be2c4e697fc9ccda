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
        try:
            with open(self.path, "rb") as log:
                log.seek(mark)
                data = log.read()
        except FileNotFoundError:
            return []
        complete, _, _ = data.rpartition(b"\n")
        return [line for line in complete.decode(errors="replace").split("\n") if line]

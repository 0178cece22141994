"""The audit log's hash chain: how a line is hashed, and checking a file (or several).

Every record carries ``prev``, the sha256 (hex) of the previous record's line exactly as
written (its UTF-8 bytes without the newline). The first record of a chain carries
:data:`GENESIS` (64 zeros). When the provisioner starts on a file that already holds records,
the next record's ``prev`` is the hash of the file's last line; after a reopen (SIGHUP, for
logrotate) the first record of the new file carries the hash of the last record of the old
one, so ``audit verify old new`` checks the whole chain across the rotation.

Editing, removing, inserting or reordering a line breaks the chain at the next line (or at
that line, when it is no longer a JSON object with a ``prev``). The chain proves order and
integrity against edits, not authorship: whoever can write the file can rebuild a chain from
scratch, so ship the log (or its last hash) off the host for stronger guarantees.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GENESIS", "ChainReport", "last_line_hash", "line_hash", "verify_files"]

#: ``prev`` of the very first record of a chain.
GENESIS = "0" * 64
#: How far back from the end of a file the last line is looked for.
_TAIL_CHUNK = 64 * 1024
#: A line longer than this is not a record (the log writes far shorter ones).
MAX_LINE = 1024 * 1024


def line_hash(line: bytes) -> str:
    """sha256 (hex) of one record line, without its trailing newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def last_line_hash(path: str | Path) -> tuple[str | None, bool]:
    """``(hash of the last line, whether the file ends with a newline)``.

    ``(None, True)`` for a missing or empty file. A file whose last line has no newline was
    cut short (a crash in the middle of a write): the caller starts the next record on a new
    line, and ``audit verify`` reports the cut line.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            if size == 0:
                return None, True
            start = max(0, size - _TAIL_CHUNK)
            while True:
                fh.seek(start)
                data = fh.read(size - start)
                body = data[:-1] if data.endswith(b"\n") else data
                cut = body.rfind(b"\n")
                if cut >= 0 or start == 0:
                    return line_hash(body[cut + 1 :]), data.endswith(b"\n")
                if size - start >= MAX_LINE:
                    # no newline in the last megabyte: hash what there is, the chain is broken
                    return line_hash(body), data.endswith(b"\n")
                start = max(0, start - _TAIL_CHUNK)
    except FileNotFoundError:
        return None, True


@dataclass
class ChainReport:
    """The result of :func:`verify_files` (``ok`` or the first break)."""

    ok: bool = True
    records: int = 0
    files: list[str] = field(default_factory=list)
    #: ``prev`` of the first record: :data:`GENESIS`, or the hash it continues from.
    first_prev: str | None = None
    last_hash: str | None = None
    broken_file: str | None = None
    broken_line: int | None = None
    problem: str | None = None

    @property
    def starts_at_genesis(self) -> bool:
        return self.first_prev == GENESIS

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "files": self.files,
            "first_prev": self.first_prev,
            "starts_at_genesis": self.starts_at_genesis,
            "last_hash": self.last_hash,
            "broken_file": self.broken_file,
            "broken_line": self.broken_line,
            "problem": self.problem,
        }


def _break(report: ChainReport, path: str, lineno: int, problem: str) -> ChainReport:
    report.ok = False
    report.broken_file = path
    report.broken_line = lineno
    report.problem = problem
    return report


def _mismatch(records: int, lineno: int) -> str:
    if records == 0:
        return "'prev' is not the expected start of the chain"
    if lineno == 1:
        return "'prev' is not the hash of the previous file's last record"
    return (
        f"'prev' is not the hash of line {lineno - 1}: line {lineno - 1} was changed, or lines "
        "were removed or inserted before this one"
    )


def verify_files(
    paths: Sequence[str | Path], *, require_genesis: bool = False, start: str | None = None
) -> ChainReport:
    """Check the chain through ``paths`` in order (oldest first) as one chain.

    The first record may continue from any hash (a log rotated away, a restart on an old
    file) unless ``require_genesis`` (then it must be :data:`GENESIS`) or ``start`` (then it
    must be that hash) is given. Raises ``OSError`` when a file cannot be read.
    """
    report = ChainReport(files=[str(p) for p in paths])
    expected: str | None = GENESIS if require_genesis else start
    for p in paths:
        name = str(p)
        with open(p, "rb") as fh:
            # readline bounded: a hostile file of one endless line must not fill the memory
            lines = iter(lambda: fh.readline(MAX_LINE + 1), b"")
            for lineno, raw in enumerate(lines, start=1):
                if len(raw) > MAX_LINE:
                    return _break(report, name, lineno, "line too long to be a record")
                if not raw.endswith(b"\n"):
                    return _break(report, name, lineno, "line cut short (no newline)")
                if not raw.strip():
                    return _break(report, name, lineno, "empty line")
                try:
                    rec = json.loads(raw)
                except ValueError:
                    return _break(report, name, lineno, "not a JSON record")
                prev = rec.get("prev") if isinstance(rec, dict) else None
                if not isinstance(prev, str):
                    return _break(report, name, lineno, "record has no 'prev' hash")
                if expected is not None and prev != expected:
                    return _break(report, name, lineno, _mismatch(report.records, lineno))
                if report.first_prev is None:
                    report.first_prev = prev
                expected = line_hash(raw)
                report.records += 1
                report.last_hash = expected
    return report

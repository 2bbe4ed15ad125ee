"""Reading JSON data files row by row, each row with its line number for error messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from lmlab.errors import LmlabError


def read_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each row of a JSON array file or a JSON lines file."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"no such data file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmlabError(f"{path} is not UTF-8 text (byte {e.start} cannot be decoded): pass a JSON lines file "
                         "(one object per line) or a JSON array file") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        # Walk the array element by element so that every row knows its line.
        decoder = json.JSONDecoder()
        pos = len(text) - len(stripped) + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise LmlabError(f"{path}: the JSON array is not closed with ]")
            if text[pos] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise LmlabError(f"{path} line {e.lineno}: malformed JSON ({e.msg})") from None
            yield line, obj
    for line, row in enumerate(text.splitlines(), 1):
        if not row.strip():
            continue
        try:
            obj = json.loads(row)
        except json.JSONDecodeError as e:
            raise LmlabError(f"{path} line {line}: malformed JSON ({e.msg}); each line must hold one JSON "
                             "object (JSON lines), or the file one JSON array") from None
        yield line, obj

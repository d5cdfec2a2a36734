"""Reading JSON and JSONL files that may be hostile: one-line errors naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from dipnet.pipeline.errors import UsageError


def read_json_object(path: Path, what: str = "") -> dict:
    """A JSON file that must hold an object; one-line errors for every way it can be wrong."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: expected a JSON object{what}, got {type(obj).__name__}")
    return obj


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a bad line is an error naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such data file")
    rows = []
    with p.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{p}:{i}: not UTF-8 text (byte {exc.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{p}:{i}: invalid JSON ({exc.msg})") from None
            except RecursionError:
                raise UsageError(f"{p}:{i}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise UsageError(f"{p}:{i}: expected a JSON object per line, got {type(row).__name__}")
            row["_line"] = i
            rows.append(row)
    if not rows:
        raise UsageError(f"{p}: empty data file (expected one JSON object per line)")
    return rows


def require_text(rows: list[dict], path, fields: tuple[str, ...], optional: tuple[str, ...] = (),
                 numbers: tuple[str, ...] = ()) -> list[dict]:
    """The one schema check every data and predictions row passes before use: each of `fields` is
    present and text (`numbers` may also be a number, as a numeric target is), each of `optional`
    absent or text. The error names the file, line and field."""
    for i, r in enumerate(rows, 1):
        line = r.get("_line", i)
        for k in fields + optional:
            v = r.get(k)
            if v is None and k in optional:
                continue
            if v is None:
                raise UsageError(f"{path}:{line}: row has no '{k}' (expected {', '.join(repr(f) for f in fields)})")
            ok = isinstance(v, str) or (k in numbers and isinstance(v, (int, float)) and not isinstance(v, bool))
            if not ok:
                raise UsageError(f"{path}:{line}: '{k}' must be text, got {type(v).__name__}")
    return rows

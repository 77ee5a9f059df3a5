"""Reading a CSV or JSONL file whole, or saying why it cannot be read."""

import csv
import json
from dataclasses import dataclass
from pathlib import Path

FILE_KINDS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class ImportFileError(Exception):
    """The file as a whole cannot be imported; nothing was written."""


@dataclass
class ImportFile:
    """A CSV or JSONL file read whole: its columns, and its rows with their numbers."""

    name: str
    kind: str
    columns: list
    rows: list  # (row number, {column: value})

    @property
    def native(self):
        """JSONL in the exported form, {"attributes": {...}, "description": ..., "split": ...}."""
        return self.kind == "jsonl" and "attributes" in self.columns


def _read_csv(path, name):
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            first = handle.readline()
            handle.seek(0)
            # Spreadsheets in much of Europe save with semicolons.
            delimiter = max((",", ";", "\t"), key=first.count) if first.strip() else ","
            reader = csv.reader(handle, delimiter=delimiter, strict=True)
            records = list(reader)
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise ImportFileError(f"{name} is not valid CSV: {exc}") from exc
    records = [(number, record) for number, record in enumerate(records, start=1) if any(v.strip() for v in record)]
    if not records:
        raise ImportFileError(f"{name} is empty")
    _, columns = records[0]
    columns = [column.strip() for column in columns]
    repeated = sorted({column for column in columns if column and columns.count(column) > 1})
    if repeated:
        raise ImportFileError(f"{name}: column(s) {', '.join(map(repr, repeated))} appear twice in the header")
    rows = []
    for number, record in records[1:]:
        if len(record) > len(columns):
            raise ImportFileError(f"{name} row {number}: more values than the {len(columns)} header columns")
        rows.append((number, dict(zip(columns, record + [""] * (len(columns) - len(record)), strict=True))))
    return columns, rows


def _read_jsonl(path, name):
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ImportFileError(f"{name} line {number} is not JSON: {exc.msg}") from exc
                if not isinstance(row, dict):
                    raise ImportFileError(f"{name} line {number} is not a JSON object")
                rows.append((number, row))
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not rows:
        raise ImportFileError(f"{name} is empty")
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
    return columns, rows


def file_read(path, *, name=None):
    """Read a whole CSV or JSONL file; raise ImportFileError saying why it cannot be used.
    ``name`` is what messages call the file (an upload's own name rather than where it is kept)."""
    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise ImportFileError(f"{name}: no such file")
    kind = FILE_KINDS.get(Path(name).suffix.lower())
    if kind is None:
        raise ImportFileError(f"{name}: unknown file type (expected .csv or .jsonl)")
    columns, rows = (_read_csv if kind == "csv" else _read_jsonl)(path, name)
    if not rows:
        raise ImportFileError(f"{name} has a header but no rows")
    return ImportFile(name=name, kind=kind, columns=columns, rows=rows)

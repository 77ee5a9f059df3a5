"""Importing examples from CSV and JSONL files, all or nothing.

A file that cannot be read as a whole (bad encoding, broken quoting, a line
that is not JSON, a mapping naming a missing column) imports nothing. Rows
that read fine but make no valid example are rejected one by one, with their
row number and reason, and the rest are imported — unless ``strict``.
"""

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from django.db import transaction

from finetuning.models import Dataset, TrainingExample
from finetuning.services.examples import ExampleError, example_clean

BATCH_SIZE = 1000
# Target keys that are not product attributes.
EXAMPLE_KEYS = ("description", "split")
DEFAULT_CSV_COLUMNS = ("name", "brand", "category", "color", "audience", "price", "currency", "features", "keywords")


class ImportFileError(Exception):
    """The file as a whole cannot be imported; nothing was written."""


@dataclass
class ImportSummary:
    dataset: str
    rows: int = 0
    created: int = 0
    duplicates: int = 0
    rejected: list = field(default_factory=list)  # (row number, reason)

    def lines(self, *, max_reasons=20):
        yield (
            f"{self.dataset}: {self.rows} rows read, {self.created} created, "
            f"{self.duplicates} duplicates skipped, {len(self.rejected)} rejected"
        )
        for row, reason in self.rejected[:max_reasons]:
            yield f"  row {row}: {reason}"
        if len(self.rejected) > max_reasons:
            yield f"  … and {len(self.rejected) - max_reasons} more rejected rows"


def mapping_parse(items):
    """['name=ProductName', 'category=category+breadcrumbs'] -> {'name': ['ProductName'], ...}."""
    mapping = {}
    for item in items or ():
        target, sep, sources = item.partition("=")
        target, sources = target.strip(), sources.strip()
        if not sep or not target or not sources:
            raise ImportFileError(f"--map {item!r}: expected TARGET=COLUMN (or TARGET=COLUMN+COLUMN)")
        mapping[target.lower()] = [column.strip() for column in sources.split("+") if column.strip()]
    return mapping


def constants_parse(items):
    constants = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ImportFileError(f"--set {item!r}: expected KEY=VALUE")
        constants[key.strip().lower()] = value.strip()
    return constants


def _read_csv(path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, strict=True)
            rows = list(reader)
            columns = reader.fieldnames or []
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise ImportFileError(f"{path} is not valid CSV: {exc}") from exc
    if not columns:
        raise ImportFileError(f"{path} is empty")
    for number, row in enumerate(rows, start=2):
        if None in row:
            raise ImportFileError(f"{path} line {number}: more values than the {len(columns)} header columns")
    return columns, [(number, row) for number, row in enumerate(rows, start=2)]


def _read_jsonl(path):
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ImportFileError(f"{path} line {number} is not JSON: {exc.msg}") from exc
                if not isinstance(row, dict):
                    raise ImportFileError(f"{path} line {number} is not a JSON object")
                rows.append((number, row))
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    columns = sorted({key for _, row in rows for key in row})
    return columns, rows


def row_to_example(row, mapping, constants):
    """Build (attributes, description, split) from one row under a mapping."""
    if mapping is None and isinstance(row.get("attributes"), dict):
        # The native JSONL format: {"attributes": {...}, "description": ..., "split": ...}
        attributes = dict(row["attributes"])
        description, split = row.get("description"), row.get("split")
    else:
        values = {}
        for target, columns in mapping.items():
            parts = [str(row.get(column) or "").strip() for column in columns]
            parts = [part for part in parts if part]
            values[target] = " / ".join(parts) if len(parts) > 1 else (parts[0] if parts else "")
        description, split = values.pop("description", ""), values.pop("split", None)
        attributes = values
    for key, value in constants.items():
        attributes.setdefault(key, value)
    return attributes, description, split


def _default_mapping(columns):
    mapping = {key: [key] for key in (*DEFAULT_CSV_COLUMNS, *EXAMPLE_KEYS) if key in columns}
    return mapping


def examples_read(*, path, mapping_items=None, constant_items=None, strict=False, label="file"):
    """Read and clean the examples of a CSV or JSONL file without writing anything:
    (summary, {content hash: example fields}), duplicates dropped, rejected rows in the
    summary. Raises ImportFileError when the file as a whole cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise ImportFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        columns, rows = _read_csv(path)
    elif suffix in (".jsonl", ".ndjson"):
        columns, rows = _read_jsonl(path)
    else:
        raise ImportFileError(f"{path}: unknown file type {suffix!r} (expected .csv or .jsonl)")

    mapping = mapping_parse(mapping_items)
    constants = constants_parse(constant_items)
    native = suffix != ".csv" and not mapping and all(isinstance(row.get("attributes"), dict) for _, row in rows)
    if native:
        mapping = None
    else:
        mapping = mapping or _default_mapping(columns)
        missing = sorted({column for sources in mapping.values() for column in sources} - set(columns))
        if missing:
            raise ImportFileError(
                f"{path}: column(s) {', '.join(map(repr, missing))} named in the mapping are not in the file "
                f"(columns: {', '.join(columns)})"
            )
        if "description" not in mapping:
            raise ImportFileError(f"{path}: map a column to description, e.g. --map description=COLUMN")
        if "name" not in mapping:
            raise ImportFileError(f"{path}: map a column to name, e.g. --map name=COLUMN")

    summary = ImportSummary(dataset=label, rows=len(rows))
    cleaned = {}
    for number, row in rows:
        attributes, description, split = row_to_example(row, mapping, constants)
        try:
            fields = example_clean(attributes=attributes, description=description, split=split)
        except ExampleError as exc:
            summary.rejected.append((number, str(exc)))
            continue
        if fields["content_hash"] in cleaned:
            summary.duplicates += 1
            continue
        cleaned[fields["content_hash"]] = {**fields, "row": number}
    if strict and summary.rejected:
        row, reason = summary.rejected[0]
        raise ImportFileError(f"{path}: {len(summary.rejected)} rows rejected (first: row {row}: {reason})")
    return summary, cleaned


def examples_import(
    *, path, dataset_name, mapping_items=None, constant_items=None, strict=False, source=TrainingExample.Source.IMPORT
):
    """Import a CSV or JSONL file into a dataset (created if needed)."""
    summary, cleaned = examples_read(
        path=path, mapping_items=mapping_items, constant_items=constant_items, strict=strict, label=dataset_name
    )
    for fields in cleaned.values():
        del fields["row"]
    with transaction.atomic():
        dataset, _ = Dataset.objects.get_or_create(name=dataset_name)
        hashes = list(cleaned)
        existing = set()
        for start in range(0, len(hashes), BATCH_SIZE):
            chunk = hashes[start : start + BATCH_SIZE]
            existing.update(dataset.examples.filter(content_hash__in=chunk).values_list("content_hash", flat=True))
        new = [
            TrainingExample(dataset=dataset, source=source, **fields)
            for content_hash_, fields in cleaned.items()
            if content_hash_ not in existing
        ]
        TrainingExample.objects.bulk_create(new, batch_size=BATCH_SIZE)
    summary.duplicates += len(existing)
    summary.created = len(new)
    return summary

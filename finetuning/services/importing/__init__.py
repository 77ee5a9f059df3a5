"""Importing examples from CSV and JSONL files, all or nothing.

``import_examples`` and the admin's import screens share this module: one reader, one
mapping language (``TARGET=COLUMN+COLUMN`` and ``KEY=VALUE``), one dry run.

A file that cannot be read as a whole (bad encoding, broken quoting, a line that is not
JSON, a mapping naming a missing column) imports nothing. Rows that read fine but make no
valid example are rejected one by one, with their row number and reason, and the rest are
imported — unless ``strict``. Row numbers are those a spreadsheet shows (the header is row 1)
for CSV, and line numbers for JSONL.

The package: ``files`` reads a file whole, ``mapping`` is the mapping language, this module
turns rows into examples (dry run and import), and ``uploads`` keeps the admin's uploads.
"""

import csv
import io
import json
from dataclasses import dataclass, field

from django.db import IntegrityError, transaction

from finetuning.models import Dataset, TrainingExample
from finetuning.prompts import training_pair
from finetuning.services.examples import ExampleError, example_clean
from finetuning.services.importing.files import ImportFile, ImportFileError, file_read
from finetuning.services.importing.mapping import (
    mapping_parse,
    mapping_resolve,
    mapping_suggest,
    row_to_example,
)
from finetuning.services.importing.uploads import (
    ImportUpload,
    upload_get,
    upload_mapping_set,
    upload_save,
    uploads_purge,
)

__all__ = [
    "ImportFile",
    "ImportFileError",
    "ImportSummary",
    "ImportUpload",
    "PreviewRow",
    "examples_dry_run",
    "examples_import",
    "examples_read",
    "file_read",
    "mapping_parse",
    "mapping_resolve",
    "mapping_suggest",
    "rejected_rows_csv",
    "row_to_example",
    "upload_get",
    "upload_mapping_set",
    "upload_save",
    "uploads_purge",
]

BATCH_SIZE = 1000
PREVIEW_ROWS = 5


@dataclass
class PreviewRow:
    row: int
    values: dict
    status: str  # new, duplicate, existing, rejected
    reason: str = ""
    fields: dict | None = None

    @property
    def prompt(self):
        """The prompt the model sees for this example, built as training builds it."""
        return training_pair(self.fields["attributes"], self.fields["description"])[0] if self.fields else ""


@dataclass
class ImportSummary:
    dataset: str
    rows: int = 0
    created: int = 0
    duplicates_in_file: list = field(default_factory=list)  # (row, the earlier row it repeats)
    duplicates_in_dataset: list = field(default_factory=list)  # (row, id of the example already there)
    rejected: list = field(default_factory=list)  # (row, reason)
    rejected_values: dict = field(default_factory=dict)  # row -> the row as read
    preview: list = field(default_factory=list)  # PreviewRow, the file's first rows
    mapping_lines: list = field(default_factory=list)  # the mapping used, in the mapping language
    constant_lines: list = field(default_factory=list)

    @property
    def duplicates(self):
        return len(self.duplicates_in_file) + len(self.duplicates_in_dataset)

    def counts(self):
        return {
            "rows": self.rows,
            "created": self.created,
            "duplicates_in_file": len(self.duplicates_in_file),
            "duplicates_in_dataset": len(self.duplicates_in_dataset),
            "rejected": len(self.rejected),
        }

    def lines(self, *, max_reasons=20):
        yield (
            f"{self.dataset}: {self.rows} rows read, {self.created} created, "
            f"{self.duplicates} duplicates skipped ({len(self.duplicates_in_file)} within the file, "
            f"{len(self.duplicates_in_dataset)} already in the dataset), {len(self.rejected)} rejected"
        )
        for row, reason in self.rejected[:max_reasons]:
            yield f"  row {row}: {reason}"
        if len(self.rejected) > max_reasons:
            yield f"  … and {len(self.rejected) - max_reasons} more rejected rows"


def _clean(source, *, mapping_items, constant_items, label, suggest=True, preview_rows=0):
    """Map and clean every row, no database: (summary, {content hash: fields with "row"})."""
    mapping, constants, mapping_lines, constant_lines = mapping_resolve(
        source, mapping_items=mapping_items, constant_items=constant_items, suggest=suggest
    )
    summary = ImportSummary(
        dataset=label, rows=len(source.rows), mapping_lines=mapping_lines, constant_lines=constant_lines
    )
    cleaned = {}
    for index, (number, row) in enumerate(source.rows):
        attributes, description, split = row_to_example(row, mapping, constants)
        preview = PreviewRow(row=number, values=row, status="new") if index < preview_rows else None
        try:
            if not isinstance(attributes, dict):
                raise ExampleError("attributes", "must be an object of attribute names to values")
            fields = example_clean(attributes=attributes, description=description, split=split)
        except ExampleError as exc:
            summary.rejected.append((number, str(exc)))
            summary.rejected_values[number] = row
            if preview:
                preview.status, preview.reason = "rejected", str(exc)
        else:
            first = cleaned.get(fields["content_hash"])
            if first:
                summary.duplicates_in_file.append((number, first["row"]))
                if preview:
                    preview.status, preview.reason = "duplicate", f"the same example as row {first['row']}"
            else:
                cleaned[fields["content_hash"]] = {**fields, "row": number}
            if preview:
                preview.fields = fields
        if preview:
            summary.preview.append(preview)
    return summary, cleaned


def examples_read(*, path, mapping_items=None, constant_items=None, strict=False, label="file"):
    """Read and clean the examples of a CSV or JSONL file without writing anything:
    (summary, {content hash: example fields}), duplicates dropped, rejected rows in the
    summary. Raises ImportFileError when the file as a whole cannot be used."""
    summary, cleaned = _clean(file_read(path), mapping_items=mapping_items, constant_items=constant_items, label=label)
    if strict and summary.rejected:
        row, reason = summary.rejected[0]
        raise ImportFileError(f"{path}: {len(summary.rejected)} rows rejected (first: row {row}: {reason})")
    return summary, cleaned


def _against_dataset(summary, cleaned, dataset):
    """Drop the examples the dataset already holds; the rest, in file order, are new."""
    existing = {}
    if dataset is not None:
        hashes = list(cleaned)
        for start in range(0, len(hashes), BATCH_SIZE):
            rows = dataset.examples.filter(content_hash__in=hashes[start : start + BATCH_SIZE])
            existing.update(rows.values_list("content_hash", "pk"))
    new = []
    for content_hash_, fields in cleaned.items():
        if content_hash_ in existing:
            summary.duplicates_in_dataset.append((fields["row"], existing[content_hash_]))
        else:
            new.append(fields)
    summary.duplicates_in_dataset.sort()
    for preview in summary.preview:
        if preview.status == "new" and preview.fields["content_hash"] in existing:
            preview.status = "existing"
            preview.reason = f"already in {dataset.name} (example {existing[preview.fields['content_hash']]})"
    summary.created = len(new)
    return new


def examples_dry_run(
    *,
    path,
    dataset_name,
    mapping_items=None,
    constant_items=None,
    suggest=True,
    name=None,
    preview_rows=PREVIEW_ROWS,
):
    """What importing would do, writing nothing: the summary (``created`` is what would be
    created) with the first rows as they would be stored and prompted."""
    summary, cleaned = _clean(
        file_read(path, name=name),
        mapping_items=mapping_items,
        constant_items=constant_items,
        label=dataset_name,
        suggest=suggest,
        preview_rows=preview_rows,
    )
    _against_dataset(summary, cleaned, Dataset.objects.filter(name=dataset_name).first())
    return summary


def examples_import(
    *,
    path,
    dataset_name,
    mapping_items=None,
    constant_items=None,
    strict=False,
    suggest=True,
    source=TrainingExample.Source.IMPORT,
    name=None,
):
    """Import a CSV or JSONL file into a dataset (created if needed), in one transaction:
    every new example or none. Imported examples start as drafts (the model's default).
    Without a mapping, the suggested one is used (``suggest``)."""
    summary, cleaned = _clean(
        file_read(path, name=name),
        mapping_items=mapping_items,
        constant_items=constant_items,
        label=dataset_name,
        suggest=suggest,
    )
    if strict and summary.rejected:
        row, reason = summary.rejected[0]
        raise ImportFileError(f"{name or path}: {len(summary.rejected)} rows rejected (first: row {row}: {reason})")
    try:
        with transaction.atomic():
            dataset, _ = Dataset.objects.get_or_create(name=dataset_name)
            # One import into a dataset at a time, so that the duplicates counted are those skipped.
            Dataset.objects.select_for_update().filter(pk=dataset.pk).first()
            new = _against_dataset(summary, cleaned, dataset)
            for start in range(0, len(new), BATCH_SIZE):
                TrainingExample.objects.bulk_create(
                    [
                        TrainingExample(
                            dataset=dataset, source=source, **{k: v for k, v in fields.items() if k != "row"}
                        )
                        for fields in new[start : start + BATCH_SIZE]
                    ]
                )
    except IntegrityError as exc:  # an example added by hand meanwhile
        raise ImportFileError(
            f"{dataset_name} changed during the import (an example was added meanwhile); try again"
        ) from exc
    return summary


def rejected_rows_csv(*, summary, columns):
    """The rejected rows as CSV text: row number, reason, then the row's values as read."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["row", "reason", *columns])
    reasons = dict(summary.rejected)
    for row, values in summary.rejected_values.items():
        cells = [values.get(column, "") for column in columns]
        cells = [json.dumps(c, ensure_ascii=False) if isinstance(c, (dict, list)) else c for c in cells]
        writer.writerow([row, reasons[row], *cells])
    return out.getvalue()

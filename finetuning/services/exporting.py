"""Exporting a dataset's examples in the two forms import reads back unchanged.

JSONL is the native form, one {"attributes", "description", "split"} object a line. CSV has
one "attributes.KEY" column per attribute (known keys in prompt order, then the rest sorted),
then "description" and "split"; the import suggests the mapping back from those names. In
CSV, features and keywords are their items joined with "; " (how a curator would type them),
or a JSON array when an item holds a ';' or '|' of its own or the text would read as one
(import splits text on ';', '|' and new lines, and decodes a cell that is a JSON array).
Either way the examples import back with the same content hashes.
"""

import csv
import io
import json
import re
from decimal import Decimal

from finetuning.attributes import KNOWN_KEYS, LIST_KEYS
from finetuning.services.importing.mapping import ATTRIBUTE_PREFIX

FORMATS = {"jsonl": "application/jsonl", "csv": "text/csv"}
_SEPARATORS = re.compile(r"[;|\n]")


class ExportError(Exception):
    """The dataset cannot be written in this format."""


def _examples(dataset):
    return dataset.examples.order_by("id").values("attributes", "description", "split").iterator(chunk_size=2000)


def _jsonl(dataset):
    for example in _examples(dataset):
        yield json.dumps(example, ensure_ascii=False) + "\n"


def list_cell(items):
    text = "; ".join(items)
    if any(_SEPARATORS.search(item) for item in items) or text.lstrip().startswith("["):
        return json.dumps(items, ensure_ascii=False)
    return text


def _cell(key, value):
    if key in LIST_KEYS and isinstance(value, list):
        return list_cell([str(item) for item in value])
    if key == "price" and isinstance(value, float):
        # Plain digits: "1e+20" is a float's repr but not a price the importer reads.
        return format(Decimal(repr(value)), "f")
    return str(value)


def _csv(dataset):
    keys = set()
    for example in _examples(dataset):
        keys.update(example["attributes"])
    keys = [k for k in KNOWN_KEYS if k in keys] + sorted(keys - set(KNOWN_KEYS))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")

    def flush():
        text = out.getvalue()
        out.seek(0)
        out.truncate()
        return text

    writer.writerow([f"{ATTRIBUTE_PREFIX}{key}" for key in keys] + ["description", "split"])
    yield flush()
    for example in _examples(dataset):
        attributes = example["attributes"]
        row = [_cell(key, attributes[key]) if key in attributes else "" for key in keys]
        writer.writerow([*row, example["description"], example["split"]])
        yield flush()


def dataset_export(*, dataset, fmt):
    """The dataset's examples, oldest first, as chunks of text in ``fmt`` (jsonl or csv)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r} (expected {' or '.join(FORMATS)})")
    return _jsonl(dataset) if fmt == "jsonl" else _csv(dataset)


def export_filename(*, dataset, fmt):
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", dataset.name).strip("-") or "dataset"
    return f"{safe}.{fmt}"

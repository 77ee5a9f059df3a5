"""Uploads kept on the server between the admin's import steps.

One folder per upload under VAR_DIR/imports/<user id>/, so that only its uploader reaches
it; the file, and meta.json with its name, the dataset it goes to and the mapping chosen.
Folders older than a day go when the next upload comes.
"""

import json
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.template.defaultfilters import filesizeformat

from finetuning.services.importing.files import FILE_KINDS, ImportFileError, file_read
from finetuning.services.importing.mapping import lines_split, mapping_resolve, mapping_suggest, value_present

SAMPLE_ROWS = 20
UPLOAD_MAX_AGE_SECONDS = 24 * 3600
_TOKEN = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class ImportUpload:
    """An uploaded file kept on the server between the admin's import steps, in a folder of
    its own under VAR_DIR/imports/<user id>/, so that only its uploader reaches it."""

    directory: Path
    meta: dict

    @property
    def token(self):
        return self.directory.name

    @property
    def path(self):
        return self.directory / f"upload.{self.meta['kind']}"

    def meta_save(self):
        (self.directory / "meta.json").write_text(json.dumps(self.meta, indent=1))

    def read(self):
        return file_read(self.path, name=self.meta["name"])


def _uploads_root():
    return Path(settings.VAR_DIR) / "imports"


def uploads_purge(*, max_age_seconds=UPLOAD_MAX_AGE_SECONDS):
    """Remove uploads older than a day: an abandoned import leaves nothing behind for long."""
    root = _uploads_root()
    cutoff = time.time() - max_age_seconds
    for directory in root.glob("*/*"):
        if directory.is_dir() and directory.stat().st_mtime < cutoff:
            shutil.rmtree(directory, ignore_errors=True)


def _size(count):
    return filesizeformat(count).replace("\xa0", " ")


def upload_save(*, user, uploaded_file, dataset_name):
    """Keep an uploaded file for the import screens, after checking that it can be read at
    all. Raises ImportFileError (keeping nothing) for a file too large or unreadable."""
    name = Path(uploaded_file.name or "upload").name
    limit = settings.IMPORT_MAX_UPLOAD_BYTES
    if uploaded_file.size > limit:
        raise ImportFileError(
            f"{name} is {_size(uploaded_file.size)}; the largest file you can import here is {_size(limit)} "
            "(IMPORT_MAX_UPLOAD_BYTES). Split it, or ask an operator to import it with manage.py import_examples"
        )
    kind = FILE_KINDS.get(Path(name).suffix.lower())
    if kind is None:
        raise ImportFileError(f"{name}: unknown file type (expected .csv or .jsonl)")
    uploads_purge()
    directory = _uploads_root() / str(user.pk) / secrets.token_hex(16)
    directory.mkdir(parents=True)
    upload = ImportUpload(directory=directory, meta={"name": name, "kind": kind, "size": uploaded_file.size})
    try:
        with open(upload.path, "wb") as handle:
            for chunk in uploaded_file.chunks():
                handle.write(chunk)
        source = upload.read()
    except Exception:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    mapping_lines, constant_lines = mapping_suggest(source)
    samples = {}
    for _, row in source.rows[:SAMPLE_ROWS]:
        for column in source.columns:
            if column not in samples and value_present(row.get(column)):
                samples[column] = row[column]
    upload.meta.update(
        dataset=dataset_name,
        rows=len(source.rows),
        columns=source.columns,
        samples=samples,  # a value of each column, for the curator choosing a mapping
        mapping=mapping_lines,
        constants=constant_lines,
        uploaded_at=time.time(),
    )
    upload.meta_save()
    return upload


def upload_get(*, user, token):
    """The user's own upload, or LookupError (someone else's, cleaned up, or never there)."""
    directory = _uploads_root() / str(user.pk) / token
    if not _TOKEN.match(token) or not (directory / "meta.json").is_file():
        raise LookupError(token)
    return ImportUpload(directory=directory, meta=json.loads((directory / "meta.json").read_text()))


def upload_mapping_set(*, upload, mapping_items, constant_items):
    """Remember a curator's edited mapping, once it parses and the file has its columns."""
    mapping_resolve(upload.read(), mapping_items=mapping_items, constant_items=constant_items, suggest=False)
    upload.meta.update(mapping=lines_split(mapping_items), constants=lines_split(constant_items))
    upload.meta_save()

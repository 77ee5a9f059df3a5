"""The model store: a directory tree of artifacts, each with a sha256 manifest.

Artifacts are written into a temporary sibling directory and renamed into
place only when complete, so a crash or a failure never leaves a
half-written model where the loader could find it.
"""

import hashlib
import json
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings

MANIFEST = "manifest.json"
RECIPE = "genapi.json"


class ArtifactError(Exception):
    pass


def store_root():
    return Path(settings.MODEL_STORE)


def slug(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def base_relpath(name):
    return f"base/{slug(name)}"


VERSIONS = "versions"


def version_relpath(name):
    return f"{VERSIONS}/{slug(name)}"


def snapshot_relpath(sha256):
    return f"snapshots/{sha256}.jsonl"


def absolute(relpath):
    return store_root() / relpath


def shown(path):
    """``path`` as messages show it: relative to the model store (a public error never
    names the server's directories)."""
    try:
        return str(Path(path).relative_to(store_root()))
    except ValueError:
        return Path(path).name


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest(files):
    lines = "".join(f"{sha}  {name}\n" for name, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def file_sha256(path):
    return _file_sha256(path)


def manifest_write(directory):
    """Hash every file of an artifact; return the artifact's sha256."""
    directory = Path(directory)
    files = {
        str(path.relative_to(directory)): _file_sha256(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    sha = _digest(files)
    (directory / MANIFEST).write_text(json.dumps({"sha256": sha, "files": files}, indent=2) + "\n")
    return sha


def manifest_read(directory):
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{shown(directory)} has no {MANIFEST}: not a complete artifact")
    return json.loads(path.read_text())


def manifest_verify(directory):
    """Re-hash the files and compare them with the manifest; return the sha256."""
    directory = Path(directory)
    manifest = manifest_read(directory)
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{shown(path)} is missing")
        if _file_sha256(path) != expected:
            raise ArtifactError(f"{shown(path)} does not match its sha256 in {MANIFEST}")
    if _digest(manifest["files"]) != manifest["sha256"]:
        raise ArtifactError(f"{shown(directory / MANIFEST)} is inconsistent")
    return manifest["sha256"]


def recipe_write(directory, recipe):
    (Path(directory) / RECIPE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")


def recipe_read(directory):
    path = Path(directory) / RECIPE
    if not path.is_file():
        raise ArtifactError(f"{shown(directory)} has no {RECIPE}")
    return json.loads(path.read_text())


@contextmanager
def artifact_writer(relpath):
    """Yield a temporary directory; on success it becomes ``relpath`` in the
    store, on any exception it is removed. Refuses to overwrite."""
    final = absolute(relpath)
    if final.exists():
        raise ArtifactError(f"{final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".partial-{final.name}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        yield temporary
        temporary.rename(final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise

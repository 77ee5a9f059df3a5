"""The model store: a directory tree of artifacts, each with a sha256 manifest.

Artifacts are written into a temporary sibling directory and renamed into
place only when complete, so a crash or a failure never leaves a
half-written model where the loader could find it.

With MODEL_STORE_URL set, a bucket is the store every machine shares and
MODEL_STORE is this machine's cache of it. An artifact's manifest is uploaded
after all its files and is what makes it exist: readers look for the manifest,
so they never see an artifact whose upload is still under way or broke off.
Callers get a local copy through ``local`` (``local_file`` for a data snapshot),
which downloads a missing one, checks every file against the manifest and
only then renames it into the cache.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from django.conf import settings

from finetuning import objectstore
from finetuning.recipe import Recipe

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RECIPE = "genapi.json"


class ArtifactError(Exception):
    pass


@contextmanager
def _bucket_errors():
    try:
        yield
    except objectstore.ObjectStoreError as exc:
        raise ArtifactError(str(exc)) from exc


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
    """Write ``recipe`` (a Recipe) with the artifact's files, before its manifest."""
    (Path(directory) / RECIPE).write_text(json.dumps(recipe.as_dict(), indent=2, sort_keys=True) + "\n")


def recipe_read(directory):
    """The artifact's Recipe; ArtifactError when it has none or it is not one."""
    path = Path(directory) / RECIPE
    if not path.is_file():
        raise ArtifactError(f"{shown(directory)} has no {RECIPE}")
    try:
        return Recipe.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:  # RecipeError and JSONDecodeError are ValueErrors
        raise ArtifactError(f"{shown(path)} is not a recipe: {exc}") from exc


def _remote_manifest(remote, relpath):
    """The manifest of ``relpath`` in the bucket, as (bytes, dict), or None when there is none."""
    with _bucket_errors():
        raw = remote.read(f"{relpath}/{MANIFEST}")
    if raw is None:
        return None
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest["files"], dict) or not isinstance(manifest["sha256"], str):
            raise TypeError
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{relpath}/{MANIFEST} in the object store is not a manifest") from exc
    for name in manifest["files"]:
        parts = PurePosixPath(name).parts
        # A name from the bucket becomes a path on this machine: never one outside the artifact.
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts or name == MANIFEST:
            raise ArtifactError(f"{relpath}/{MANIFEST} in the object store names a bad file: {name!r}")
    return raw, manifest


def shared():
    """Whether a bucket (MODEL_STORE_URL) is the store, this machine's MODEL_STORE its cache."""
    return objectstore.bucket() is not None


def exists(relpath):
    """Whether the directory artifact ``relpath`` is complete here or in the bucket."""
    if (absolute(relpath) / MANIFEST).is_file():
        return True
    remote = objectstore.bucket()
    if remote is None:
        return False
    with _bucket_errors():
        return remote.exists(f"{relpath}/{MANIFEST}")


def manifest_lookup(relpath):
    """The manifest of ``relpath`` from this machine's copy or else the bucket, without
    downloading the artifact; None when it exists in neither."""
    directory = absolute(relpath)
    if (directory / MANIFEST).is_file():
        return manifest_read(directory)
    remote = objectstore.bucket()
    found = _remote_manifest(remote, relpath) if remote is not None else None
    return found[1] if found else None


def _fetch(remote, relpath, raw, manifest):
    final = absolute(relpath)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".fetch-{final.name}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        for name, expected in manifest["files"].items():
            path = temporary / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with _bucket_errors():
                found = remote.download(f"{relpath}/{name}", path)
            if not found:
                raise ArtifactError(f"{relpath}/{name} is missing from the object store")
            if _file_sha256(path) != expected:
                raise ArtifactError(f"{relpath}/{name} in the object store does not match its sha256 in {MANIFEST}")
        if _digest(manifest["files"]) != manifest["sha256"]:
            raise ArtifactError(f"{relpath}/{MANIFEST} in the object store is inconsistent")
        (temporary / MANIFEST).write_bytes(raw)
        try:
            temporary.rename(final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            shutil.rmtree(temporary, ignore_errors=True)  # another process fetched it first
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logger.info("Fetched %s from the object store", relpath)


def local(relpath):
    """This machine's copy of the directory artifact ``relpath``, downloaded from the bucket
    first when there is none. The path is returned as is when the artifact exists nowhere
    (callers find no manifest there); a copy already here is not checked again: callers
    verify it against its manifest. Raises ArtifactError when the bucket's copy is damaged."""
    final = absolute(relpath)
    remote = objectstore.bucket()
    if remote is None or final.exists():
        return final
    found = _remote_manifest(remote, relpath)
    if found is not None:
        _fetch(remote, relpath, *found)
    return final


def local_file(relpath, sha256):
    """This machine's copy of the single-file artifact ``relpath`` (a data snapshot),
    downloaded from the bucket first when there is none, and only if it has ``sha256``."""
    final = absolute(relpath)
    remote = objectstore.bucket()
    if remote is None or final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".fetch-{final.name}-{uuid.uuid4().hex[:8]}")
    try:
        with _bucket_errors():
            found = remote.download(relpath, temporary)
        if found:
            if _file_sha256(temporary) != sha256:
                raise ArtifactError(f"{relpath} in the object store does not match its sha256")
            os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    return final


def file_write(relpath, payload):
    """Write the single-file artifact ``relpath`` whole (a reader sees all of it or none),
    here and, with a bucket, there too."""
    path = absolute(relpath)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".partial-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        temporary.write_bytes(payload)
        remote = objectstore.bucket()
        if remote is not None:
            with _bucket_errors():
                remote.upload(temporary, relpath)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _upload(remote, relpath, directory):
    """Upload a complete artifact, its manifest last; on failure remove what was uploaded."""
    manifest = manifest_read(directory)
    names = list(manifest["files"])
    try:
        with _bucket_errors():
            for name in names:
                remote.upload(Path(directory) / name, f"{relpath}/{name}")
            remote.upload(Path(directory) / MANIFEST, f"{relpath}/{MANIFEST}")
    except BaseException:
        _remote_remove(remote, relpath)
        raise
    logger.info("Uploaded %s to the object store", relpath)


def _remote_remove(remote, relpath):
    """Delete ``relpath`` from the bucket, the manifest first so that readers stop seeing it
    before its files go. Never raises: removal cleans up after something that already failed."""
    try:
        remote.delete([f"{relpath}/{MANIFEST}"])
        names = remote.names(f"{relpath}/")
        if names:
            remote.delete(names)
    except objectstore.ObjectStoreError:
        logger.warning("Could not remove %s from the object store; its objects are left there", relpath)


def remove(relpath):
    """Remove the artifact ``relpath`` from this machine and from the bucket (best effort)."""
    remote = objectstore.bucket()
    if remote is not None:
        _remote_remove(remote, relpath)
    path = absolute(relpath)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def artifact_writer(relpath):
    """Yield a temporary directory; on success it becomes ``relpath`` in the
    store (and, with a bucket, is uploaded: the caller writes the manifest),
    on any exception it is removed. Refuses to overwrite."""
    final = absolute(relpath)
    remote = objectstore.bucket()
    if final.exists() or (remote is not None and exists(relpath)):
        raise ArtifactError(f"{relpath} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".partial-{final.name}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    uploaded = False
    try:
        yield temporary
        if remote is not None:
            _upload(remote, relpath, temporary)
            uploaded = True
        temporary.rename(final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if uploaded:
            _remote_remove(remote, relpath)
        raise


# --- Moving whole artifacts between this machine and the bucket (store_push, store_pull) ---

_RELPATH = re.compile(rf"(base|{VERSIONS})/[A-Za-z0-9_-][A-Za-z0-9._-]*|snapshots/[0-9a-f]{{64}}\.jsonl")


def relpath_check(relpath):
    """``relpath`` as the store names it, or ArtifactError saying what an artifact's name looks like."""
    cleaned = str(relpath).strip().strip("/")
    if not _RELPATH.fullmatch(cleaned):
        raise ArtifactError(
            f"{relpath!r} is not an artifact: expected base/<name>, {VERSIONS}/<name> or snapshots/<sha256>.jsonl"
        )
    return cleaned


def _is_file_artifact(relpath):
    return relpath.startswith("snapshots/")


def artifacts_local():
    """Every complete artifact on this machine (partial and fetching copies left out)."""
    root = store_root()
    found = [
        f"{kind}/{path.name}"
        for kind in ("base", VERSIONS)
        for path in sorted((root / kind).glob("*"))
        if not path.name.startswith(".") and (path / MANIFEST).is_file()
    ]
    return found + [f"snapshots/{path.name}" for path in sorted((root / "snapshots").glob("[0-9a-f]*.jsonl"))]


def artifacts_remote():
    """Every complete artifact in the bucket."""
    remote = objectstore.bucket()
    if remote is None:
        raise ArtifactError("MODEL_STORE_URL is not set: there is no object store")
    with _bucket_errors():
        names = remote.names()
    found = [name.removesuffix(f"/{MANIFEST}") for name in names if name.endswith(f"/{MANIFEST}")]
    return sorted(name for name in found + names if _RELPATH.fullmatch(name))


def push(relpath):
    """Upload this machine's verified copy of ``relpath`` to the bucket; False when the
    bucket has that very artifact already. Raises ArtifactError when it has another one."""
    remote = objectstore.bucket()
    if remote is None:
        raise ArtifactError("MODEL_STORE_URL is not set: there is no object store to push to")
    path = absolute(relpath)
    if _is_file_artifact(relpath):
        if not path.is_file():
            raise ArtifactError(f"{relpath} is not in the local model store")
        if _file_sha256(path) != PurePosixPath(relpath).stem:
            raise ArtifactError(f"{relpath} does not match the sha256 in its name")
        with _bucket_errors():
            if remote.exists(relpath):
                return False
            remote.upload(path, relpath)
        return True
    if not path.is_dir():
        raise ArtifactError(f"{relpath} is not in the local model store")
    sha = manifest_verify(path)
    found = _remote_manifest(remote, relpath)
    if found is not None:
        if found[1]["sha256"] != sha:
            raise ArtifactError(f"{relpath} in the object store is a different artifact (sha256 {found[1]['sha256']})")
        return False
    _upload(remote, relpath, path)
    return True


def pull(relpath):
    """Download ``relpath`` into this machine's cache (when not there yet) and verify the copy."""
    if objectstore.bucket() is None:
        raise ArtifactError("MODEL_STORE_URL is not set: there is no object store to pull from")
    if _is_file_artifact(relpath):
        sha = PurePosixPath(relpath).stem
        path = local_file(relpath, sha)
        if not path.is_file():
            raise ArtifactError(f"{relpath} is in neither the object store nor the local model store")
        if _file_sha256(path) != sha:
            raise ArtifactError(f"{relpath} does not match the sha256 in its name")
        return path
    path = local(relpath)
    if not path.exists():
        raise ArtifactError(f"{relpath} is in neither the object store nor the local model store")
    manifest_verify(path)
    return path

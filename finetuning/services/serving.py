"""Serving folders: one model version taken out of the registry with everything needed to serve
it elsewhere, on a machine (or in an image) with no database server, broker or workers.

A folder holds ``models/``, a model store with the version's artifact (and, for a LoRA version,
the base weights it was trained on), and ``serving.json``, the registry row it came from. The
receiving side points MODEL_STORE at ``models/`` and registers that row in its own (SQLite)
registry as the active version; the loader then finds, verifies and serves it exactly as the full
service does.
"""

import json
import shutil
import uuid
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from finetuning import store
from finetuning.models import Activation, ModelVersion
from finetuning.prompts import PROMPT_FORMAT_VERSION
from finetuning.services.versions import VersionError, artifact_verify, version_activate, version_register

MANIFEST = "serving.json"
MODELS = "models"
FORMAT = 1


class ServingError(Exception):
    pass


def _artifacts(version):
    """The store paths ``version`` needs: its own and, for a LoRA version, its base's."""
    relpaths = [version.artifact_path]
    recipe = store.recipe_read(store.local(version.artifact_path))
    if recipe.is_adapter:
        relpaths.append(recipe.base_artifact)
    return relpaths


def serving_export(*, version, output):
    """Write ``version``'s serving folder at ``output`` (which must not exist): all of it or
    nothing. Returns the folder's size in bytes."""
    output = Path(output)
    if output.exists():
        raise ServingError(f"output: {output} already exists")
    try:
        artifact_verify(version)
    except VersionError as exc:
        raise ServingError(str(exc).replace("cannot activate", "cannot export")) from exc
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.parent / f".partial-{output.name}-{uuid.uuid4().hex[:8]}"
    try:
        artifacts = {}
        for relpath in _artifacts(version):
            copy = temporary / MODELS / relpath
            shutil.copytree(store.local(relpath), copy)
            # What is in the folder is what the registry knows, byte for byte.
            artifacts[relpath] = store.manifest_verify(copy)
        if artifacts[version.artifact_path] != version.sha256:
            raise ServingError(f"{version.name}'s artifact changed while it was copied")
        manifest = {
            "format": FORMAT,
            "exported_at": timezone.now().isoformat(timespec="seconds"),
            "version": {
                "name": version.name,
                "kind": version.kind,
                "base_model": version.base_model,
                "artifact_path": version.artifact_path,
                "sha256": version.sha256,
                "prompt_format_version": version.prompt_format_version,
                "hyperparameters": version.hyperparameters,
                "metrics": version.metrics,
            },
            "artifacts": artifacts,
        }
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        temporary.rename(output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return sum(path.stat().st_size for path in output.rglob("*") if path.is_file())


def serving_manifest_read(directory):
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ServingError(f"{directory}: no {MANIFEST}; make the folder with manage.py export_serving") from exc
    except ValueError as exc:
        raise ServingError(f"{path}: not JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise ServingError(f"{path}: format {manifest.get('format')!r}; this genapi reads format {FORMAT}")
    return manifest


@transaction.atomic
def serving_install(*, directory):
    """Register the serving folder's version in this registry and make it the active one.
    MODEL_STORE must be the folder's ``models/``. Running it again changes nothing.
    Returns ``(version, created)``."""
    directory = Path(directory).resolve()
    manifest = serving_manifest_read(directory)
    if Path(settings.MODEL_STORE).resolve() != directory / MODELS:
        raise ServingError(f"MODEL_STORE is {settings.MODEL_STORE}; set it to {directory / MODELS}")
    row = manifest["version"]
    if row["prompt_format_version"] != PROMPT_FORMAT_VERSION:
        raise ServingError(
            f"{row['name']} was trained with prompt format {row['prompt_format_version']}; this genapi builds "
            f"prompts in format {PROMPT_FORMAT_VERSION}: export it from a genapi of the same version"
        )
    for relpath, sha in manifest["artifacts"].items():
        try:
            found = store.manifest_verify(directory / MODELS / relpath)
        except store.ArtifactError as exc:
            raise ServingError(f"{relpath}: {exc}") from exc
        if found != sha:
            raise ServingError(f"{relpath}: its files are not the ones exported (sha256 {found[:12]}, not {sha[:12]})")
    existing = ModelVersion.objects.filter(name=row["name"]).first()
    if existing is not None:
        if existing.sha256 != row["sha256"]:
            raise ServingError(f"a different version named {row['name']} is already registered here")
        return existing, False
    # The prompt format was checked above: registering stamps this code's, the same number.
    version = version_register(
        name=row["name"],
        kind=row["kind"],
        base_model=row["base_model"],
        relpath=row["artifact_path"],
        sha256=row["sha256"],
        hyperparameters=row["hyperparameters"],
        metrics=row["metrics"],
    )
    try:
        version = version_activate(
            version=version, kind=Activation.Kind.INITIAL, reason=f"installed from a serving folder ({directory.name})"
        )
    except VersionError as exc:
        raise ServingError(str(exc)) from exc
    return version, True

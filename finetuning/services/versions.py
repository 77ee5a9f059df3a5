from django.db import transaction
from django.utils import timezone

from finetuning import store
from finetuning.models import Activation, ModelVersion
from finetuning.prompts import PROMPT_FORMAT_VERSION
from finetuning.selectors import base_version_name, reactivation_get


class VersionError(Exception):
    pass


@transaction.atomic
def base_version_register(*, base_model, relpath, sha256):
    """Register the prepared base model as a version; it becomes the active
    one when nothing else is, so generation works before any training.
    Returns ``(version, created)``."""
    version, created = ModelVersion.objects.get_or_create(
        name=base_version_name(base_model),
        defaults={
            "kind": ModelVersion.Kind.BASE,
            "base_model": base_model,
            "artifact_path": relpath,
            "sha256": sha256,
            "prompt_format_version": PROMPT_FORMAT_VERSION,
        },
    )
    if not ModelVersion.objects.filter(is_active=True).exists():
        version_activate(version=version, kind=Activation.Kind.INITIAL, reason="the first version: nothing was active")
        version.refresh_from_db()
    return version, created


@transaction.atomic
def version_register(*, name, kind, base_model, relpath, sha256, hyperparameters, metrics, job=None, snapshot=None):
    if ModelVersion.objects.filter(name=name).exists():
        raise VersionError(f"a model version named {name!r} already exists")
    return ModelVersion.objects.create(
        name=name,
        kind=kind,
        base_model=base_model,
        artifact_path=relpath,
        sha256=sha256,
        prompt_format_version=PROMPT_FORMAT_VERSION,
        hyperparameters=hyperparameters,
        metrics=metrics,
        job=job,
        snapshot=snapshot,
    )


def artifact_verify(version):
    """Re-hash ``version``'s files against its manifest and the registry (and, for a LoRA
    version, find the base weights it was trained on): a damaged or incomplete artifact is
    refused before it is served, not at a client's request. Raises VersionError."""
    try:
        directory = store.local(version.artifact_path)
        sha = store.manifest_verify(directory)
        recipe = store.recipe_read(directory)
        recipe.prompt_format_check()
        if recipe.is_adapter:
            base = store.manifest_read(store.local(recipe.base_artifact))
            if base["sha256"] != recipe.base_sha256:
                raise store.ArtifactError(f"its base model {recipe.base_artifact} is not the one it was trained on")
    except (store.ArtifactError, OSError, ValueError) as exc:  # RecipeError is a ValueError
        raise VersionError(f"cannot activate {version.name}: {exc}") from exc
    if sha != version.sha256:
        raise VersionError(f"cannot activate {version.name}: its artifact's sha256 does not match the registry")


@transaction.atomic
def version_activate(
    *, version, user=None, reason="", kind=Activation.Kind.MANUAL, evaluation=None, expected_active=None
):
    """Make ``version`` the one the API serves, and record who, why and what it
    replaced. Refuses an artifact that is missing or damaged, so a bad activation
    never takes the service down. ``expected_active``: refuse unless that version
    is still the active one (a decision made on a comparison with it)."""
    artifact_verify(version)
    # Lock every row that could be active so two activations run one after the other.
    previous = ModelVersion.objects.select_for_update().filter(is_active=True).first()
    if expected_active is not None and (previous is None or previous.pk != expected_active.pk):
        raise VersionError(
            f"the active version changed to {previous.name if previous else 'none'} since {expected_active.name} "
            "was compared; evaluate again"
        )
    if previous is not None and previous.pk == version.pk:
        raise VersionError(f"{version.name} is already the active version")
    ModelVersion.objects.filter(is_active=True).exclude(pk=version.pk).update(is_active=False)
    now = timezone.now()
    ModelVersion.objects.filter(pk=version.pk).update(is_active=True, activated_at=now)
    # Clients may keep asking for a version by name after another replaces it: activating releases it.
    ModelVersion.objects.filter(pk=version.pk, approved_at__isnull=True).update(approved_at=now, approved_by=user)
    Activation.objects.create(
        version=version, previous=previous, kind=kind, reason=reason.strip(), user=user, evaluation=evaluation
    )
    version.refresh_from_db()
    return version


def version_approve(*, version, user=None):
    """Release ``version`` to every client that may generate, by name, without activating it."""
    if version.approved_at is None:
        ModelVersion.objects.filter(pk=version.pk).update(approved_at=timezone.now(), approved_by=user)
        version.refresh_from_db()
    return version


def version_approval_withdraw(*, version):
    """Serve ``version`` by name only to keys with the models:unreleased scope again (the
    active version stays served to everyone while it is active)."""
    ModelVersion.objects.filter(pk=version.pk).update(approved_at=None, approved_by=None)
    version.refresh_from_db()
    return version


@transaction.atomic
def version_rollback(*, user=None, reason, expected=None):
    """Re-activate the version that was active before the current one, recorded as a roll
    back when that version is older in the activation history (see Reactivation).
    ``reason`` is required; ``expected``: refuse unless that version is still the one a
    roll back would activate (the curator confirmed a page that named it)."""
    reason = (reason or "").strip()
    if not reason:
        raise VersionError("say why: the reason is recorded in the activation history")
    list(ModelVersion.objects.select_for_update().filter(is_active=True))
    reactivation = reactivation_get()
    if reactivation is None:
        raise VersionError("there is no earlier active version to return to")
    if expected is not None and reactivation.version.pk != expected.pk:
        raise VersionError(
            f"the active version changed since you asked: undoing the last activation would now activate "
            f"{reactivation.version.name}, not {expected.name}"
        )
    return version_activate(version=reactivation.version, user=user, kind=reactivation.kind, reason=reason)

import json
from dataclasses import dataclass

from django.db.models import Count, Min, Prefetch, Q

from finetuning import store
from finetuning.models import (
    Activation,
    Dataset,
    Evaluation,
    EvaluationScore,
    FactTerm,
    FineTuningJob,
    LongRunningWork,
    ModelVersion,
    TrainingExample,
)


def fact_vocabulary():
    """Every fact term of the unsupported-claims metric, sorted: the reviewed ones shipped with
    the code and the curators' additions."""
    from finetuning.facts import shipped_terms

    return sorted(set(shipped_terms()) | {term.lower() for term in FactTerm.objects.values_list("term", flat=True)})


def active_version_get():
    return ModelVersion.objects.filter(is_active=True).first()


def base_version_name(base_model):
    """The name the prepared ``base_model`` is registered under as a version."""
    return f"base-{store.slug(base_model)}"


def base_version_get(*, base_model):
    """The version of the base model ``base_model`` itself (what a fine-tuned version was made
    from); None when it was never registered here."""
    return ModelVersion.objects.filter(name=base_version_name(base_model), kind=ModelVersion.Kind.BASE).first()


def version_get(*, reference):
    """A version by name, or by id when ``reference`` is all digits; None if absent."""
    reference = str(reference).strip()
    # isdecimal() alone is true for digits int() refuses ("²"); ASCII digits only.
    if reference.isascii() and reference.isdigit():
        found = ModelVersion.objects.filter(pk=int(reference)).first()
        if found:
            return found
    return ModelVersion.objects.filter(name=reference).first()


def version_list(*, released_only=False):
    """Every version, the active one first; ``released_only``: the active and approved ones."""
    versions = ModelVersion.objects.order_by("-is_active", "-created_at")
    if released_only:
        versions = versions.filter(Q(is_active=True) | Q(approved_at__isnull=False))
    return versions


def datasets_with_counts():
    split, review = TrainingExample.Split, TrainingExample.Review
    return Dataset.objects.annotate(
        example_count=Count("examples"),
        train_count=Count("examples", filter=Q(examples__split=split.TRAIN)),
        validation_count=Count("examples", filter=Q(examples__split=split.VALIDATION)),
        unassigned_count=Count("examples", filter=Q(examples__split=split.UNASSIGNED)),
        feedback_count=Count("examples", filter=Q(examples__source=TrainingExample.Source.FEEDBACK)),
        approved_count=Count("examples", filter=Q(examples__review=review.APPROVED)),
        draft_count=Count("examples", filter=Q(examples__review=review.DRAFT)),
        rejected_count=Count("examples", filter=Q(examples__review=review.REJECTED)),
    )


def trainable_reviews(*, dataset):
    """The review statuses that train in ``dataset``: approved, and drafts while the dataset's
    ``train_unreviewed`` is on; rejected never."""
    review = TrainingExample.Review
    return [review.APPROVED, review.DRAFT] if dataset.train_unreviewed else [review.APPROVED]


def trainable_examples(*, dataset):
    """What a job on ``dataset`` trains on (its snapshot and the fine-tune pre-flight both read this)."""
    return (
        dataset.examples.filter(review__in=trainable_reviews(dataset=dataset))
        .order_by("content_hash")
        .values("id", "attributes", "description", "split", "content_hash")
    )


def review_counts(*, dataset):
    """{review status: number of examples} for ``dataset``, every status present."""
    counts = dict(dataset.examples.values_list("review").annotate(n=Count("id")).order_by())
    return {status: counts.get(status, 0) for status in TrainingExample.Review.values}


def evaluation_latest(*, version):
    """The newest succeeded evaluation of ``version``, with its scores."""
    return (
        Evaluation.objects.filter(version=version, status=Evaluation.Status.SUCCEEDED)
        .prefetch_related("scores__version")
        .first()
    )


def activations_recent(limit=20):
    return Activation.objects.select_related("version", "previous", "user")[:limit]


def rollback_target():
    """The version that was active before the current one (None when there is none)."""
    last = Activation.objects.select_related("previous").first()
    if last is None or last.previous is None or not last.version.is_active:
        return None
    return last.previous


@dataclass(frozen=True)
class Reactivation:
    """The version the last activation replaced, and which way returning to it goes in the
    activation history: "back" to a version first activated before the current one,
    "forward" to one first activated after it (the undo of a roll back), or "again"
    when the history cannot tell (the current version was made active without a record)."""

    version: ModelVersion
    current: ModelVersion
    direction: str

    @property
    def label(self):
        verb = {"back": "Roll back to", "forward": "Roll forward to"}.get(self.direction, "Re-activate")
        return f"{verb} {self.version.name}"

    @property
    def kind(self):
        kinds = {"back": Activation.Kind.ROLLBACK, "forward": Activation.Kind.ROLL_FORWARD}
        return kinds.get(self.direction, Activation.Kind.MANUAL)


def reactivation_get():
    """What undoing the last activation would do (a Reactivation), or None when it cannot."""
    target = rollback_target()
    current = ModelVersion.objects.filter(is_active=True).first()
    if target is None or current is None:
        return None
    firsts = dict(
        Activation.objects.filter(version__in=[target, current])
        .order_by()
        .values_list("version")
        .annotate(first=Min("created_at"))
    )
    ours, theirs = firsts.get(target.pk), firsts.get(current.pk)
    if ours is None or theirs is None or ours == theirs:
        direction = "again"
    else:
        direction = "back" if ours < theirs else "forward"
    return Reactivation(version=target, current=current, direction=direction)


def versions_with_latest_scores(versions=None):
    """Versions with ``scores_succeeded``: their scores in succeeded evaluations, newest
    first, fetched for the whole list in one query."""
    succeeded = EvaluationScore.objects.filter(evaluation__status=Evaluation.Status.SUCCEEDED).order_by(
        "-evaluation__created_at"
    )
    versions = ModelVersion.objects.all() if versions is None else versions
    return versions.prefetch_related(Prefetch("scores", succeeded, to_attr="scores_succeeded"))


def dataset_get(*, name):
    """A dataset by its name (surrounding spaces ignored); None if absent."""
    return Dataset.objects.filter(name=str(name).strip()).first()


def job_get(*, pk):
    """A job with what its pages and the API show beside it; None if absent."""
    return jobs_recent().filter(pk=pk).first()


def jobs_recent():
    return FineTuningJob.objects.select_related("dataset", "snapshot", "requested_by")


# --- Data snapshots: the frozen files jobs train on -----------------------------------------


class SnapshotError(Exception):
    pass


def snapshot_verify(snapshot):
    """The snapshot file's path, once it is known to be the file that was frozen."""
    try:
        path = store.local_file(snapshot.path, snapshot.sha256)
    except store.ArtifactError as exc:
        raise SnapshotError(f"data snapshot {snapshot.path} cannot be read: {exc}") from exc
    if not path.is_file():
        raise SnapshotError(f"data snapshot {snapshot.path} is missing from the model store")
    if store.file_sha256(path) != snapshot.sha256:
        raise SnapshotError(f"data snapshot {snapshot.path} does not match its sha256: it was changed after freezing")
    return path


def snapshot_read(snapshot):
    """(train rows, validation rows) from the verified snapshot file."""
    path = snapshot_verify(snapshot)
    train, validation = [], []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            (validation if row["split"] == "validation" else train).append(row)
    return train, validation


# --- Long-running work, as the metrics count it -------------------------------------------


def work_counts():
    """{"jobs": {state: rows}, "evaluations": {state: rows}}, every state present (0 included):
    one indexed query per kind, whatever the number of rows."""
    counts = {}
    for key, model in (("jobs", FineTuningJob), ("evaluations", Evaluation)):
        found = dict(model.objects.order_by().values_list("status").annotate(rows=Count("id")))
        counts[key] = {state: found.get(state, 0) for state in LongRunningWork.Status.values}
    return counts


def jobs_running_progress():
    """(job id, step reached, total steps) of each running job."""
    return list(
        FineTuningJob.objects.filter(status=LongRunningWork.Status.RUNNING).values_list("pk", "step", "total_steps")
    )

"""Data snapshots: a dataset's trainable examples frozen into a JSONL file.

Which examples train is the review's call (selectors.trainable_examples): approved ones, drafts
while the dataset's ``train_unreviewed`` is on, rejected ones never; the snapshot's note says
what review left out.

A job trains from its snapshot file, never from the live rows, so edits made
while it is queued or running do not change what it learns, and any version
can be retrained on exactly its data.
"""

import hashlib
import json

from django.db import IntegrityError, transaction

from finetuning import store
from finetuning.models import DataSnapshot, TrainingExample
from finetuning.selectors import SnapshotError, review_counts, snapshot_verify, trainable_examples

VALIDATION_PERCENT = 10
# Below this many unassigned examples a validation split costs more than it tells.
MIN_EXAMPLES_FOR_SPLIT = 20


def _held_out(description):
    """Whether an unassigned example with this description goes to validation: by a hash of
    the description alone, so that products sharing one description (common in shop data)
    land on the same side and no reference text is also trained on."""
    return int(hashlib.sha256(description.encode()).hexdigest()[:8], 16) % 100 < VALIDATION_PERCENT


def split_examples(rows):
    """Honour explicit splits; send ~10% of unassigned examples to validation,
    chosen by description hash so the same text always lands on the same side."""
    train, validation = [], []
    unassigned = [row for row in rows if row["split"] == TrainingExample.Split.UNASSIGNED]
    split_unassigned = len(unassigned) >= MIN_EXAMPLES_FOR_SPLIT
    for row in rows:
        if row["split"] == TrainingExample.Split.VALIDATION:
            validation.append(row)
        elif row["split"] == TrainingExample.Split.TRAIN or not split_unassigned:
            train.append(row)
        elif _held_out(row["description"]):
            validation.append(row)
        else:
            train.append(row)
    return train, validation


def _split_note(rows, validation):
    unassigned = sum(1 for row in rows if row["split"] == TrainingExample.Split.UNASSIGNED)
    explicit = sum(1 for row in rows if row["split"] == TrainingExample.Split.VALIDATION)
    if not validation:
        return (
            f"no validation split: only {unassigned} unassigned examples (at least {MIN_EXAMPLES_FOR_SPLIT} "
            "are needed to hold some out) and none marked validation; training runs without validation loss"
        )
    parts = []
    if explicit:
        parts.append(f"{explicit} marked validation")
    if len(validation) > explicit:
        parts.append(f"{len(validation) - explicit} of {unassigned} unassigned chosen by description hash")
    return "validation: " + ", ".join(parts)


def _review_left_out(dataset):
    """What review status kept out of training, in words ("" when nothing), and the counts."""
    counts = review_counts(dataset=dataset)
    review = TrainingExample.Review
    left = []
    if not dataset.train_unreviewed and counts[review.DRAFT]:
        left.append(f"{counts[review.DRAFT]} draft{'s' if counts[review.DRAFT] != 1 else ''}")
    if counts[review.REJECTED]:
        left.append(f"{counts[review.REJECTED]} rejected")
    return " and ".join(left), counts


def _no_rows_message(dataset):
    left, counts = _review_left_out(dataset)
    total = sum(counts.values())
    if not total:
        return f"dataset {dataset.name} has no examples to train on"
    how = (
        "approved and draft examples train, rejected ones never"
        if dataset.train_unreviewed
        else "only approved examples train (the dataset's 'train unreviewed' is off)"
    )
    return (
        f"dataset {dataset.name} has no examples to train on after review: of its {total} examples, "
        f"{left} are left out and none is approved; {how}"
    )


def _review_note(dataset, trained):
    """The snapshot note's part on review: what it left out, and a warning when few remain."""
    left, _ = _review_left_out(dataset)
    if not left:
        return ""
    note = f"; review left out {left}"
    if trained < MIN_EXAMPLES_FOR_SPLIT:
        note += f": only {trained} example{'s' if trained != 1 else ''} to train on"
    return note


def snapshot_freeze(*, dataset):
    """Write the dataset's trainable examples, with their resolved splits, to
    ``snapshots/<sha256>.jsonl`` and return its DataSnapshot (the same row when
    nothing changed since the last freeze)."""
    rows = list(trainable_examples(dataset=dataset))
    if not rows:
        raise SnapshotError(_no_rows_message(dataset))
    train, validation = split_examples(rows)
    if not train:
        raise SnapshotError(f"dataset {dataset.name} has no training examples (every example is in validation)")
    in_validation = {row["id"] for row in validation}
    lines = [
        json.dumps(
            {
                "id": row["id"],
                "split": "validation" if row["id"] in in_validation else "train",
                "attributes": row["attributes"],
                "description": row["description"],
                "content_hash": row["content_hash"],
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        for row in sorted(rows, key=lambda row: row["id"])
    ]
    payload = ("\n".join(lines) + "\n").encode()
    sha = hashlib.sha256(payload).hexdigest()
    existing = DataSnapshot.objects.filter(sha256=sha).first()
    if existing:
        try:
            snapshot_verify(existing)
            return existing
        except SnapshotError:
            pass  # the file went missing: write it again below
    relpath = store.snapshot_relpath(sha)
    try:
        store.file_write(relpath, payload)  # atomic: a reader sees the whole file or none
    except store.ArtifactError as exc:
        raise SnapshotError(f"data snapshot {relpath} could not be written: {exc}") from exc
    if existing:
        return existing
    try:
        with transaction.atomic():
            return DataSnapshot.objects.create(
                dataset=dataset,
                path=relpath,
                sha256=sha,
                examples=len(rows),
                train_examples=len(train),
                validation_examples=len(validation),
                note=(_split_note(rows, validation) + _review_note(dataset, len(rows)))[:300],
            )
    except IntegrityError:  # frozen at the same moment by another start
        return DataSnapshot.objects.get(sha256=sha)

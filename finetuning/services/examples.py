import hashlib
import json

from django.db import IntegrityError, transaction
from django.utils import timezone

from finetuning.attributes import (
    MAX_DESCRIPTION_CHARS,
    AttributeValueError,
    attributes_normalize,
    description_normalize,
)
from finetuning.models import TrainingExample


class ExampleError(ValueError):
    """An example that cannot be stored; ``field`` names the culprit."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def content_hash(attributes, description):
    canonical = json.dumps({"attributes": attributes, "description": description}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def example_clean(*, attributes, description, split=TrainingExample.Split.UNASSIGNED):
    """Validate and normalise one example's fields; raise ExampleError naming the field."""
    try:
        attributes = attributes_normalize(attributes)
    except AttributeValueError as exc:
        raise ExampleError(f"attributes.{exc.key}", exc.message) from exc
    if not attributes.get("name"):
        raise ExampleError("attributes.name", "every example needs a product name")
    description = description_normalize(description)
    if not description:
        raise ExampleError("description", "is empty")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise ExampleError("description", f"is longer than {MAX_DESCRIPTION_CHARS} characters")
    split = (split or TrainingExample.Split.UNASSIGNED).strip().lower()
    if split not in TrainingExample.Split.values:
        raise ExampleError("split", f"{split!r} is not one of {', '.join(TrainingExample.Split.values)}")
    return {
        "attributes": attributes,
        "description": description,
        "split": split,
        "name": attributes["name"][:500],
        "category": str(attributes.get("category", ""))[:500],
        "content_hash": content_hash(attributes, description),
    }


def example_duplicate_get(*, dataset, content_hash_, exclude_pk=None):
    return TrainingExample.objects.filter(dataset=dataset, content_hash=content_hash_).exclude(pk=exclude_pk).first()


def example_save(*, example, dataset, attributes, description, split, source=None, review=None):
    """Create (``example.pk`` is None) or update one example after cleaning it (``source``,
    ``review``: None keeps the example's own). Raises ExampleError naming the field, also for a
    duplicate in the dataset."""
    fields = example_clean(attributes=attributes, description=description, split=split)
    duplicate = example_duplicate_get(dataset=dataset, content_hash_=fields["content_hash"], exclude_pk=example.pk)
    if duplicate:
        raise ExampleError("description", f"the same example is already in {dataset.name} (example {duplicate.pk})")
    example.dataset = dataset
    if source:
        example.source = source
    if review:
        if review not in TrainingExample.Review.values:
            raise ExampleError("review", f"{review!r} is not one of {', '.join(TrainingExample.Review.values)}")
        example.review = review
    for key, value in fields.items():
        setattr(example, key, value)
    try:
        with transaction.atomic():
            example.save()
    except IntegrityError as exc:  # a concurrent insert of the same example
        raise ExampleError("description", f"the same example is already in {dataset.name}") from exc
    return example


def example_create(
    *, dataset, attributes, description, split=TrainingExample.Split.UNASSIGNED, source=TrainingExample.Source.MANUAL
):
    return example_save(
        example=TrainingExample(),
        dataset=dataset,
        attributes=attributes,
        description=description,
        split=split,
        source=source,
    )


def example_feedback_create(*, dataset, attributes, description):
    """A training example made from feedback on a generated text (a curator's correction, or
    the output as it was): a draft, so that nothing trains on it before it is reviewed, with
    source feedback. Raises ExampleError naming the field, also for a duplicate."""
    return example_save(
        example=TrainingExample(),
        dataset=dataset,
        attributes=attributes,
        description=description,
        split=TrainingExample.Split.UNASSIGNED,
        source=TrainingExample.Source.FEEDBACK,
        review=TrainingExample.Review.DRAFT,
    )


def examples_review_set(*, examples, review):
    """Set the review status of the ``examples`` queryset in one UPDATE; returns how many
    changed (those already in ``review`` are left as they are)."""
    if review not in TrainingExample.Review.values:
        raise ExampleError("review", f"{review!r} is not one of {', '.join(TrainingExample.Review.values)}")
    # update() skips auto_now: stamp it, so the list's "updated" says when it was reviewed.
    return examples.exclude(review=review).update(review=review, updated_at=timezone.now())

"""What fine-tuning does when the serving side asks for it. Serving may not import fine-tuning's
services (the import-linter contract in pyproject.toml): it sends a signal, and the fine-tuning
app, which owns the write, answers it. Connected in FinetuningConfig.ready."""

from django.dispatch import receiver

from finetuning.services.examples import ExampleError, example_feedback_create
from inference.services.feedback import FeedbackError, example_requested


@receiver(example_requested, dispatch_uid="finetuning.example_from_feedback")
def example_from_feedback(sender, *, dataset, attributes, description, **kwargs):
    """A curator adds a logged generation to ``dataset``: the example is a draft with source
    feedback. Its errors reach the sender as FeedbackError, the one error it knows, with the
    same field and message."""
    try:
        return example_feedback_create(dataset=dataset, attributes=attributes, description=description)
    except ExampleError as exc:
        raise FeedbackError(exc.field, exc.message) from exc

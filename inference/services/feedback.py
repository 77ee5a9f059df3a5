"""The feedback loop: a curator rates a logged generation, corrects its text, and turns it
into a training example. The example is fine-tuning's to write: this service asks for it with
the example_requested signal, which the fine-tuning app answers (finetuning/signals.py) through
its examples service, so it meets the same validation and duplicate check as one typed in or
imported; it is a draft with source ``feedback``, and the generation links to it."""

from django.db import transaction
from django.dispatch import Signal
from django.utils import timezone

from finetuning.attributes import MAX_DESCRIPTION_CHARS, description_normalize
from inference.models import Generation
from inference.services.generation_log import input_product

# Sent with dataset, attributes and description; its one receiver returns the training example
# it wrote, or raises FeedbackError naming the field (then nothing is written).
example_requested = Signal()


class FeedbackError(ValueError):
    """Feedback that cannot be stored; ``field`` names the culprit."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def generation_rate(*, generation, rating, note="", user=None):
    """Rate ``generation`` good or bad with a note ("" as the rating clears it). A rated
    generation outlives the log's retention: it is feedback."""
    rating = (rating or "").strip().lower()
    if rating and rating not in Generation.Rating.values:
        raise FeedbackError("rating", f"{rating!r} is not one of {', '.join(Generation.Rating.values)}")
    generation.rating = rating
    generation.rating_note = (note or "").strip() if rating else ""
    generation.rated_by = user if rating else None
    generation.rated_at = timezone.now() if rating else None
    generation.save(update_fields=["rating", "rating_note", "rated_by", "rated_at"])
    return generation


def generation_correct(*, generation, text):
    """Store the curator's corrected text of ``generation`` ("" drops the correction)."""
    text = description_normalize(text or "")
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise FeedbackError("corrected_output", f"is longer than {MAX_DESCRIPTION_CHARS} characters")
    generation.corrected_output = text
    generation.save(update_fields=["corrected_output"])
    return generation


def generation_product(generation):
    """The product attributes ``generation`` was asked about; raises FeedbackError saying why
    a free prompt or a chat cannot become an example."""
    product = input_product(generation.input)
    if product is not None:
        return product
    asked = "a chat" if "messages" in (generation.input or {}) else "a free prompt"
    raise FeedbackError(
        "input",
        f"generation {generation.pk} was asked with {asked}, not product attributes; a training example is a "
        "product's attributes and its description (the prompt is built from the attributes), so only "
        "generations of a product can become examples",
    )


@transaction.atomic
def generation_example_add(*, generation, dataset):
    """Add ``generation`` to ``dataset`` as a training example: the attributes of the product
    it was asked about, its corrected text (its output when not corrected) as the description,
    source feedback, review draft; the generation then links to it. Raises FeedbackError naming
    the field, also for what the fine-tuning side refuses (a duplicate, an invalid attribute);
    nothing is written then."""
    generation = Generation.objects.select_for_update().get(pk=generation.pk)  # two curators, one click each
    if generation.example_id is not None:
        raise FeedbackError(
            "example",
            f"generation {generation.pk} is already training example {generation.example_id} "
            f"(in {generation.example.dataset.name})",
        )
    product = generation_product(generation)
    description = generation.corrected_output or generation.output
    if not description.strip():
        raise FeedbackError("output", f"generation {generation.pk} wrote no text: correct it first")
    answers = example_requested.send(sender=Generation, dataset=dataset, attributes=product, description=description)
    if len(answers) != 1:  # fine-tuning not installed, or two apps would each write one
        raise FeedbackError("dataset", f"{len(answers)} apps answer for training examples, not one")
    [(_, example)] = answers
    generation.example = example
    generation.save(update_fields=["example"])
    return example

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Dataset(models.Model):
    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    train_unreviewed = models.BooleanField(
        default=True,
        help_text="Train on examples still in draft too. Off: only approved examples train. "
        "Rejected examples never train.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class TrainingExample(models.Model):
    class Split(models.TextChoices):
        TRAIN = "train", "Train"
        VALIDATION = "validation", "Validation"
        UNASSIGNED = "unassigned", "Unassigned"

    class Source(models.TextChoices):
        MANUAL = "manual", "Manual"
        IMPORT = "import", "Import"
        FEEDBACK = "feedback", "Feedback"

    class Review(models.TextChoices):
        DRAFT = "draft", "Draft"
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="examples")
    attributes = models.JSONField(
        help_text="Product attributes: name, category, color, price, brand, audience, features, …"
    )
    description = models.TextField(help_text="The target product description.")
    # Copied from attributes so that curators can filter and search by it.
    name = models.CharField(max_length=500, blank=True, db_index=True)
    category = models.CharField(max_length=500, blank=True, db_index=True)
    split = models.CharField(max_length=16, choices=Split.choices, default=Split.UNASSIGNED, db_index=True)
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.MANUAL, db_index=True)
    review = models.CharField(
        max_length=16,
        choices=Review.choices,
        default=Review.DRAFT,
        db_index=True,
        help_text="Approved examples train; drafts train when the dataset says so; rejected ones never.",
    )
    content_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "content_hash"], name="example_unique_content_per_dataset"),
        ]

    def __str__(self):
        return self.name or f"example {self.pk}"


class DataSnapshot(models.Model):
    """A dataset's trainable examples frozen into a JSONL file in the model
    store when a job starts, each line with its resolved split. Jobs train from
    the file, never from the live rows, so a version can be retrained exactly."""

    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="snapshots")
    path = models.CharField(max_length=500, help_text="File under MODEL_STORE.")
    sha256 = models.CharField(max_length=64, unique=True)
    examples = models.PositiveIntegerField()
    train_examples = models.PositiveIntegerField()
    validation_examples = models.PositiveIntegerField()
    note = models.CharField(max_length=300, blank=True, help_text="How the validation split was made.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.dataset} @ {self.sha256[:12]}"


class LongRunningWork(models.Model):
    """What a fine-tuning job and an evaluation share as work a Celery worker runs: a guarded
    status, progress and time left, the worker's heartbeat, the task's sending and its limits.
    The code that moves these fields lives in services/workers.py."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
    ACTIVE = (Status.QUEUED, Status.RUNNING)

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    progress = models.FloatField(default=0.0, help_text="Share of the work done, 0 to 1.")
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    eta_seconds = models.FloatField(null=True, blank=True, help_text="Estimated seconds of work left.")
    error = models.TextField(blank=True)
    time_limit_seconds = models.PositiveIntegerField(default=0, help_text="Celery soft time limit for this task.")
    worker = models.CharField(max_length=200, blank=True, help_text="Host and process that claimed it.")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Sent again by the queued check when still queued long after this: the broker may have lost it.
    enqueued_at = models.DateTimeField(default=timezone.now, help_text="When its task was last sent to the broker.")
    requeue_count = models.PositiveIntegerField(default=0, help_text="Times the queued check sent its task again.")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True

    @property
    def wall_seconds(self):
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


class FineTuningJob(LongRunningWork):
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="jobs")
    snapshot = models.ForeignKey(DataSnapshot, null=True, blank=True, on_delete=models.PROTECT, related_name="jobs")
    base_model = models.CharField(max_length=200)
    hyperparameters = models.JSONField(default=dict)
    loss_history = models.JSONField(default=list, blank=True, help_text="[step, train loss] pairs.")
    validation_history = models.JSONField(default=list, blank=True, help_text="[step, validation loss] pairs.")
    metrics = models.JSONField(default=dict, blank=True)
    environment = models.JSONField(default=dict, blank=True, help_text="Device, precision, library versions.")

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # Two clicks, two API calls or two workers can never train one dataset twice at once.
            models.UniqueConstraint(
                fields=["dataset"],
                condition=Q(status__in=["queued", "running"]),
                name="job_one_active_per_dataset",
            ),
        ]

    def __str__(self):
        return f"job {self.pk} on {self.dataset}"


class ModelVersion(models.Model):
    class Kind(models.TextChoices):
        BASE = "base", "Base model"
        LORA = "lora", "LoRA adapter"
        FULL = "full", "Full fine-tune"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    base_model = models.CharField(max_length=200, help_text="Name of the base model it was made from.")
    artifact_path = models.CharField(max_length=500, help_text="Directory under MODEL_STORE.")
    sha256 = models.CharField(max_length=64, help_text="sha256 of the artifact's file manifest.")
    prompt_format_version = models.PositiveIntegerField()
    hyperparameters = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    job = models.OneToOneField(
        FineTuningJob, null=True, blank=True, on_delete=models.SET_NULL, related_name="model_version"
    )
    snapshot = models.ForeignKey(
        DataSnapshot, null=True, blank=True, on_delete=models.PROTECT, related_name="versions", help_text="Trained on."
    )
    is_active = models.BooleanField(default=False, editable=False)
    activated_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Released to clients: the active version, and any version approved (activating approves).
    # Others are served only to API keys with the models:unreleased scope.
    approved_at = models.DateTimeField(null=True, blank=True, editable=False)
    approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", editable=False
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["is_active"], condition=Q(is_active=True), name="modelversion_at_most_one_active"
            ),
        ]
        permissions = [("activate_modelversion", "Can activate a model version and roll back")]

    def __str__(self):
        return self.name

    @property
    def is_released(self):
        return self.is_active or self.approved_at is not None


class Activation(models.Model):
    """One change of the active version: who, when, from which to which, and why."""

    class Kind(models.TextChoices):
        INITIAL = "initial", "First version"
        MANUAL = "manual", "By hand"
        AUTO = "auto", "Promotion gate"
        ROLLBACK = "rollback", "Roll back"
        ROLL_FORWARD = "roll_forward", "Roll forward"

    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="activations")
    previous = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="deactivations"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    reason = models.TextField(blank=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    evaluation = models.ForeignKey("Evaluation", null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"{self.previous or '–'} -> {self.version}"


class FactTerm(models.Model):
    """A curator's addition to the fact vocabulary of the unsupported-claims metric: a word or
    phrase that states a product fact (finetuning/facts.py; the reviewed vocabulary shipped with
    the code is finetuning/fact_terms.json). Evaluations started after it is added use it, and so
    does the fact guard of generations (inference/fact_guard.py) from the moment it is saved."""

    class Kind(models.TextChoices):
        MATERIAL = "material"
        TECHNOLOGY = "technology"
        SPORT = "sport"
        FIT = "fit"
        CERTIFICATION = "certification"

    term = models.CharField(
        max_length=80, unique=True, help_text="As a description would say it, e.g. 'suede' or 'regular fit'."
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["term"]

    def __str__(self):
        return self.term

    def clean(self):
        from finetuning.facts import shipped_terms
        from finetuning.metrics import words

        self.term = " ".join(self.term.split()).lower()
        if not words(self.term):
            raise ValidationError({"term": "must contain a word (letters or digits)"})
        if self.term in shipped_terms():
            raise ValidationError({"term": f"{self.term!r} is already in the shipped vocabulary (fact_terms.json)"})


class Evaluation(LongRunningWork):
    """A version scored on its snapshot's validation examples next to the active
    version and the base model, same examples, same decoding."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="evaluations")
    snapshot = models.ForeignKey(DataSnapshot, null=True, blank=True, on_delete=models.PROTECT)
    example_ids = models.JSONField(default=list, help_text="The examples scored, in order.")
    samples = models.JSONField(default=list, help_text="[{id, attributes, reference}] in example order.")
    decoding = models.JSONField(default=dict, help_text="Generation settings, the same for every version.")
    automatic = models.BooleanField(
        default=False, help_text="Started by a finished job (the promotion gate) rather than by a curator."
    )
    promotion = models.JSONField(default=dict, blank=True, help_text="The promotion gate's decision.")
    fact_terms = models.JSONField(
        null=True, blank=True, help_text="The fact vocabulary its unsupported-claims metric used (none: not measured)."
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["version"],
                condition=Q(status__in=["queued", "running"]),
                name="evaluation_one_active_per_version",
            ),
        ]

    def __str__(self):
        return f"evaluation {self.pk} of {self.version}"

    def score(self, role):
        return next((s for s in self.scores.all() if s.role == role), None)


class EvaluationScore(models.Model):
    """One version's metrics and outputs in an evaluation."""

    class Role(models.TextChoices):
        CANDIDATE = "candidate", "This version"
        ACTIVE = "active", "Active version"
        BASE = "base", "Base model"

    evaluation = models.ForeignKey(Evaluation, on_delete=models.CASCADE, related_name="scores")
    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="scores")
    role = models.CharField(max_length=16, choices=Role.choices)
    metrics = models.JSONField(default=dict)
    outputs = models.JSONField(default=list, help_text="[{text, finish_reason}] in example order.")

    class Meta:
        ordering = ["evaluation", "role"]
        constraints = [models.UniqueConstraint(fields=["evaluation", "role"], name="evaluationscore_one_per_role")]

    def __str__(self):
        return f"{self.version} as {self.role} in {self.evaluation}"

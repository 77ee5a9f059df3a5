from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models


class ApiKey(models.Model):
    """A client program's credential. The key itself is shown once, when it is
    made; the database keeps its sha256 and a prefix that identifies it."""

    class Scope(models.TextChoices):
        GENERATE = "generate", "generate: write text"
        MODELS_READ = "models:read", "models:read: list the versions it may use"
        MODELS_UNRELEASED = "models:unreleased", "models:unreleased: also versions neither active nor approved"
        JOBS_READ = "jobs:read", "jobs:read: watch fine-tuning jobs"
        JOBS_WRITE = "jobs:write", "jobs:write: start and cancel jobs"

    DEFAULT_SCOPES = [Scope.GENERATE, Scope.MODELS_READ]

    name = models.CharField(max_length=100, help_text="What uses it, e.g. 'shop CMS plugin'.")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="api_keys",
        help_text="Job scopes act with this user's permissions; an inactive owner disables the key.",
    )
    prefix = models.CharField(max_length=16, unique=True, editable=False, help_text="The key's visible start.")
    key_hash = models.CharField(max_length=64, editable=False)
    scopes = models.JSONField(default=list)
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)], help_text="Blank: API_KEY_REQUESTS_PER_MINUTE."
    )
    tokens_per_minute = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Generated tokens. Blank: API_KEY_TOKENS_PER_MINUTE.",
    )
    daily_token_quota = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Generated tokens per UTC day. Blank: API_KEY_DAILY_TOKEN_QUOTA (0 there: no quota).",
    )
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Blank: never.")
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", editable=False
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API key"

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"

    def limit(self, name):
        """This key's limit ``name`` (requests_per_minute, tokens_per_minute,
        daily_token_quota); None when there is none."""
        own = getattr(self, name)
        value = own if own is not None else getattr(settings, f"API_KEY_{name.upper()}")
        return value or None


class ApiKeyUsage(models.Model):
    """What one key did in one UTC day."""

    key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="usage")
    day = models.DateField()
    requests = models.PositiveBigIntegerField(default=0)
    errors = models.PositiveBigIntegerField(default=0, help_text="Answers with a 4xx or 5xx status, or a stream error.")
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-day", "key"]
        verbose_name = "API usage"
        verbose_name_plural = "API usage"
        constraints = [models.UniqueConstraint(fields=["key", "day"], name="apikeyusage_one_row_per_key_and_day")]

    def __str__(self):
        return f"{self.key} on {self.day}"


class Generation(models.Model):
    """One generation as its caller met it: who asked, through which route, with what
    input and parameters, which version answered, what it wrote and how long it took.
    Kept GENERATION_LOG_RETENTION_DAYS days (0: not recorded). Curators rate outputs,
    correct them and turn them into training examples (``example``)."""

    class Route(models.TextChoices):
        API = "api", "POST /api/generate"
        COMPLETIONS = "completions", "POST /v1/completions"
        CHAT = "chat", "POST /v1/chat/completions"
        PLAYGROUND = "playground", "Admin playground"

    class Rating(models.TextChoices):
        GOOD = "good", "Good"
        BAD = "bad", "Bad"

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    route = models.CharField(max_length=16, choices=Route.choices, db_index=True)
    version = models.ForeignKey(
        "finetuning.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="generations"
    )
    # Kept as written: the version may be deleted later, the record should still say which it was.
    version_name = models.CharField(max_length=100, blank=True)
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="generations")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    input = models.JSONField(
        default=dict, help_text="What the caller sent: product attributes, a prompt or chat messages."
    )
    prompt = models.TextField(blank=True, help_text="The exact prompt the model saw.")
    output = models.TextField(blank=True)
    parameters = models.JSONField(default=dict, blank=True, help_text="Decoding settings as applied.")
    finish_reason = models.CharField(max_length=32, blank=True)
    error = models.TextField(blank=True, help_text="Why it ended without an answer, when it did.")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    timings = models.JSONField(default=dict, blank=True, help_text="load_ms, queue_ms, first_token_ms, total_ms.")
    total_ms = models.FloatField(null=True, blank=True, help_text="From request to last token.")
    rating = models.CharField(max_length=8, choices=Rating.choices, blank=True, db_index=True)
    rating_note = models.TextField(blank=True)
    rated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    rated_at = models.DateTimeField(null=True, blank=True)
    corrected_output = models.TextField(blank=True, help_text="The curator's corrected text.")
    example = models.ForeignKey(
        "finetuning.TrainingExample",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="generations",
        help_text="The training example made from this output.",
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["version", "-created_at"], name="generation_version_recent")]

    def __str__(self):
        return f"generation {self.pk} by {self.version_name or '?'}"

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

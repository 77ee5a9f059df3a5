import dataclasses
import math
import re

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from finetuning.attributes import MAX_VALUE_CHARS, PRICE_PATTERN, AttributeValueError, attributes_normalize, price_parse
from inference.engine.params import GenerationParams, param_default
from inference.fields import (
    StrictBooleanField,
    StrictCharField,
    StrictFloatField,
    StrictIntegerField,
    StrictSerializer,
)

MAX_ATTRIBUTES = 30
MIN_SAMPLING_TEMPERATURE = 0.01
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
# Attribute names as they are stored (the importer turns "Heel height" into this; the API takes it as is).
ATTRIBUTE_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


STOP_SCHEMA = {
    "oneOf": [
        {"type": "string", "maxLength": MAX_STOP_CHARS},
        {
            "type": "array",
            "items": {"type": "string", "maxLength": MAX_STOP_CHARS},
            "maxItems": MAX_STOP_SEQUENCES,
        },
    ],
    "description": f"A string or up to {MAX_STOP_SEQUENCES} strings: the text ends before the first one to appear, "
    "which is left out (as in OpenAI's API).",
}


@extend_schema_field(STOP_SCHEMA)
class StopField(serializers.ListField):
    """A string or a list of up to four (as in OpenAI's API)."""

    def __init__(self, **kwargs):
        super().__init__(
            child=StrictCharField(max_length=MAX_STOP_CHARS, allow_blank=True),
            max_length=MAX_STOP_SEQUENCES,
            **kwargs,
        )

    def to_internal_value(self, data):
        return super().to_internal_value([data] if isinstance(data, str) else data)


@extend_schema_field(
    {
        "oneOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": PRICE_PATTERN}],
        "description": 'A number, or a price as text ("$1,299.00"); rounded to cents.',
    }
)
class PriceField(serializers.Field):
    default_error_messages = {"invalid": "Must be a non-negative number, or a price such as '$1,299.00'."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float | str):
            self.fail("invalid")
        try:
            return price_parse(data)
        except ValueError:
            self.fail("invalid")

    def to_representation(self, value):
        return value


def _text_list(**kwargs):
    return serializers.ListField(
        child=StrictCharField(max_length=MAX_VALUE_CHARS), max_length=20, required=False, **kwargs
    )


EXTRA_VALUE = {
    "oneOf": [
        {"type": "string", "maxLength": MAX_VALUE_CHARS},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
    ]
}


class ProductSerializer(StrictSerializer):
    """Product attributes. Other attributes (material, heel_height, …: lower-case letters,
    digits and '_') are kept and shown to the model."""

    schema_extra = {
        "additionalProperties": EXTRA_VALUE,
        "propertyNames": {"pattern": f"^{ATTRIBUTE_NAME.pattern}$"},
        "maxProperties": MAX_ATTRIBUTES,
    }

    name = StrictCharField(max_length=MAX_VALUE_CHARS)
    category = StrictCharField(max_length=MAX_VALUE_CHARS, required=False)
    color = StrictCharField(max_length=MAX_VALUE_CHARS, required=False)
    brand = StrictCharField(max_length=MAX_VALUE_CHARS, required=False)
    audience = StrictCharField(max_length=MAX_VALUE_CHARS, required=False, help_text="Who it is for, e.g. Women, Kids.")
    price = PriceField(required=False)
    currency = StrictCharField(max_length=10, required=False)
    features = _text_list()
    keywords = _text_list()

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            return super().to_internal_value(data)  # DRF's "expected a dictionary"
        extra, errors = {}, {}
        for key, value in data.items():
            if key in self.fields:
                continue
            if not ATTRIBUTE_NAME.fullmatch(key):
                errors[key] = ["attribute names are lower-case letters, digits and '_', at most 40, from a letter"]
            elif not (
                value is None
                or isinstance(value, str | bool)
                or (isinstance(value, int | float) and math.isfinite(value))
            ):
                errors[key] = ["must be a text, a number, true, false or null"]
            elif isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
                errors[key] = [f"must be at most {MAX_VALUE_CHARS} characters"]
            else:
                extra[key] = value
        if len(data) > MAX_ATTRIBUTES:
            errors["non_field_errors"] = [f"at most {MAX_ATTRIBUTES} attributes"]
        known = {key: value for key, value in data.items() if key in self.fields}
        try:
            attrs = serializers.Serializer.to_internal_value(self, known)
        except serializers.ValidationError as exc:
            raise serializers.ValidationError({**exc.detail, **errors}) from exc
        if errors:
            raise serializers.ValidationError(errors)
        try:
            return attributes_normalize({**extra, **attrs})
        except AttributeValueError as exc:
            raise serializers.ValidationError({exc.key: [exc.message]}) from exc


def _sampling_schema(*, max_sequences_field):
    """More than one sequence needs sampling: a temperature of at least 0.01."""
    return {
        "if": {"required": [max_sequences_field], "properties": {max_sequences_field: {"minimum": 2}}},
        "then": {
            "required": ["temperature"],
            "properties": {"temperature": {"minimum": MIN_SAMPLING_TEMPERATURE}},
        },
    }


def temperature_validate(value):
    # Dividing logits by a vanishing temperature overflows; greedy decoding is its limit.
    return 0.0 if value < MIN_SAMPLING_TEMPERATURE else value


_PARAM_FIELDS = frozenset(field.name for field in dataclasses.fields(GenerationParams))


def generation_params(values):
    """The GenerationParams of a request's validated values, named as GenerateRequestSerializer
    names them (the OpenAI-compatible serializer translates its names first): the one way from a
    serializer to the engine. A parameter the values leave out takes the type's default."""
    return GenerationParams(**{name: value for name, value in values.items() if name in _PARAM_FIELDS})


class GenerateRequestSerializer(StrictSerializer):
    hints = {"max_tokens": "max_new_tokens", "n": "num_return_sequences", "model": "model_version"}
    schema_extra = {
        "oneOf": [
            {"required": ["product"], "not": {"required": ["prompt"]}},
            {"required": ["prompt"], "not": {"required": ["product"]}},
        ],
        **_sampling_schema(max_sequences_field="num_return_sequences"),
    }

    product = ProductSerializer(required=False, help_text="The product's attributes. Give this or `prompt`.")
    prompt = StrictCharField(
        required=False,
        max_length=settings.GENERATE_MAX_PROMPT_CHARS,
        help_text="A free instruction instead of a product. Give this or `product`.",
    )
    max_new_tokens = StrictIntegerField(
        min_value=1, max_value=settings.GENERATE_MAX_NEW_TOKENS, default=param_default("max_new_tokens")
    )
    temperature = StrictFloatField(
        min_value=0.0,
        max_value=2.0,
        default=param_default("temperature"),
        help_text=f"0 means greedy decoding (as does anything below {MIN_SAMPLING_TEMPERATURE}).",
    )
    top_p = StrictFloatField(min_value=0.01, max_value=1.0, default=param_default("top_p"))
    top_k = StrictIntegerField(
        min_value=0, max_value=1000, default=param_default("top_k"), help_text="0 turns top-k filtering off."
    )
    repetition_penalty = StrictFloatField(min_value=1.0, max_value=2.0, default=param_default("repetition_penalty"))
    no_repeat_ngram_size = StrictIntegerField(
        min_value=0,
        max_value=64,
        default=param_default("no_repeat_ngram_size"),
        help_text="No sequence of this many tokens twice in one text (the prompt's own may be written again), so "
        "that the text does not loop on a phrase; 1 forbids any token twice; 0 turns the rule off.",
    )
    min_new_tokens = StrictIntegerField(
        min_value=0,
        max_value=settings.GENERATE_MAX_NEW_TOKENS,
        default=param_default("min_new_tokens"),
        help_text="No end of text before this many new tokens (a stop sequence still ends it; above "
        "max_new_tokens, the text runs to that limit); 0 turns it off. Longer text is not better text: what a small model adds to reach the "
        "length may state what the product does not.",
    )
    seed = StrictIntegerField(min_value=0, max_value=2**31 - 1, allow_null=True, default=param_default("seed"))
    num_return_sequences = StrictIntegerField(
        min_value=1,
        max_value=settings.GENERATE_MAX_RETURN_SEQUENCES,
        default=param_default("num_return_sequences"),
        help_text=f"More than one needs a temperature of at least {MIN_SAMPLING_TEMPERATURE}.",
    )
    model_version = StrictCharField(
        required=False,
        max_length=100,
        help_text="Name or id of a model version; the active one when left out. Versions that are neither active "
        "nor approved need an API key with the models:unreleased scope.",
    )
    stop = StopField(required=False, default=list)
    fact_guard = StrictBooleanField(
        default=param_default("fact_guard"),
        help_text="No product fact (material, technology, sport, fit, certification of the fact vocabulary) that "
        "the product or prompt does not state: the model writes another word instead. Set false for the model's "
        "text as it is.",
    )
    stream = StrictBooleanField(
        default=False,
        help_text="Answer with server-sent events (text/event-stream): a `chunk` event per piece of text as it is "
        "produced, then a `done` event with the whole answer, usage and finish reasons.",
    )

    def validate_temperature(self, value):
        return temperature_validate(value)

    def validate(self, attrs):
        if ("product" in attrs) == ("prompt" in attrs):
            raise serializers.ValidationError({"product": ["give either product or prompt (exactly one of them)"]})
        if attrs["num_return_sequences"] > 1 and attrs["temperature"] == 0:
            raise serializers.ValidationError(
                {"num_return_sequences": ["more than one sequence needs sampling: set temperature to 0.01 or more"]}
            )
        attrs["params"] = generation_params(attrs)
        return attrs


class ModelVersionRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()


class ChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    text = serializers.CharField(allow_blank=True)
    finish_reason = serializers.ChoiceField(
        choices=["stop", "length"], help_text="stop: the answer ended or met a stop sequence; length: max_new_tokens."
    )


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class TimingsSerializer(serializers.Serializer):
    load_ms = serializers.FloatField()
    first_token_ms = serializers.FloatField(allow_null=True, help_text="From the request to its first token.")
    generate_ms = serializers.FloatField()
    total_ms = serializers.FloatField()
    tokens_per_second = serializers.FloatField(allow_null=True)


class GenerateResponseSerializer(serializers.Serializer):
    model_version = ModelVersionRefSerializer()
    choices = ChoiceSerializer(many=True)
    usage = UsageSerializer()
    seed = serializers.IntegerField(allow_null=True, help_text="The seed used when sampling; null for greedy.")
    timings = TimingsSerializer()


class ModelVersionSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    kind = serializers.CharField()
    base_model = serializers.CharField()
    is_active = serializers.BooleanField()
    is_released = serializers.BooleanField(help_text="Active, or approved for clients.")
    activated_at = serializers.DateTimeField(allow_null=True)
    approved_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()
    sha256 = serializers.CharField()
    prompt_format_version = serializers.IntegerField()
    hyperparameters = serializers.DictField()
    metrics = serializers.DictField()


class ModelListSerializer(serializers.Serializer):
    active = ModelVersionRefSerializer(allow_null=True)
    versions = ModelVersionSerializer(many=True)


class ReadyChecksSerializer(serializers.Serializer):
    """Each check's result: "ok" or "ok: detail" when it passes, else what is wrong."""

    database = serializers.CharField(help_text="Required. A connection to the database.")
    model = serializers.CharField(
        required=False,
        help_text='Required. The active version is in this process\'s memory ("loading NAME" while it loads). '
        "Absent while the database cannot be read.",
    )
    broker = serializers.CharField(
        required=False,
        help_text="Reported only. The task broker accepts a connection within about 1 s. Absent from the serving "
        "image, which has none.",
    )
    training_worker = serializers.CharField(
        required=False,
        help_text="Reported only. A worker of the training queue stamped its heartbeat recently. Absent from the "
        "serving image.",
    )
    evaluation_worker = serializers.CharField(
        required=False,
        help_text="Reported only. A worker of the evaluation queue stamped its heartbeat recently. Absent from the "
        "serving image.",
    )
    model_store = serializers.CharField(
        help_text="Reported only. MODEL_STORE can be listed and written to (in the serving image: listed)."
    )


class ReadySerializer(serializers.Serializer):
    ready = serializers.BooleanField(
        help_text="Whether this process can answer generations: every required check passes (HTTP 200); "
        "otherwise false with HTTP 503. Reported-only checks never change it."
    )
    checks = ReadyChecksSerializer()
    warnings = serializers.ListField(
        child=serializers.CharField(),
        help_text='The reported-only checks that fail, as "check: what is wrong". Fine-tuning and evaluations '
        "need them; serving the loaded versions does not, so they never take this process out of a load balancer.",
    )


class UsageLimitSerializer(serializers.Serializer):
    limit = serializers.IntegerField(allow_null=True, help_text="null: no limit.")
    used = serializers.IntegerField(allow_null=True, help_text="null: unknown (the cache cannot be reached).")


class UsageLimitsSerializer(serializers.Serializer):
    requests_per_minute = UsageLimitSerializer()
    tokens_per_minute = UsageLimitSerializer(help_text="Generated tokens in the last minute.")
    daily_token_quota = UsageLimitSerializer(help_text="Generated tokens today (UTC).")


class UsageDaySerializer(serializers.Serializer):
    day = serializers.DateField()
    requests = serializers.IntegerField()
    errors = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()


class UsageKeySerializer(serializers.Serializer):
    name = serializers.CharField()
    prefix = serializers.CharField()
    scopes = serializers.ListField(child=serializers.CharField())
    expires_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()


class UsageResponseSerializer(serializers.Serializer):
    key = UsageKeySerializer()
    limits = UsageLimitsSerializer()
    days = UsageDaySerializer(many=True, help_text="One row per UTC day with any request, newest first.")


class QueryIntegerField(serializers.IntegerField):
    """An integer in a query string: digits only (DRF's own also takes "3.0")."""

    def to_internal_value(self, data):
        if not isinstance(data, str) or not re.fullmatch(r"-?[0-9]+", data):
            self.fail("invalid")
        return super().to_internal_value(data)


class UsageQuerySerializer(serializers.Serializer):
    days = QueryIntegerField(min_value=1, max_value=366, default=30, help_text="How many days back, today included.")

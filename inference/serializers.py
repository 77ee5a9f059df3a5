import math

from django.conf import settings
from rest_framework import serializers

from finetuning.attributes import MAX_VALUE_CHARS, AttributeValueError, attributes_normalize
from finetuning.selectors import version_get

MAX_EXTRA_ATTRIBUTES = 20
MIN_SAMPLING_TEMPERATURE = 0.01
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64


class FiniteFloatField(serializers.FloatField):
    """JSON parsers accept NaN and Infinity; a sampling parameter must not."""

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if not math.isfinite(value):
            self.fail("invalid")
        return value


class StopField(serializers.ListField):
    """A string or a list of up to four (as in OpenAI's API)."""

    def __init__(self, **kwargs):
        super().__init__(
            child=serializers.CharField(max_length=MAX_STOP_CHARS, trim_whitespace=False),
            max_length=MAX_STOP_SEQUENCES,
            **kwargs,
        )

    def to_internal_value(self, data):
        return super().to_internal_value([data] if isinstance(data, str) else data)


class ProductSerializer(serializers.Serializer):
    """Product attributes. Other keys (material, size, …) are kept and shown to the model."""

    name = serializers.CharField(max_length=MAX_VALUE_CHARS)
    category = serializers.CharField(max_length=MAX_VALUE_CHARS, required=False)
    color = serializers.CharField(max_length=MAX_VALUE_CHARS, required=False)
    brand = serializers.CharField(max_length=MAX_VALUE_CHARS, required=False)
    audience = serializers.CharField(
        max_length=MAX_VALUE_CHARS, required=False, help_text="Who it is for, e.g. Women, Kids."
    )
    price = serializers.DecimalField(max_digits=12, decimal_places=2, min_value=0, required=False)
    currency = serializers.CharField(max_length=10, required=False)
    features = serializers.ListField(
        child=serializers.CharField(max_length=MAX_VALUE_CHARS), max_length=20, required=False
    )
    keywords = serializers.ListField(
        child=serializers.CharField(max_length=MAX_VALUE_CHARS), max_length=20, required=False
    )

    def to_internal_value(self, data):
        attrs = super().to_internal_value(data)  # rejects anything but an object
        extra = {key: value for key, value in data.items() if key not in self.fields}
        if len(extra) > MAX_EXTRA_ATTRIBUTES:
            raise serializers.ValidationError(f"at most {MAX_EXTRA_ATTRIBUTES} extra attributes")
        try:
            return attributes_normalize({**extra, **attrs})
        except AttributeValueError as exc:
            raise serializers.ValidationError({exc.key: [exc.message]}) from exc


class GenerateRequestSerializer(serializers.Serializer):
    product = ProductSerializer(required=False, help_text="The product's attributes. Give this or `prompt`.")
    prompt = serializers.CharField(
        required=False,
        max_length=settings.GENERATE_MAX_PROMPT_CHARS,
        trim_whitespace=True,
        help_text="A free instruction instead of a product. Give this or `product`.",
    )
    max_new_tokens = serializers.IntegerField(
        min_value=1, max_value=settings.GENERATE_MAX_NEW_TOKENS, default=settings.GENERATE_DEFAULT_MAX_NEW_TOKENS
    )
    temperature = FiniteFloatField(
        min_value=0.0, max_value=2.0, default=0.0, help_text="0 means greedy decoding; otherwise at least 0.01."
    )
    top_p = FiniteFloatField(min_value=0.01, max_value=1.0, default=1.0)
    top_k = serializers.IntegerField(min_value=0, max_value=1000, default=0, help_text="0 turns top-k filtering off.")
    repetition_penalty = FiniteFloatField(min_value=1.0, max_value=2.0, default=1.0)
    seed = serializers.IntegerField(min_value=0, max_value=2**31 - 1, allow_null=True, default=None)
    num_return_sequences = serializers.IntegerField(
        min_value=1, max_value=settings.GENERATE_MAX_RETURN_SEQUENCES, default=1
    )
    model_version = serializers.CharField(
        required=False, max_length=100, help_text="Name or id of a model version; the active one when left out."
    )
    stop = StopField(
        required=False,
        default=list,
        help_text=f"Up to {MAX_STOP_SEQUENCES} stop sequences: the text ends before the first one, which is left out.",
    )
    stream = serializers.BooleanField(
        default=False,
        help_text="Answer with server-sent events (text/event-stream): a `chunk` event per piece of text as it is "
        "produced, then a `done` event with the whole answer, usage and finish reasons.",
    )

    def validate_temperature(self, value):
        # Dividing logits by a vanishing temperature overflows to inf/NaN.
        if 0 < value < MIN_SAMPLING_TEMPERATURE:
            raise serializers.ValidationError(
                f"use 0 for greedy decoding, or at least {MIN_SAMPLING_TEMPERATURE} to sample"
            )
        return value

    def validate_model_version(self, value):
        version = version_get(reference=value)
        if version is None:
            raise serializers.ValidationError(f"no model version named {value!r}")
        return version

    def validate(self, attrs):
        has_product, has_prompt = "product" in attrs, bool(attrs.get("prompt"))
        if has_product == has_prompt:
            raise serializers.ValidationError({"product": ["give either product or prompt (exactly one of them)"]})
        if attrs["num_return_sequences"] > 1 and attrs["temperature"] == 0:
            raise serializers.ValidationError(
                {"num_return_sequences": ["more than one sequence needs sampling: set temperature above 0"]}
            )
        return attrs


class ModelVersionRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()


class ChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    text = serializers.CharField()
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
    activated_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()
    sha256 = serializers.CharField()
    prompt_format_version = serializers.IntegerField()
    hyperparameters = serializers.DictField()
    metrics = serializers.DictField()


class ModelListSerializer(serializers.Serializer):
    active = ModelVersionRefSerializer(allow_null=True)
    versions = ModelVersionSerializer(many=True)


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


class StreamChunkSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    text = serializers.CharField()


class ReadySerializer(serializers.Serializer):
    ready = serializers.BooleanField()
    checks = serializers.DictField(child=serializers.CharField())

"""Requests and answers of the OpenAI-compatible routes, as OpenAI defines them.

Defaults are OpenAI's (temperature 1, top_p 1, n 1), not the native API's
greedy decoding: an OpenAI tool that never sends a temperature expects varied
answers. A field OpenAI has and genapi does not support is refused with a 400
naming it when its value would change the answer; a value that changes nothing
(``logprobs: false``, ``presence_penalty: 0``, ``user``) is accepted.
"""

import json

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from inference.engine.params import param_default
from inference.fields import (
    NOT_BLANK_PATTERN,
    StrictBooleanField,
    StrictCharField,
    StrictFloatField,
    StrictIntegerField,
    StrictSerializer,
)
from inference.serializers import (
    MIN_SAMPLING_TEMPERATURE,
    STOP_SCHEMA,
    ProductSerializer,
    StopField,
    UsageSerializer,
    generation_params,
    temperature_validate,
)

MAX_PROMPTS = 16
MIN_TOP_P = 0.01


def _same_json(a, b):
    """JSON equality: true is not 1, 0 is 0.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


class UnsupportedField(serializers.Field):
    """An OpenAI field genapi does not support: only the values that change nothing pass."""

    def __init__(self, *, harmless, why, **kwargs):
        self.harmless = harmless
        self.why = why
        kwargs.setdefault("required", False)
        super().__init__(**kwargs)  # null passes when harmless (validate_empty_values); the schema's enum says so
        self.help_text = f"Not supported ({why}); accepted only as " + ", ".join(json.dumps(v) for v in harmless) + "."

    def validate_empty_values(self, data):
        if data is None and None in self.harmless:
            return True, None
        return super().validate_empty_values(data)

    def to_internal_value(self, data):
        if not any(_same_json(data, value) for value in self.harmless):
            raise serializers.ValidationError(f"not supported by genapi ({self.why})", code="unsupported_parameter")
        return data

    def to_representation(self, value):
        return value


class MetadataField(serializers.DictField):
    """Stored nowhere, changes nothing; accepted as OpenAI accepts it."""

    def __init__(self, **kwargs):
        super().__init__(child=StrictCharField(max_length=512, allow_blank=True), **kwargs)


@extend_schema_field({"oneOf": [*STOP_SCHEMA["oneOf"], {"type": "null"}], "description": STOP_SCHEMA["description"]})
class NullableStopField(StopField):
    def validate_empty_values(self, data):
        if data is None:
            return True, None
        return super().validate_empty_values(data)


class StreamOptionsSerializer(StrictSerializer):
    include_usage = StrictBooleanField(
        required=False, allow_null=True, help_text="Send the usage in a last chunk (with no choices)."
    )
    include_obfuscation = StrictBooleanField(required=False, allow_null=True, help_text="Accepted; changes nothing.")


class OpenAIRequestSerializer(StrictSerializer):
    """What /v1/completions and /v1/chat/completions share."""

    model = StrictCharField(
        max_length=100,
        help_text="A model version's name (GET /v1/models), or `active` for the version active now.",
    )
    max_tokens = StrictIntegerField(
        min_value=1,
        max_value=settings.GENERATE_MAX_NEW_TOKENS,
        required=False,
        allow_null=True,
        help_text=f"New tokens at most; {param_default('max_new_tokens')} when left out.",
    )
    temperature = StrictFloatField(
        min_value=0.0,
        max_value=2.0,
        required=False,
        allow_null=True,
        help_text=f"Default 1 (OpenAI's). 0, or anything below {MIN_SAMPLING_TEMPERATURE}, decodes greedily.",
    )
    top_p = StrictFloatField(
        min_value=0.0, max_value=1.0, required=False, allow_null=True, help_text=f"Default 1; at least {MIN_TOP_P}."
    )
    n = StrictIntegerField(
        min_value=1,
        max_value=settings.GENERATE_MAX_RETURN_SEQUENCES,
        required=False,
        allow_null=True,
        help_text="Choices per prompt; more than one needs a temperature of at least 0.01.",
    )
    stop = NullableStopField(required=False)
    seed = StrictIntegerField(
        min_value=0,
        max_value=2**31 - 1,
        required=False,
        allow_null=True,
        help_text="The same request with the same seed gives the same text.",
    )
    stream = StrictBooleanField(required=False, allow_null=True)
    stream_options = StreamOptionsSerializer(required=False, allow_null=True)
    user = StrictCharField(max_length=256, required=False, allow_blank=True, help_text="Accepted; changes nothing.")
    # genapi's extensions (the official client sends them with extra_body={...}).
    product = ProductSerializer(
        required=False,
        help_text="genapi extension: product attributes, written up in the format the model was fine-tuned on "
        "(send it with extra_body={'product': {...}} from the official client).",
    )
    top_k = StrictIntegerField(
        min_value=0, max_value=1000, required=False, allow_null=True, help_text="genapi extension; 0 turns it off."
    )
    repetition_penalty = StrictFloatField(
        min_value=1.0, max_value=2.0, required=False, allow_null=True, help_text="genapi extension; 1 turns it off."
    )
    no_repeat_ngram_size = StrictIntegerField(
        min_value=0,
        max_value=64,
        required=False,
        allow_null=True,
        help_text=f"genapi extension: no sequence of this many tokens twice in one text; 0 turns it off (default "
        f"{param_default('no_repeat_ngram_size')}; see POST /api/generate).",
    )
    min_tokens = StrictIntegerField(
        min_value=0,
        max_value=settings.GENERATE_MAX_NEW_TOKENS,
        required=False,
        allow_null=True,
        help_text=f"genapi extension (vLLM's name): no end of text before this many new tokens (above max_tokens, the "
        f"text runs to that limit); 0 turns it off (default {param_default('min_new_tokens')}; see min_new_tokens in POST /api/generate).",
    )
    fact_guard = StrictBooleanField(
        required=False,
        allow_null=True,
        help_text=f"genapi extension: no product fact that the prompt does not state (default "
        f"{str(param_default('fact_guard')).lower()}; see POST /api/generate).",
    )
    # OpenAI's fields that genapi does not support.
    frequency_penalty = UnsupportedField(harmless=(None, 0), why="use repetition_penalty")
    presence_penalty = UnsupportedField(harmless=(None, 0), why="use repetition_penalty")
    logit_bias = UnsupportedField(harmless=(None, {}), why="no logit bias")
    service_tier = StrictCharField(max_length=32, required=False, allow_null=True, help_text="Accepted; ignored.")
    store = StrictBooleanField(required=False, allow_null=True, help_text="Accepted; nothing is stored.")
    metadata = MetadataField(required=False, allow_null=True, help_text="Accepted; nothing is stored.")

    def validate_temperature(self, value):
        return value if value is None else temperature_validate(value)

    def sampling(self, attrs):
        """The generation parameters in the native API's names, OpenAI's defaults filled in where
        they differ from genapi's (temperature 1); the rest, max_new_tokens included, left out
        for GenerationParams' defaults (null is left out too, as OpenAI reads it)."""
        max_tokens = attrs.get("max_tokens") or attrs.get("max_completion_tokens")
        temperature = attrs.get("temperature")
        native = {
            "max_new_tokens": max_tokens,
            "temperature": 1.0 if temperature is None else temperature,
            "top_p": None if attrs.get("top_p") is None else max(MIN_TOP_P, attrs["top_p"]),
            "top_k": attrs.get("top_k") or None,
            "repetition_penalty": attrs.get("repetition_penalty"),
            "no_repeat_ngram_size": attrs.get("no_repeat_ngram_size"),
            "min_new_tokens": attrs.get("min_tokens"),
            "seed": attrs.get("seed"),
            "num_return_sequences": attrs.get("n"),
            "stop": attrs.get("stop"),
            "fact_guard": attrs.get("fact_guard"),
        }
        return {name: value for name, value in native.items() if value is not None}

    def validate(self, attrs):
        params = generation_params(self.sampling(attrs))
        if params.num_return_sequences > 1 and params.temperature == 0:
            raise serializers.ValidationError(
                {"n": [f"more than one choice needs sampling: set temperature to {MIN_SAMPLING_TEMPERATURE} or more"]}
            )
        attrs["params"] = params
        return attrs


def _sampling_rule():
    """n > 1 needs a temperature of at least 0.01 (1 when left out or null)."""
    return {
        "if": {"required": ["n"], "properties": {"n": {"minimum": 2}}},
        "then": {
            "properties": {
                "temperature": {"anyOf": [{"type": "null"}, {"type": "number", "minimum": MIN_SAMPLING_TEMPERATURE}]}
            }
        },
    }


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "maxLength": settings.GENERATE_MAX_PROMPT_CHARS},
            {
                "type": "array",
                "items": {"type": "string", "maxLength": settings.GENERATE_MAX_PROMPT_CHARS},
                "minItems": 1,
                "maxItems": MAX_PROMPTS,
            },
        ],
        "description": "An instruction, or up to 16 (each gets `n` choices). Token arrays are not supported. "
        "Leave it out, null or empty when `product` is given.",
    }
)
class PromptField(serializers.Field):
    default_error_messages = {"invalid": "Must be a string or a list of strings (token arrays are not supported)."}

    def __init__(self, **kwargs):
        kwargs.setdefault("required", False)
        kwargs.setdefault("allow_null", True)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        items = [data] if isinstance(data, str) else data
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            self.fail("invalid")
        if isinstance(data, list) and not 1 <= len(data) <= MAX_PROMPTS:
            raise serializers.ValidationError(f"give 1 to {MAX_PROMPTS} prompts")
        limit = settings.GENERATE_MAX_PROMPT_CHARS
        if any(len(item) > limit for item in items):
            raise serializers.ValidationError(f"each prompt is at most {limit} characters")
        return items

    def to_representation(self, value):
        return value


def _not_blank_text():
    return {"type": "string", "pattern": NOT_BLANK_PATTERN}


class CompletionRequestSerializer(OpenAIRequestSerializer):
    schema_extra = {
        "oneOf": [
            {"required": ["product"], "properties": {"prompt": {"anyOf": [{"type": "null"}, {"const": ""}]}}},
            {
                "not": {"required": ["product"]},
                "required": ["prompt"],
                "properties": {"prompt": {"anyOf": [_not_blank_text(), {"type": "array", "items": _not_blank_text()}]}},
            },
        ],
        **_sampling_rule(),
    }

    prompt = PromptField()
    logprobs = UnsupportedField(harmless=(None,), why="no log probabilities")
    echo = UnsupportedField(harmless=(None, False), why="the prompt is not repeated")
    best_of = UnsupportedField(harmless=(None, 1), why="use n")
    suffix = UnsupportedField(harmless=(None, ""), why="no insertion")

    def validate(self, attrs):
        attrs = super().validate(attrs)
        prompts = attrs.get("prompt") or []
        if "product" in attrs:
            if attrs.get("prompt") not in (None, [""]) or isinstance(self.initial_data.get("prompt"), list):
                raise serializers.ValidationError({"prompt": ["give either a prompt or a product, not both"]})
            attrs["inputs"] = [{"product": attrs["product"]}]
            return attrs
        if not prompts:
            raise serializers.ValidationError({"prompt": ["give a prompt (or a product in the product field)"]})
        blank = [i for i, item in enumerate(prompts) if not item.strip()]
        if blank:
            raise serializers.ValidationError({"prompt": [f"prompt {blank[0]} is blank"]})
        attrs["inputs"] = [{"prompt": item} for item in prompts]
        return attrs


class ContentPartSerializer(StrictSerializer):
    type = serializers.ChoiceField(choices=["text"], help_text="Only text parts are supported.")
    text = StrictCharField(max_length=settings.GENERATE_MAX_PROMPT_CHARS, allow_blank=True)


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "maxLength": settings.GENERATE_MAX_PROMPT_CHARS},
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "type": {"const": "text", "description": "Only text parts are supported."},
                        "text": {"type": "string", "maxLength": settings.GENERATE_MAX_PROMPT_CHARS},
                    },
                    "required": ["type", "text"],
                    "additionalProperties": False,
                },
                "maxItems": 16,
            },
        ]
    }
)
class ContentField(serializers.Field):
    """A message's content: a string, or text parts (joined)."""

    default_error_messages = {"invalid": "Must be a string or a list of text parts."}

    def to_internal_value(self, data):
        if isinstance(data, str):
            if len(data) > settings.GENERATE_MAX_PROMPT_CHARS:
                raise serializers.ValidationError(f"at most {settings.GENERATE_MAX_PROMPT_CHARS} characters")
            return data
        if not isinstance(data, list):
            self.fail("invalid")
        if len(data) > 16:
            raise serializers.ValidationError("at most 16 parts")
        parts = ContentPartSerializer(data=data, many=True)
        parts.is_valid(raise_exception=True)
        return "".join(part["text"] for part in parts.validated_data)

    def to_representation(self, value):
        return value


class MessageSerializer(StrictSerializer):
    role = serializers.ChoiceField(
        choices=["system", "developer", "user", "assistant"],
        help_text="developer counts as system. Tool and function messages are not supported.",
    )
    content = ContentField()
    name = StrictCharField(max_length=64, required=False, help_text="Accepted; changes nothing.")

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if value["role"] == "developer":
            value["role"] = "system"
        return value


MAX_MESSAGES = 32


class ChatCompletionRequestSerializer(OpenAIRequestSerializer):
    hints = {"prompt": "messages", "max_new_tokens": "max_tokens"}
    schema_extra = {
        "oneOf": [
            {"required": ["product"], "properties": {"messages": {"maxItems": 0}}},
            {"not": {"required": ["product"]}, "properties": {"messages": {"minItems": 1}}},
        ],
        "not": {
            "required": ["max_tokens", "max_completion_tokens"],
            "properties": {"max_tokens": {"type": "integer"}, "max_completion_tokens": {"type": "integer"}},
        },
        **_sampling_rule(),
    }

    messages = MessageSerializer(
        many=True,
        max_length=MAX_MESSAGES,
        allow_empty=True,
        help_text="The chat. A single user message whose content is a JSON object with a `name` is read as product "
        "attributes (as the `product` field is). With `product`, send no messages.",
    )
    max_completion_tokens = StrictIntegerField(
        min_value=1,
        max_value=settings.GENERATE_MAX_NEW_TOKENS,
        required=False,
        allow_null=True,
        help_text="OpenAI's newer name for max_tokens; give one of them.",
    )
    logprobs = UnsupportedField(harmless=(None, False), why="no log probabilities")
    top_logprobs = UnsupportedField(harmless=(None, 0), why="no log probabilities")
    response_format = UnsupportedField(harmless=(None, {"type": "text"}), why="text only: no JSON mode")
    tools = UnsupportedField(harmless=(None, []), why="no tool calls")
    tool_choice = UnsupportedField(harmless=(None, "none"), why="no tool calls")
    parallel_tool_calls = StrictBooleanField(required=False, allow_null=True, help_text="Accepted; no tool calls.")
    functions = UnsupportedField(harmless=(None, []), why="no function calls")
    function_call = UnsupportedField(harmless=(None, "none"), why="no function calls")
    modalities = UnsupportedField(harmless=(None, ["text"]), why="text only")
    audio = UnsupportedField(harmless=(None,), why="text only")
    prediction = UnsupportedField(harmless=(None,), why="no predicted outputs")
    reasoning_effort = UnsupportedField(harmless=(None,), why="not a reasoning model")
    verbosity = UnsupportedField(harmless=(None,), why="not supported")
    web_search_options = UnsupportedField(harmless=(None,), why="no web search")

    def validate(self, attrs):
        if attrs.get("max_tokens") is not None and attrs.get("max_completion_tokens") is not None:
            raise serializers.ValidationError({"max_completion_tokens": ["give max_tokens or this, not both"]})
        attrs = super().validate(attrs)
        messages = attrs["messages"]
        if "product" in attrs:
            if messages:
                raise serializers.ValidationError({"messages": ["with a product, send no messages"]})
            attrs["inputs"] = [{"product": attrs["product"]}]
            return attrs
        if not messages:
            raise serializers.ValidationError({"messages": ["give at least one message (or a product)"]})
        product = _product_message(messages)
        attrs["inputs"] = [{"product": product} if product is not None else {"messages": messages}]
        return attrs


def _product_message(messages):
    """Product attributes sent as the chat's only message: a JSON object with a name."""
    if len(messages) != 1 or messages[0]["role"] != "user":
        return None
    try:
        data = json.loads(messages[0]["content"])
    except ValueError:
        return None
    if not isinstance(data, dict) or "name" not in data:
        return None
    product = ProductSerializer(data=data)
    if not product.is_valid():
        raise serializers.ValidationError({"messages": [{"content": product.errors}]})
    return product.validated_data


# --- Answers (for the schema; the views build plain dicts) ---------------------------


@extend_schema_field({"type": "null", "description": "Always null: no log probabilities."})
class AlwaysNullField(serializers.Field):
    def to_representation(self, value):
        return None


class CompletionChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    text = serializers.CharField(allow_blank=True)
    logprobs = AlwaysNullField()
    finish_reason = serializers.ChoiceField(choices=["stop", "length"], allow_null=True)


class CompletionSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.ChoiceField(choices=["text_completion"])
    created = serializers.IntegerField()
    model = serializers.CharField(help_text="The version that answered (its name, also for `active`).")
    system_fingerprint = serializers.CharField(help_text="The version's sha256, shortened.")
    choices = CompletionChoiceSerializer(many=True)
    usage = UsageSerializer(allow_null=True)


class ChatMessageOutSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["assistant"])
    content = serializers.CharField(allow_blank=True)
    refusal = serializers.CharField(allow_null=True)


class ChatChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    message = ChatMessageOutSerializer()
    logprobs = AlwaysNullField()
    finish_reason = serializers.ChoiceField(choices=["stop", "length"])


class ChatCompletionSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.ChoiceField(choices=["chat.completion"])
    created = serializers.IntegerField()
    model = serializers.CharField()
    system_fingerprint = serializers.CharField()
    choices = ChatChoiceSerializer(many=True)
    usage = UsageSerializer()


class OpenAIModelSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.ChoiceField(choices=["model"])
    created = serializers.IntegerField()
    owned_by = serializers.CharField()


class OpenAIModelListSerializer(serializers.Serializer):
    object = serializers.ChoiceField(choices=["list"])
    data = OpenAIModelSerializer(many=True)

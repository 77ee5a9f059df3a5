"""What the OpenAPI schema says beyond what drf-spectacular reads off the views:
the error bodies of every status, the security schemes, and the constraints of
the strict serializers (unknown fields refused, non-blank texts, object-level
rules). Imported by InferenceConfig.ready() so that the extensions register."""

from drf_spectacular.extensions import (
    OpenApiAuthenticationExtension,
    OpenApiSerializerExtension,
    OpenApiSerializerFieldExtension,
)
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse
from rest_framework import serializers

from inference.fields import NO_NUL_NOT_BLANK_PATTERN, NO_NUL_PATTERN


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


class RateLimitedSerializer(serializers.Serializer):
    detail = serializers.CharField()
    limit = serializers.ChoiceField(
        choices=["requests_per_minute", "tokens_per_minute", "daily_token_quota", "failed_logins"],
        help_text="The limit that was reached.",
    )
    retry_after = serializers.IntegerField(help_text="Seconds to wait; also in the Retry-After header.")


class OpenAIErrorDetailSerializer(serializers.Serializer):
    message = serializers.CharField()
    type = serializers.CharField(
        help_text="invalid_request_error, permission_error, requests, tokens, insufficient_quota or server_error."
    )
    param = serializers.CharField(allow_null=True, help_text="The request field at fault, when there is one.")
    code = serializers.CharField(allow_null=True)


class OpenAIErrorSerializer(serializers.Serializer):
    error = OpenAIErrorDetailSerializer()


# A 400 names each bad field: {"field": ["reason", ...]}, nested for objects ({"product": {"name": [...]}})
# and lists of objects; a body that is not JSON at all gets {"detail": "..."}.
VALIDATION_ERROR_SCHEMA = {
    "anyOf": [
        {"$ref": "#/components/schemas/Error"},
        {
            "type": "object",
            "description": "Each bad field with its reasons; nested objects and lists nest the same way.",
            "additionalProperties": {"anyOf": [{"type": "array"}, {"type": "object"}]},
        },
    ]
}


def sse_schema(events):
    """A text/event-stream answer, event by event (as schemathesis reads a stream): ``events``
    maps an event name (None for OpenAI's unnamed events) to the schema of its data, JSON."""
    variants = []
    for name, data_schema in events.items():
        data = {"type": "string"}
        if data_schema is not None:
            data.update(contentMediaType="application/json", contentSchema=data_schema)
        variant = {"type": "object", "properties": {"data": data}, "required": ["data"]}
        if name is not None:
            variant["properties"]["event"] = {"const": name}
            variant["required"].append("event")
        variants.append(variant)
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def retry_after_headers(*codes):
    """The Retry-After response header: always on a 429, sometimes on a 503 (a full queue)."""
    return [
        OpenApiParameter(
            "Retry-After",
            OpenApiTypes.STR,
            location=OpenApiParameter.HEADER,
            response=[code],
            required=code == 429,
            description="Seconds to wait before trying again.",
        )
        for code in codes
    ]


_DESCRIPTIONS = {
    400: "Invalid request: the body names each bad field and the reason.",
    401: "No API key, or one that is unknown, revoked or expired (the body says which).",
    403: "The key lacks the scope (or its owner the permission), or the model version is not released.",
    404: "No such resource.",
    409: "The request conflicts with the resource's state.",
    413: "The body is larger than the server takes.",
    415: "The body is not JSON.",
    429: "Over a limit (the body names it); the Retry-After header says when to try again.",
    503: "No model version can be loaded, or the generation queue is full (then with a Retry-After header).",
    504: "The answer took longer than GENERATE_TIMEOUT_SECONDS.",
}


def error_responses(*codes, openai=False, descriptions=None):
    """OpenAPI responses for the error statuses ``codes``, with their bodies."""
    descriptions = {**_DESCRIPTIONS, **(descriptions or {})}
    responses = {}
    for code in codes:
        if openai:
            body = OpenAIErrorSerializer
        elif code == 400:
            body = VALIDATION_ERROR_SCHEMA
        elif code == 429:
            body = RateLimitedSerializer
        else:
            body = ErrorSerializer
        examples = []
        if code == 429:
            examples = [_RATE_LIMIT_EXAMPLE_OPENAI if openai else _RATE_LIMIT_EXAMPLE]
        responses[code] = OpenApiResponse(
            body,
            description=descriptions[code],
            examples=examples,
        )
    return responses


_RATE_LIMIT_EXAMPLE = OpenApiExample(
    "Over the requests per minute",
    response_only=True,
    status_codes=["429"],
    value={
        "detail": "this API key's limit of 60 requests per minute is reached; retry in 12 s",
        "limit": "requests_per_minute",
        "retry_after": 12,
    },
)
_RATE_LIMIT_EXAMPLE_OPENAI = OpenApiExample(
    "Over the generated tokens per minute",
    response_only=True,
    status_codes=["429"],
    value={
        "error": {
            "message": "this API key's limit of 10000 generated tokens per minute is reached; retry in 7 s",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    },
)


# --- Extensions -------------------------------------------------------------------


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "inference.auth.ApiKeyAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (gk_…), made in the admin or with `manage.py apikey create`.",
        }


class ThrottledBasicScheme(OpenApiAuthenticationExtension):
    target_class = "inference.auth.ThrottledBasicAuthentication"
    name = "basicAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "basic", "description": "A user's name and password (throttled)."}


class StrictSerializerSchema(OpenApiSerializerExtension):
    """Strict serializers refuse unknown fields (``additionalProperties: false`` on requests)
    and may add object-level rules of their own (``schema_extra``)."""

    target_class = "inference.fields.StrictSerializer"
    match_subclasses = True

    def map_serializer(self, auto_schema, direction):
        schema = auto_schema._map_basic_serializer(self.target, direction)
        if type(self.target).__doc__ is None:
            schema.pop("description", None)  # a base class's docstring is not this serializer's
        if direction == "request":
            schema["additionalProperties"] = False
            schema.update(getattr(self.target, "schema_extra", {}))
        return schema


class StrictCharFieldSchema(OpenApiSerializerFieldExtension):
    """What a strict text refuses, as a pattern: NUL characters (DRF's CharField refuses them,
    and PostgreSQL could not store them), and, unless blank is allowed, a text of spaces only."""

    target_class = "inference.fields.StrictCharField"
    match_subclasses = True

    def map_serializer_field(self, auto_schema, direction):
        schema = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        # That mapping already has the field's meta (null included), which the caller adds again.
        if isinstance(schema.get("type"), list):
            schema["type"] = "string"
        if direction == "request":
            schema["pattern"] = NO_NUL_PATTERN if self.target.allow_blank else NO_NUL_NOT_BLANK_PATTERN
        return schema


class UnsupportedFieldSchema(OpenApiSerializerFieldExtension):
    """An OpenAI field genapi does not support: the schema lists the values that pass."""

    target_class = "inference.openai_compat.serializers.UnsupportedField"

    def map_serializer_field(self, auto_schema, direction):
        # anyOf of consts, not an enum: drf-spectacular would turn an enum into a named component.
        return {"anyOf": [{"const": value} for value in self.target.harmless], "description": self.target.help_text}


def request_bodies_required(result, generator, request, public):
    """drf-spectacular marks a request body required only when its serializer has a required
    field; every body here is required (an empty one gets a 400), so the schema says so."""
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict) and "requestBody" in operation:
                operation["requestBody"]["required"] = True
    return result

"""Serializer fields that take JSON as the schema says, and serializers that
refuse fields they do not know.

DRF's own fields convert: "5" passes as an integer, 5 as a string, "yes" as a
boolean. The OpenAPI schema promises types, so a client (or a generated one)
that sends the wrong type must hear so, not be guessed at.
"""

import difflib
import math
from collections.abc import Mapping

from rest_framework import serializers

# What str.strip() removes (Python's whitespace), spelled out for the schema's pattern: a value
# that is only these characters is blank once trimmed, and refused.
PYTHON_SPACE = r"\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_BLANK_PATTERN = f"[^{PYTHON_SPACE}]"
# DRF's CharField also refuses NUL characters.
NO_NUL_PATTERN = r"^[^\x00]*$"
NO_NUL_NOT_BLANK_PATTERN = rf"^[^\x00]*[^\x00{PYTHON_SPACE}][^\x00]*$"


class StrictCharField(serializers.CharField):
    """A JSON string, taken as sent (whoever uses it trims it), so that its length is counted as
    the schema's maxLength counts it; refused when it is blank once trimmed (unless blank is
    allowed), which the schema says with NO_NUL_NOT_BLANK_PATTERN."""

    default_error_messages = {"invalid": "Not a valid string."}

    def __init__(self, **kwargs):
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        value = super().to_internal_value(data)
        if not self.allow_blank and not value.strip():
            self.fail("blank")
        return value


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float) or not math.isfinite(data):
            self.fail("invalid")
        if isinstance(data, float):
            if not data.is_integer():
                self.fail("invalid")
            data = int(data)
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    """A JSON number: not a string, not NaN or Infinity (which Python's JSON parser accepts)."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float) or not math.isfinite(data):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    default_error_messages = {"invalid": "Must be true or false."}

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class StrictSerializer(serializers.Serializer):
    """Refuses every field it does not know, naming each, along with the other errors: a
    misspelt or borrowed field (``max_tokens``) would otherwise be ignored in silence.
    ``hints`` maps a likely borrowed name to the field meant."""

    hints = {}

    def to_internal_value(self, data):
        unknown = {}
        if isinstance(data, Mapping):
            for name in data:
                if name not in self.fields:
                    unknown[name] = [serializers.ErrorDetail(self.unknown_message(name), code="unknown_field")]
        try:
            value = super().to_internal_value(data)
        except serializers.ValidationError as exc:
            if unknown and isinstance(exc.detail, dict):
                raise serializers.ValidationError({**exc.detail, **unknown}) from exc
            raise
        if unknown:
            raise serializers.ValidationError(unknown)
        return value

    def unknown_message(self, name):
        meant = self.hints.get(name) or next(iter(difflib.get_close_matches(str(name), list(self.fields), 1)), None)
        return f"unknown field; did you mean {meant!r}?" if meant else "unknown field"

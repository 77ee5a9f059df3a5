"""Product attributes: the one place that says what a clean attribute dict is.

Importers, the admin form and the API all pass raw attributes through
``attributes_normalize`` so that the same product always hashes, prompts and
deduplicates the same way.
"""

import math
import re
from decimal import Decimal, InvalidOperation

# The attributes the prompt knows by name, in the order the prompt lists them.
KNOWN_KEYS = ("name", "brand", "category", "color", "audience", "price", "currency", "features", "keywords")
LIST_KEYS = ("features", "keywords")
MAX_VALUE_CHARS = 500
MAX_KEY_CHARS = 40
MAX_DESCRIPTION_CHARS = 5000

_SPACE = re.compile(r"\s+")
_LIST_SPLIT = re.compile(r"\s*[;|\n]\s*")
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
# ASCII digits only: the API's schema states the same rule as PRICE_PATTERN (which leaves out the
# minus sign, since a negative price is refused).
_PRICE = re.compile(r"^[^0-9\-]*(-?[0-9,]*\.?[0-9]+)[^0-9]*$")
PRICE_PATTERN = r"^[^0-9-]*[0-9,]*\.?[0-9]+[^0-9]*$"


class AttributeValueError(ValueError):
    """A bad attribute value; ``key`` names the attribute."""

    def __init__(self, key, message):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _clean_text(value):
    return _SPACE.sub(" ", str(value)).strip()


def price_parse(value):
    """'$1,299.00' -> 1299.0. Raises ValueError for anything that is not a price."""
    if isinstance(value, bool):
        raise ValueError("not a number")
    if isinstance(value, (int, float, Decimal)):
        number = Decimal(str(value))
    else:
        match = _PRICE.match(_clean_text(value))
        if not match:
            raise ValueError(f"{value!r} is not a number")
        try:
            number = Decimal(match.group(1).replace(",", ""))
        except InvalidOperation as exc:
            raise ValueError(f"{value!r} is not a number") from exc
    if not number.is_finite() or number < 0:
        raise ValueError("must be a non-negative number")
    try:
        return float(round(number, 2))
    except InvalidOperation:  # more digits than rounding to cents can hold: there are no cents to round
        value = float(number)
    if not math.isfinite(value):
        raise ValueError("is too large")
    return value


def attributes_normalize(raw):
    """Return a clean copy of ``raw``: trimmed text, lists for features and
    keywords, a number for price, empty values dropped, unknown keys kept."""
    if not isinstance(raw, dict):
        raise AttributeValueError("attributes", "must be an object of attribute names to values")
    clean = {}
    for key, value in raw.items():
        norm_key = _clean_text(key).lower().replace(" ", "_").replace("-", "_")
        if not _KEY.match(norm_key) or len(norm_key) > MAX_KEY_CHARS:
            raise AttributeValueError(str(key)[:MAX_KEY_CHARS], "attribute names are letters, digits and underscores")
        if value is None:
            continue
        if norm_key in LIST_KEYS:
            items = _LIST_SPLIT.split(value) if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise AttributeValueError(norm_key, "must be a list of short texts")
            items = [_clean_text(item) for item in items if item is not None and not isinstance(item, (dict, list))]
            items = [item for item in items if item]
            if any(len(item) > MAX_VALUE_CHARS for item in items):
                raise AttributeValueError(norm_key, f"each item must be at most {MAX_VALUE_CHARS} characters")
            if items:
                clean[norm_key] = items
            continue
        if norm_key == "price":
            if isinstance(value, str) and not value.strip():
                continue
            try:
                clean[norm_key] = price_parse(value)
            except ValueError as exc:
                raise AttributeValueError("price", str(exc)) from exc
            continue
        if isinstance(value, (dict, list)):
            raise AttributeValueError(norm_key, "must be a text or a number")
        text = _clean_text(value)
        if len(text) > MAX_VALUE_CHARS:
            raise AttributeValueError(norm_key, f"must be at most {MAX_VALUE_CHARS} characters")
        if text:
            clean[norm_key] = text
    return clean


def description_normalize(text):
    return _SPACE.sub(" ", str(text or "")).strip()

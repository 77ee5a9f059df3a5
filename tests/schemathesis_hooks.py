"""Loaded by the schemathesis run in tests/inference/test_schema.py (SCHEMATHESIS_HOOKS).

One rule no schema can state: a prompt must fit the model's context window, which is
counted in tokens, not characters. A schema-valid prompt past it gets a 400 naming the
context (OpenAI's `context_length_exceeded`). This check is schemathesis' own
positive_data_acceptance with that one answer allowed; every other check runs as it is.
"""

import json

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance


def _over_the_context(response):
    if response.status_code != 400:
        return False
    try:
        body = json.loads(response.text)
    except ValueError:
        return False
    if isinstance(body.get("error"), dict):
        return body["error"].get("code") == "context_length_exceeded"
    messages = [message for value in body.values() if isinstance(value, list) for message in value]
    return len(body) == 1 and any("-token context" in str(message) for message in messages)


@schemathesis.check
def positive_data_acceptance_within_the_context(ctx, response, case):
    if _over_the_context(response):
        return None
    return positive_data_acceptance(ctx, response, case)

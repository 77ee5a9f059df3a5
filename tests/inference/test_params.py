"""One parameter type from the request serializers to the sampler (GenerationParams), with one
default length: the GENERATE_DEFAULT_MAX_NEW_TOKENS setting."""

import json
import os
import subprocess
import sys

import pytest

from inference.engine.params import GenerationParams
from inference.openai_compat.serializers import ChatCompletionRequestSerializer, CompletionRequestSerializer
from inference.serializers import GenerateRequestSerializer
from tests.conftest import REPO

# Run in a fresh process: the serializers and the schema read the setting when Django starts.
_DEFAULTS = """
import django, json
django.setup()
from django.conf import settings
from drf_spectacular.generators import SchemaGenerator
from inference.engine.params import GenerationParams
from inference.openai_compat.serializers import CompletionRequestSerializer
from inference.serializers import GenerateRequestSerializer

native = GenerateRequestSerializer(data={"prompt": "Describe a scarf."})
native.is_valid(raise_exception=True)
openai = CompletionRequestSerializer(data={"model": "active", "prompt": "Describe a scarf."})
openai.is_valid(raise_exception=True)
schemas = SchemaGenerator().get_schema(request=None, public=True)["components"]["schemas"]
print(json.dumps({
    "setting": settings.GENERATE_DEFAULT_MAX_NEW_TOKENS,
    "evaluation": settings.EVALUATION_MAX_NEW_TOKENS,
    "engine": GenerationParams().max_new_tokens,
    "serializer": GenerateRequestSerializer().fields["max_new_tokens"].default,
    "native_request": native.validated_data["params"].max_new_tokens,
    "openai_request": openai.validated_data["params"].max_new_tokens,
    "schema": schemas["GenerateRequestRequest"]["properties"]["max_new_tokens"]["default"],
    "openai_schema": schemas["CompletionRequestRequest"]["properties"]["max_tokens"]["description"],
}))
"""


def _defaults(setting):
    """The default lengths in a process started with GENERATE_DEFAULT_MAX_NEW_TOKENS=``setting``
    (None: unset, whatever the environment running the tests says)."""
    env = {name: value for name, value in os.environ.items() if name != "GENERATE_DEFAULT_MAX_NEW_TOKENS"}
    if setting is not None:
        env["GENERATE_DEFAULT_MAX_NEW_TOKENS"] = setting
    result = subprocess.run(
        [sys.executable, "-c", _DEFAULTS],
        cwd=REPO,
        env={**env, "DJANGO_SETTINGS_MODULE": "genapi.settings.test", "GENERATE_MAX_NEW_TOKENS": "256"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize(("setting", "expected"), [(None, 160), ("77", 77)], ids=["unset", "set"])
def test_the_serializer_engine_and_schema_default_lengths_are_the_setting(setting, expected):
    defaults = _defaults(setting)
    openai_schema = defaults.pop("openai_schema")
    # Each place a request's length comes from when it names none (and evaluations, which score that text).
    assert defaults == dict.fromkeys(defaults, expected)
    assert openai_schema == f"New tokens at most; {expected} when left out."


def test_the_native_serializer_gives_the_requests_generation_params():
    serializer = GenerateRequestSerializer(
        data={
            "prompt": "Describe a scarf.",
            "max_new_tokens": 12,
            "temperature": 0.7,
            "top_k": 5,
            "stop": "\n",
            "no_repeat_ngram_size": 3,
            "min_new_tokens": 10,
        }
    )
    serializer.is_valid(raise_exception=True)
    assert serializer.validated_data["params"] == GenerationParams(
        max_new_tokens=12, temperature=0.7, top_k=5, stop=("\n",), no_repeat_ngram_size=3, min_new_tokens=10
    )


def test_the_openai_serializers_give_the_same_type_with_openais_defaults():
    completion = CompletionRequestSerializer(data={"model": "active", "prompt": "Describe a scarf.", "n": 2})
    completion.is_valid(raise_exception=True)
    assert completion.validated_data["params"] == GenerationParams(temperature=1.0, num_return_sequences=2)
    chat = ChatCompletionRequestSerializer(
        data={
            "model": "active",
            "messages": [{"role": "user", "content": "Describe a scarf."}],
            "max_completion_tokens": 9,
            "top_p": 0,
            "top_k": 0,
            "stop": ["a", "b"],
            "temperature": None,
            "no_repeat_ngram_size": 0,
            "min_tokens": 9,
        }
    )
    chat.is_valid(raise_exception=True)
    assert chat.validated_data["params"] == GenerationParams(
        max_new_tokens=9, temperature=1.0, top_p=0.01, stop=("a", "b"), no_repeat_ngram_size=0, min_new_tokens=9
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_new_tokens", 0, "max_new_tokens must be at least 1, not 0"),
        ("temperature", -0.5, "temperature must be 0 (greedy) or more, not -0.5"),
        ("top_p", 0.0, "top_p must be above 0 and at most 1, not 0.0"),
        ("top_k", -1, "top_k must be 0 (off) or more, not -1"),
        ("repetition_penalty", 0.0, "repetition_penalty must be above 0, not 0.0"),
        ("num_return_sequences", 0, "num_return_sequences must be at least 1, not 0"),
        ("no_repeat_ngram_size", -2, "no_repeat_ngram_size must be 0 (off) or more, not -2"),
        ("min_new_tokens", -1, "min_new_tokens must be 0 (off) or more, not -1"),
    ],
)
def test_parameters_the_sampler_cannot_use_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError) as raised:
        GenerationParams(**{field: value})
    assert str(raised.value) == message


def test_a_floor_above_the_length_is_accepted_and_the_text_runs_to_the_length():
    # A schema cannot compare two fields, so a floor past max_new_tokens is valid: the length wins
    # (tests/inference/test_engine.py checks the engine's side).
    native = GenerateRequestSerializer(data={"prompt": "Describe a scarf.", "max_new_tokens": 10, "min_new_tokens": 50})
    native.is_valid(raise_exception=True)
    assert native.validated_data["params"] == GenerationParams(max_new_tokens=10, min_new_tokens=50)
    chat = ChatCompletionRequestSerializer(
        data={"model": "active", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4, "min_tokens": 9}
    )
    chat.is_valid(raise_exception=True)
    assert (chat.validated_data["params"].max_new_tokens, chat.validated_data["params"].min_new_tokens) == (4, 9)

"""The OpenAI-compatible routes driven by the official `openai` client against a live server.

The tiny test model writes noise; what matters is that the client gets OpenAI's
shapes, and the same text the native API gives for the same product and seed.
"""

import json
import urllib.request

import openai
import pytest

from finetuning.services.versions import version_register

pytestmark = pytest.mark.django_db(transaction=True)  # the server's threads must see the test's rows

PRODUCT = {"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey"}


@pytest.fixture
def key(key_factory):
    _, header = key_factory(requests_per_minute=10_000, tokens_per_minute=1_000_000)
    return header["HTTP_AUTHORIZATION"].removeprefix("Bearer ")


@pytest.fixture
def client(live_server, key):
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def _native(live_server, key, body):
    request = urllib.request.Request(
        live_server.url + "/api/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_models_lists_the_active_alias_and_the_versions(base_version, client):
    assert [model.id for model in client.models.list()] == ["active", base_version.name]
    assert client.models.retrieve("active").owned_by == "genapi"
    assert client.models.retrieve(base_version.name).id == base_version.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_completions(base_version, client):
    answer = client.chat.completions.create(
        model="active", messages=[{"role": "user", "content": "Describe a scarf."}], max_tokens=12, seed=3
    )
    assert answer.object == "chat.completion" and answer.model == base_version.name
    [choice] = answer.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= answer.usage.completion_tokens <= 12 and answer.usage.prompt_tokens > 10
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_completions_with_several_prompts_and_n(base_version, client):
    answer = client.completions.create(
        model=base_version.name, prompt=["Describe a scarf.", "Describe a hat."], max_tokens=6, n=2, seed=4
    )
    assert answer.object == "text_completion"
    assert [choice.index for choice in answer.choices] == [0, 1, 2, 3]
    assert all(choice.finish_reason in ("stop", "length") for choice in answer.choices)
    again = client.completions.create(
        model=base_version.name, prompt=["Describe a scarf.", "Describe a hat."], max_tokens=6, n=2, seed=4
    )
    assert [c.text for c in again.choices] == [c.text for c in answer.choices]  # the seed makes them repeatable


def test_streaming_chat_gives_the_native_apis_text_for_the_same_seed(base_version, client, live_server, key):
    native = _native(live_server, key, {"product": PRODUCT, "temperature": 1.0, "seed": 7, "max_new_tokens": 24})
    stream = client.chat.completions.create(
        model="active",
        messages=[],
        extra_body={"product": PRODUCT},
        max_tokens=24,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == native["choices"][0]["text"] and text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [native["choices"][0]["finish_reason"]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == native["usage"]["completion_tokens"]
    # The product as the only message, and through the completions route: the same text again.
    as_message = client.chat.completions.create(
        model="active", messages=[{"role": "user", "content": json.dumps(PRODUCT)}], max_tokens=24, seed=7
    )
    as_completion = client.completions.create(
        model="active", prompt="", extra_body={"product": PRODUCT}, max_tokens=24, seed=7
    )
    assert as_message.choices[0].message.content == text == as_completion.choices[0].text


def test_streaming_completions_with_n(base_version, client):
    stream = client.completions.create(
        model="active", prompt="Describe a scarf.", max_tokens=8, n=2, seed=9, stream=True
    )
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    whole = client.completions.create(model="active", prompt="Describe a scarf.", max_tokens=8, n=2, seed=9)
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]


def test_stop_and_seed(base_version, client):
    def ask(**kwargs):
        return client.completions.create(model="active", prompt="Describe a scarf.", max_tokens=40, **kwargs)

    text = ask(seed=5).choices[0].text
    assert ask(seed=5).choices[0].text == text and len(text) > 20
    assert {ask(seed=seed).choices[0].text for seed in (6, 7, 8)} - {text}
    stop = text[10:14]
    cut = ask(seed=5, stop=stop).choices[0]
    assert cut.text == text[:10].rstrip() and cut.finish_reason == "stop"
    assert ask(seed=5, stop=[stop, "no such text"]).choices[0].text == cut.text


def test_a_bad_key_is_an_authentication_error(base_version, live_server):
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="gk_00000000_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.body["code"] == "invalid_api_key"


def test_over_the_limit_is_a_rate_limit_error(base_version, live_server, key_factory):
    _, header = key_factory(name="tight", requests_per_minute=1)
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key=header["HTTP_AUTHORIZATION"][7:], max_retries=0)
    client.models.list()
    with pytest.raises(openai.RateLimitError) as caught:
        client.models.list()
    assert caught.value.body["type"] == "requests" and caught.value.body["code"] == "rate_limit_exceeded"
    assert int(caught.value.response.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"temperature": 3}, "temperature"),
        ({"n": 2, "temperature": 0}, "n"),
        ({"extra_body": {"min_tokens": -1}}, "min_tokens"),
    ],
)
def test_an_unsupported_field_is_a_bad_request_naming_it(base_version, client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="active", messages=[{"role": "user", "content": "Describe a scarf."}], max_tokens=4, **kwargs
        )
    assert caught.value.body["param"] == param and param in caught.value.body["message"]


def test_harmless_openai_fields_are_accepted(base_version, client):
    answer = client.chat.completions.create(
        model="active",
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Describe a scarf."}],
        max_completion_tokens=4,
        user="shop-42",
        logprobs=False,
        presence_penalty=0,
        frequency_penalty=0.0,
        response_format={"type": "text"},
        metadata={"sku": "123"},
        store=False,
    )
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_an_unreleased_version_needs_the_scope(base_version, model_store, live_server, key_factory):
    version_register(
        name="shop-job5",
        kind="base",
        base_model=base_version.base_model,
        relpath=base_version.artifact_path,
        sha256=base_version.sha256,
        hyperparameters={},
        metrics={},
    )
    _, header = key_factory(name="plain", scopes="generate,models:read")
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key=header["HTTP_AUTHORIZATION"][7:], max_retries=0)
    assert "shop-job5" not in [model.id for model in client.models.list()]
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.completions.create(model="shop-job5", prompt="Describe a scarf.", max_tokens=2)
    assert "models:unreleased" in caught.value.body["message"] and caught.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="shop-job6", prompt="Describe a scarf.", max_tokens=2)

"""The generation log: every generation the API answers is recorded, with its caller,
version, input, prompt, output, parameters, finish reason, tokens and timings; never at the
cost of the client's answer; kept GENERATION_LOG_RETENTION_DAYS days."""

import datetime
import json
from unittest import mock

import pytest
from django.db import OperationalError
from django.utils import timezone

from finetuning import prompts
from inference.models import Generation
from inference.services.generation_log import generation_record, generations_purge
from inference.tasks import generations_purge_task

PRODUCT = {"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey"}


def _post(client, header, path, body):
    return client.post(path, data=json.dumps(body), content_type="application/json", **header)


@pytest.fixture
def caller(key_factory):
    return key_factory(name="shop CMS", requests_per_minute=10_000, tokens_per_minute=1_000_000)


def test_a_json_generation_is_recorded_with_its_caller_version_and_prompt(client, base_version, caller):
    key, header = caller
    response = _post(client, header, "/api/generate", {"product": PRODUCT, "max_new_tokens": 6, "top_k": 5})
    assert response.status_code == 200
    body = response.json()
    [row] = Generation.objects.all()
    assert row.route == Generation.Route.API
    assert row.api_key == key and row.user is None
    assert row.version == base_version and row.version_name == base_version.name
    assert row.input == {"product": PRODUCT}
    assert row.prompt == prompts.product_prompt(PRODUCT)
    assert row.output == body["choices"][0]["text"]
    assert row.finish_reason == body["choices"][0]["finish_reason"]
    assert row.parameters["max_new_tokens"] == 6 and row.parameters["top_k"] == 5
    assert (row.prompt_tokens, row.completion_tokens) == (
        body["usage"]["prompt_tokens"],
        body["usage"]["completion_tokens"],
    )
    assert row.total_ms == body["timings"]["total_ms"] and row.timings["first_token_ms"] is not None
    assert row.error == ""


def test_a_stream_is_recorded_when_it_ends(client, base_version, caller):
    key, header = caller
    response = _post(
        client, header, "/api/generate", {"prompt": "Describe a scarf.", "max_new_tokens": 5, "stream": True}
    )
    assert not Generation.objects.exists()  # nothing written while the client reads
    events = b"".join(response.streaming_content).decode()
    done = json.loads(events.split("event: done\ndata: ")[1].split("\n")[0])
    [row] = Generation.objects.all()
    assert row.api_key == key and row.route == Generation.Route.API
    assert row.input == {"prompt": "Describe a scarf."}
    assert row.output == done["choices"][0]["text"] and row.completion_tokens == done["usage"]["completion_tokens"]


def test_several_texts_are_one_record_each(client, base_version, caller):
    _, header = caller
    body = {"product": PRODUCT, "max_new_tokens": 4, "temperature": 0.9, "num_return_sequences": 2}
    answer = _post(client, header, "/api/generate", body).json()
    rows = sorted(Generation.objects.all(), key=lambda row: row.parameters["index"])
    # The tiny model's sampled bytes may decode to U+0000, which the log keeps as U+FFFD (below).
    texts = [choice["text"].replace("\x00", "\ufffd") for choice in answer["choices"]]
    assert [row.output for row in rows] == texts
    assert rows[0].parameters["seed"] == answer["seed"]  # drawn by the server: the text can be made again
    assert sum(row.completion_tokens for row in rows) == answer["usage"]["completion_tokens"]


def test_the_openai_routes_are_recorded_with_their_route(client, base_version, caller):
    key, header = caller
    chat = _post(
        client,
        header,
        "/v1/chat/completions",
        {"model": "active", "messages": [{"role": "user", "content": "Describe a scarf."}], "max_tokens": 4},
    )
    assert chat.status_code == 200
    completion = _post(
        client,
        header,
        "/v1/completions",
        {"model": base_version.name, "product": PRODUCT, "prompt": "", "max_tokens": 4},
    )
    assert completion.status_code == 200, completion.content
    streamed = _post(
        client,
        header,
        "/v1/chat/completions",
        {"model": "active", "product": PRODUCT, "messages": [], "max_tokens": 4, "stream": True},
    )
    b"".join(streamed.streaming_content)
    rows = list(Generation.objects.order_by("pk"))
    assert [row.route for row in rows] == [Generation.Route.CHAT, Generation.Route.COMPLETIONS, Generation.Route.CHAT]
    assert all(row.api_key == key and row.version == base_version for row in rows)
    assert rows[0].input == {"messages": [{"role": "user", "content": "Describe a scarf."}]}
    assert rows[0].output == chat.json()["choices"][0]["message"]["content"]
    assert rows[1].input == {"product": PRODUCT} and rows[1].output == completion.json()["choices"][0]["text"]
    assert rows[2].input == {"product": PRODUCT} and rows[2].finish_reason in ("stop", "length")


def test_retention_zero_records_nothing(client, base_version, caller, settings):
    settings.GENERATION_LOG_RETENTION_DAYS = 0
    _, header = caller
    assert _post(client, header, "/api/generate", {"product": PRODUCT, "max_new_tokens": 3}).status_code == 200
    streamed = _post(client, header, "/api/generate", {"product": PRODUCT, "max_new_tokens": 3, "stream": True})
    b"".join(streamed.streaming_content)
    assert not Generation.objects.exists()
    assert (
        generation_record(
            route=Generation.Route.PLAYGROUND,
            version=base_version,
            input={"product": PRODUCT},
            prompt="p",
            output="o",
            parameters={},
            finish_reason="stop",
            prompt_tokens=1,
            completion_tokens=1,
            timings={"total_ms": 1.0},
        )
        is None
    )


def test_a_failed_write_does_not_fail_the_request(client, base_version, caller, caplog):
    _, header = caller
    assert _post(client, header, "/api/generate", {"product": PRODUCT, "max_new_tokens": 3}).status_code == 200
    Generation.objects.all().delete()
    with mock.patch.object(Generation.objects, "bulk_create", side_effect=OperationalError("the database is down")):
        response = _post(client, header, "/api/generate", {"product": PRODUCT, "max_new_tokens": 3})
        streamed = _post(client, header, "/api/generate", {"product": PRODUCT, "max_new_tokens": 3, "stream": True})
        events = b"".join(streamed.streaming_content).decode()
    assert response.status_code == 200 and response.json()["choices"][0]["text"] is not None
    assert "event: done" in events
    assert not Generation.objects.exists()
    assert "Generation log: 1 record(s) not written" in caplog.text


def test_a_timeout_is_recorded_with_its_error(client, base_version, caller, settings):
    settings.GENERATE_TIMEOUT_SECONDS = 0.000001
    _, header = caller
    response = _post(client, header, "/api/generate", {"product": PRODUCT, "max_new_tokens": 50})
    assert response.status_code in (503, 504)
    [row] = Generation.objects.all()
    assert row.error == response.json()["detail"] and row.finish_reason == "timeout"


def _record(version, **fields):
    row = generation_record(
        route=Generation.Route.API,
        version=version,
        input={"product": PRODUCT},
        prompt="prompt",
        output="text",
        parameters={},
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=2,
        timings={"total_ms": 5.0},
    )
    Generation.objects.filter(pk=row.pk).update(**fields)
    return row.pk


def test_the_purge_deletes_old_records_and_keeps_the_rated_ones(base_version, settings, dataset_factory):
    settings.GENERATION_LOG_RETENTION_DAYS = 7
    old = timezone.now() - datetime.timedelta(days=8)
    example = dataset_factory(examples=1).examples.get()
    expired = [_record(base_version, created_at=old) for _ in range(3)]
    rated = _record(base_version, created_at=old, rating=Generation.Rating.BAD, rating_note="wrong colour")
    used = _record(base_version, created_at=old, example=example)
    recent = _record(base_version, created_at=timezone.now() - datetime.timedelta(days=6))
    assert generations_purge(batch_size=2) == 3
    assert set(Generation.objects.values_list("pk", flat=True)) == {rated, used, recent}
    assert not Generation.objects.filter(pk__in=expired).exists()
    assert generations_purge_task.apply().get() == 0  # the hourly task, by the name the beat schedule calls


def test_a_text_with_nul_characters_is_recorded_and_breaks_nothing_after_it(base_version, caller):
    """A model can write U+0000 (any byte-level token may decode to it), which PostgreSQL
    refuses in text and jsonb: the record keeps it as U+FFFD, and the write never leaves the
    surrounding transaction broken for what comes next."""
    key, _ = caller
    row = generation_record(
        route=Generation.Route.API,
        version=base_version,
        input={"product": {"name": "Scarf\x00"}},
        prompt="Name: Scarf\x00",
        output="Warm\x00 wool",
        parameters={"stop": ["\x00"]},
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=2,
        timings={"total_ms": 5.0},
        api_key=key,
    )
    assert row is not None
    row.refresh_from_db()
    assert (row.output, row.prompt) == ("Warm\ufffd wool", "Name: Scarf\ufffd")
    assert row.input == {"product": {"name": "Scarf\ufffd"}} and row.parameters == {"stop": ["\ufffd"]}
    assert Generation.objects.filter(pk=row.pk).exists()  # the transaction is still usable

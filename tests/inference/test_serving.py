"""The API as clients see it: a live server on loopback, real sockets, real threads.

The server runs in this process, so the settings and the model cache the tests
set up are the ones it serves with, and a test can watch the engine's batch.
The tiny base model answers greedy product prompts with newlines only (an empty
text once stripped): tests that need text to stream or to cut sample it with a
seed instead, which is just as reproducible.
"""

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest

from finetuning.services.versions import version_activate, version_approve
from inference import loader
from inference.engine.params import GenerationParams
from tests.inference.waiting import eventually, slow_steps

pytestmark = pytest.mark.django_db(transaction=True)  # the server's threads must see the test's rows


@pytest.fixture(autouse=True)
def _anonymous_generation(settings):
    """These tests are about serving, not keys: requests without one, as in development."""
    settings.GENERATE_ALLOW_ANONYMOUS = True


URL = "/api/generate"
PRODUCT = {"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey"}
SAMPLED = {"prompt": "Describe a scarf.", "temperature": 1.0, "seed": 5, "max_new_tokens": 40}


def _post(live_server, body, *, timeout=30):
    """(status, headers, JSON body) of a plain request."""
    request = urllib.request.Request(
        live_server.url + URL, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


class _Stream:
    """A streaming request, read one server-sent event at a time."""

    def __init__(self, live_server, body):
        address = urlsplit(live_server.url)
        self.connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        payload = json.dumps({**body, "stream": True})
        self.connection.request("POST", URL, body=payload, headers={"Content-Type": "application/json"})
        self.response = self.connection.getresponse()

    def events(self):
        """(event name, data) as each arrives, in the exact format `event: NAME\\ndata: JSON\\n\\n`."""
        while True:
            first = self.response.readline()
            if not first:
                return
            second, blank = self.response.readline(), self.response.readline()
            assert first.startswith(b"event: ") and second.startswith(b"data: ") and blank == b"\n", (first, second)
            yield first[len(b"event: ") : -1].decode(), json.loads(second[len(b"data: ") :])

    def close(self):
        """The client goes away."""
        self.response.close()
        self.connection.close()


def test_a_stream_sends_text_as_it_comes_then_the_whole_answer(base_version, live_server, monkeypatch):
    slow_steps(loader.model_get(base_version).engine, monkeypatch)  # 40 tokens: about a second
    stream = _Stream(live_server, SAMPLED)
    assert stream.response.status == 200
    assert stream.response.getheader("Content-Type") == "text/event-stream"
    assert stream.response.getheader("X-Model-Version") == base_version.name
    assert stream.response.getheader("X-Model-Version-Id") == str(base_version.pk)
    events, arrivals = [], []
    for event in stream.events():
        events.append(event)
        arrivals.append(time.monotonic())
    stream.close()
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"chunk"} and len(names) > 5
    chunks = [data for _, data in events[:-1]]
    assert all(set(chunk) == {"index", "text"} and chunk["index"] == 0 and chunk["text"] for chunk in chunks)
    assert arrivals[-1] - arrivals[0] > 0.3, "the text came all at once: the stream was buffered"
    done = events[-1][1]
    [choice] = done["choices"]
    assert choice["text"] == "".join(chunk["text"] for chunk in chunks)
    assert choice["finish_reason"] in ("stop", "length")
    assert done["model_version"] == {"id": base_version.pk, "name": base_version.name}
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]
    assert done["seed"] == 5 and done["timings"]["first_token_ms"] > 0
    # The same request without streaming: the same answer.
    monkeypatch.undo()
    status, headers, body = _post(live_server, SAMPLED)
    assert status == 200 and headers["X-Model-Version"] == base_version.name
    assert {key: body[key] for key in ("choices", "usage", "model_version", "seed")} == {
        key: done[key] for key in ("choices", "usage", "model_version", "seed")
    }


def test_a_client_that_disconnects_mid_stream_frees_its_place_in_the_batch(
    base_version, live_server, settings, monkeypatch
):
    settings.INFERENCE_MAX_BATCH = 1
    engine = loader.model_get(base_version).engine
    slow_steps(engine, monkeypatch)
    stream = _Stream(live_server, {**SAMPLED, "max_new_tokens": 256})  # about five seconds at this speed
    events = stream.events()
    assert next(events)[0] == "chunk"
    assert engine.load() == (1, 0)
    stream.close()
    # At this speed the answer had seconds to go.
    assert eventually(lambda: engine.load() == (0, 0), timeout=2.0), "the generation went on without its client"
    status, _, body = _post(live_server, {"product": PRODUCT, "max_new_tokens": 4})
    assert status == 200 and body["usage"]["completion_tokens"] == 4


def test_a_full_queue_answers_503_with_retry_after(base_version, live_server, settings, monkeypatch):
    settings.INFERENCE_MAX_BATCH = 1
    settings.GENERATE_QUEUE_SIZE = 1
    engine = loader.model_get(base_version).engine
    slow_steps(engine, monkeypatch)
    running = _Stream(live_server, {**SAMPLED, "max_new_tokens": 256})
    events = running.events()
    assert next(events)[0] == "chunk"
    answers = []
    waiting = threading.Thread(
        target=lambda: answers.append(_post(live_server, {"product": PRODUCT, "max_new_tokens": 4}))
    )
    waiting.start()
    assert eventually(lambda: engine.load() == (1, 1))
    status, headers, body = _post(live_server, {"product": PRODUCT, "max_new_tokens": 4})
    assert status == 503 and "queue is full" in body["detail"]
    assert int(headers["Retry-After"]) >= 1
    # The work already taken goes on: the running stream, then the waiting request.
    assert next(events)[0] == "chunk"
    running.close()
    waiting.join(timeout=10)
    [(status, headers, body)] = answers
    assert status == 200 and body["usage"]["completion_tokens"] == 4


def test_a_generation_over_the_time_limit_answers_504(base_version, live_server, settings, monkeypatch):
    settings.GENERATE_TIMEOUT_SECONDS = 0.3
    slow_steps(loader.model_get(base_version).engine, monkeypatch)
    started = time.monotonic()
    status, headers, body = _post(live_server, {**SAMPLED, "max_new_tokens": 256})
    assert status == 504 and "GENERATE_TIMEOUT_SECONDS" in body["detail"]
    assert headers["X-Model-Version"] == base_version.name
    assert time.monotonic() - started < 2.0
    stream = _Stream(live_server, {**SAMPLED, "max_new_tokens": 256})
    events = list(stream.events())
    stream.close()
    assert {name for name, _ in events[:-1]} <= {"chunk"}
    name, data = events[-1]
    assert name == "error" and data["status"] == 504 and "GENERATE_TIMEOUT_SECONDS" in data["detail"]


def test_a_request_that_times_out_still_queued_answers_503_with_retry_after(
    base_version, live_server, settings, monkeypatch
):
    """Overload, not slowness: nothing was generated for it, so the client is told to come back."""
    settings.INFERENCE_MAX_BATCH = 1
    engine = loader.model_get(base_version).engine
    slow_steps(engine, monkeypatch)
    tokenizer = loader.model_get(base_version).tokenizer
    blocker = engine.submit(
        prompt_ids=tokenizer("Describe a scarf.")["input_ids"],
        sampling=GenerationParams(temperature=1.0, seed=1),
        max_new_tokens=256,
        timeout=30,
    )
    assert eventually(lambda: engine.load() == (1, 0))
    settings.GENERATE_TIMEOUT_SECONDS = 0.3
    status, headers, body = _post(live_server, {"product": PRODUCT, "max_new_tokens": 4})
    blocker.cancel()
    assert status == 503 and "overloaded" in body["detail"]
    assert int(headers["Retry-After"]) >= 1


def test_stop_sequences_over_http(base_version, live_server):
    status, _, body = _post(live_server, SAMPLED)
    text = body["choices"][0]["text"]
    stop = text[10:14]
    assert status == 200 and len(text) > 20 and text.find(stop) == 10
    cut = text[:10].rstrip()
    for form in (stop, [stop, "no such text"]):
        status, _, body = _post(live_server, {**SAMPLED, "stop": form})
        assert status == 200
        assert body["choices"] == [{"index": 0, "text": cut, "finish_reason": "stop"}]
    stream = _Stream(live_server, {**SAMPLED, "stop": [stop]})
    events = list(stream.events())
    stream.close()
    assert "".join(data["text"] for name, data in events if name == "chunk") == cut
    assert events[-1][1]["choices"] == [{"index": 0, "text": cut, "finish_reason": "stop"}]


def test_concurrent_seeded_requests_are_reproducible(base_version, live_server, monkeypatch):
    seeds = [5, 5, 6, 5, 7, 6]
    answers = {}
    expected = {seed: _post(live_server, {**SAMPLED, "seed": seed})[2]["choices"] for seed in set(seeds)}
    assert len({json.dumps(choices) for choices in expected.values()}) == 3
    engine = loader.model_get(base_version).engine
    slow_steps(engine, monkeypatch, 0.01)  # the requests surely overlap

    def ask(i, seed):
        answers[i] = _post(live_server, {**SAMPLED, "seed": seed})

    threads = [threading.Thread(target=ask, args=(i, seed)) for i, seed in enumerate(seeds)]
    for thread in threads:
        thread.start()
    batch_sizes = []
    while any(thread.is_alive() for thread in threads):
        batch_sizes.append(engine.load()[0])
        time.sleep(0.005)
    assert len(answers) == len(seeds)
    assert max(batch_sizes) > 1, "the requests never shared a batch: this test proved nothing"
    for i, seed in enumerate(seeds):
        status, _, body = answers[i]
        assert status == 200 and body["seed"] == seed and body["choices"] == expected[seed]


def test_activating_another_version_under_load_loses_no_request(base_version, loras, live_server):
    new = version_approve(version=loras[1])  # anonymous clients may name released versions only
    body = {"product": PRODUCT, "max_new_tokens": 12}
    expected = {
        v.name: _post(live_server, {**body, "model_version": v.name})[2]["choices"] for v in (base_version, new)
    }
    assert expected[base_version.name] != expected[new.name], "the versions must answer differently"
    results, errors, done = [], [], threading.Event()

    def client(streaming):
        try:
            while not done.is_set():
                started = time.monotonic()
                if streaming:
                    stream = _Stream(live_server, body)
                    status, header = stream.response.status, stream.response.getheader("X-Model-Version")
                    answer = list(stream.events())[-1][1]
                    stream.close()
                else:
                    status, headers, answer = _post(live_server, body)
                    header = headers["X-Model-Version"]
                results.append((started, time.monotonic(), status, header, answer))
        except Exception as exc:  # reported below: an exception in a thread would pass silently
            errors.append(exc)

    clients = [threading.Thread(target=client, args=(i == 0,)) for i in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(0.5)
    activating = time.monotonic()
    version_activate(version=new)
    activated = time.monotonic()
    time.sleep(2.0)
    done.set()
    for thread in clients:
        thread.join(timeout=30)
    assert not errors
    assert [result for result in results if result[2] != 200] == []
    for *_, header, answer in results:
        name = answer["model_version"]["name"]
        assert header == name and answer["choices"] == expected[name]
    before = {answer["model_version"]["name"] for _, finished, *_, answer in results if finished < activating}
    late = {answer["model_version"]["name"] for started, *_, answer in results if started > activated + 1}
    assert before == {base_version.name} and late == {new.name}

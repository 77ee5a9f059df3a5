import json

import pytest

from finetuning.models import ModelVersion
from inference import loader
from tests.worker import wait_for

URL = "/api/generate"
PRODUCT = {"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey"}


@pytest.fixture
def post(client, auth):
    def send(body, **kwargs):
        return client.post(URL, data=json.dumps(body), content_type="application/json", **{**auth, **kwargs})

    return send


def test_generate_from_a_product_with_the_active_version(base_version, post):
    response = post({"product": PRODUCT, "max_new_tokens": 12})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["model_version"] == {"id": base_version.pk, "name": base_version.name}
    [choice] = body["choices"]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 10 and 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert set(body["timings"]) >= {"load_ms", "generate_ms", "total_ms"}


def test_greedy_generation_is_repeatable_and_free_prompts_work(base_version, post):
    first = post({"prompt": "Describe a scarf.", "max_new_tokens": 10}).json()
    second = post({"prompt": "Describe a scarf.", "max_new_tokens": 10}).json()
    assert first["choices"] == second["choices"]
    assert first["seed"] is None


def test_sampling_with_a_seed_is_reproducible(base_version, post):
    body = {"product": PRODUCT, "max_new_tokens": 16, "temperature": 1.5, "top_k": 50, "top_p": 0.95, "seed": 11}
    a, b = post(body).json(), post(body).json()
    assert a["choices"] == b["choices"] and a["seed"] == 11
    others = {post({**body, "seed": seed}).json()["choices"][0]["text"] for seed in (1, 2, 3)}
    assert len(others | {a["choices"][0]["text"]}) > 1


def test_several_sequences(base_version, post):
    response = post({"product": PRODUCT, "max_new_tokens": 8, "temperature": 1.0, "num_return_sequences": 3, "seed": 1})
    assert [c["index"] for c in response.json()["choices"]] == [0, 1, 2]


def test_a_named_version_answers(base_version, post):
    response = post({"product": PRODUCT, "max_new_tokens": 4, "model_version": base_version.name})
    assert response.json()["model_version"]["name"] == base_version.name
    by_id = post({"product": PRODUCT, "max_new_tokens": 4, "model_version": str(base_version.pk)})
    assert by_id.status_code == 200


def test_an_unknown_version_is_a_404_naming_the_field(base_version, post):
    response = post({"product": PRODUCT, "model_version": "nope"})
    assert response.status_code == 404
    assert response.json() == {"detail": "model_version: no model version named 'nope'"}
    # "²" is a digit to str.isdigit(), not to int(): a name, not an id.
    assert post({"product": PRODUCT, "model_version": "²"}).status_code == 404


def test_a_temperature_below_the_sampling_minimum_decodes_greedily(base_version, post):
    tiny = post({"prompt": "Describe a scarf.", "max_new_tokens": 8, "temperature": 2.5e-293}).json()
    greedy = post({"prompt": "Describe a scarf.", "max_new_tokens": 8}).json()
    assert tiny["seed"] is None and tiny["choices"] == greedy["choices"]


def test_unknown_product_attributes_reach_the_model(base_version, post):
    response = post({"product": {**PRODUCT, "material": "recycled mesh"}, "max_new_tokens": 2})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "body, field",
    [
        ({"product": PRODUCT, "max_new_tokens": 0}, "max_new_tokens"),
        ({"product": PRODUCT, "max_new_tokens": 100000}, "max_new_tokens"),
        ({"product": PRODUCT, "max_new_tokens": "many"}, "max_new_tokens"),
        ({"product": PRODUCT, "max_new_tokens": 1.5}, "max_new_tokens"),
        ({"product": PRODUCT, "temperature": -0.1}, "temperature"),
        ({"product": PRODUCT, "temperature": 9}, "temperature"),
        ({"product": PRODUCT, "temperature": "hot"}, "temperature"),
        ({"product": PRODUCT, "temperature": "0.5"}, "temperature"),
        ({"product": PRODUCT, "max_new_tokens": "12"}, "max_new_tokens"),
        ({"product": PRODUCT, "stream": "yes"}, "stream"),
        ({"product": PRODUCT, "stop": ["x"] * 5}, "stop"),
        ({"product": PRODUCT, "max_tokens": 12}, "max_tokens"),
        ({"product": PRODUCT, "n": 2}, "n"),
        ({"product": {**PRODUCT, "name": 5}}, "product"),
        ({"product": {**PRODUCT, "name": "   "}}, "product"),
        ({"product": {**PRODUCT, "Heel height": "3 cm"}}, "product"),
        ({"product": {**PRODUCT, **{f"extra_{i}": "x" for i in range(30)}}}, "product"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": " \n\t"}, "prompt"),
        ({"product": PRODUCT, "top_p": 0}, "top_p"),
        ({"product": PRODUCT, "top_p": 1.5}, "top_p"),
        ({"product": PRODUCT, "top_k": -1}, "top_k"),
        ({"product": PRODUCT, "top_k": 5000}, "top_k"),
        ({"product": PRODUCT, "repetition_penalty": 0.5}, "repetition_penalty"),
        ({"product": PRODUCT, "repetition_penalty": 5}, "repetition_penalty"),
        ({"product": PRODUCT, "seed": -1}, "seed"),
        ({"product": PRODUCT, "seed": "abc"}, "seed"),
        ({"product": PRODUCT, "seed": 2**40}, "seed"),
        ({"product": PRODUCT, "num_return_sequences": 0}, "num_return_sequences"),
        ({"product": PRODUCT, "num_return_sequences": 99, "temperature": 1}, "num_return_sequences"),
        ({"product": PRODUCT, "num_return_sequences": 2}, "num_return_sequences"),
        ({"product": "shoe"}, "product"),
        ({"product": {"color": "Grey"}}, "product"),
        ({"product": {**PRODUCT, "price": "cheap"}}, "product"),
        ({"product": {**PRODUCT, "features": "not a list"}}, "product"),
        ({"product": {**PRODUCT, "fit": {"deep": 1}}}, "product"),
        ({"product": PRODUCT, "prompt": "both"}, "product"),
        ({}, "product"),
        ({"prompt": ""}, "prompt"),
        ({"product": PRODUCT, "fact_guard": "sometimes"}, "fact_guard"),
        ({"product": PRODUCT, "no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"product": PRODUCT, "no_repeat_ngram_size": 65}, "no_repeat_ngram_size"),
        ({"product": PRODUCT, "no_repeat_ngram_size": "4"}, "no_repeat_ngram_size"),
        ({"product": PRODUCT, "min_new_tokens": -1}, "min_new_tokens"),
        ({"product": PRODUCT, "min_new_tokens": 500}, "min_new_tokens"),
        ({"prompt": "x" * 100_000}, "prompt"),
    ],
)
def test_each_invalid_parameter_gets_a_400_naming_it(base_version, post, body, field):
    response = post(body)
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()


def test_a_borrowed_field_name_is_named_with_the_one_meant(base_version, post):
    response = post({"product": PRODUCT, "max_tokens": 12, "model": "x"})
    assert response.json() == {
        "max_tokens": ["unknown field; did you mean 'max_new_tokens'?"],
        "model": ["unknown field; did you mean 'model_version'?"],
    }


@pytest.mark.parametrize("raw", ['{"product": ', "[1, 2]", '"text"', '{"product": {"name": "x"}, "temperature": NaN}'])
def test_malformed_bodies_get_a_400_json_error(base_version, client, auth, raw):
    response = client.post(URL, data=raw, content_type="application/json", **auth)
    assert response.status_code == 400
    assert response.json()


def test_a_non_json_body_is_refused_with_a_4xx(base_version, client, auth):
    response = client.post(URL, data="name=x", content_type="application/x-www-form-urlencoded", **auth)
    assert response.status_code == 415
    assert "detail" in response.json()


def test_a_prompt_too_long_for_the_context_is_a_400(base_version, post, settings):
    response = post({"prompt": "word " * 790, "max_new_tokens": 200})
    assert response.status_code == 400
    assert "context" in response.json()["prompt"][0]


def test_no_active_version_is_a_503_not_a_500(db, post):
    response = post({"product": PRODUCT})
    assert response.status_code == 503
    assert "no model version is active" in response.json()["detail"]


def test_a_damaged_artifact_is_a_503(base_version, post, model_store):
    (model_store / base_version.artifact_path / "config.json").write_text("{}")
    response = post({"product": PRODUCT, "max_new_tokens": 2})
    assert response.status_code == 503
    assert "sha256" in response.json()["detail"]


def test_models_lists_versions_and_the_active_one(base_version, client, auth):
    body = client.get("/api/models", **auth).json()
    assert body["active"] == {"id": base_version.pk, "name": base_version.name}
    assert [v["name"] for v in body["versions"]] == [base_version.name]
    assert body["versions"][0]["is_active"] is True


def test_health_and_ready(base_version, client):
    assert client.get("/api/health").status_code == 200
    loader.model_get(base_version)  # as the web process's warm-up leaves it
    ready = client.get("/api/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_not_ready_without_an_active_version(db, client):
    response = client.get("/api/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["model"] == "no active model version"


@pytest.mark.django_db(transaction=True)  # the warm-up thread reads the active version
def test_not_ready_when_the_active_model_cannot_load(base_version, client, model_store):
    (model_store / base_version.artifact_path / "model.safetensors").unlink()
    response = client.get("/api/ready")
    assert response.status_code == 503 and response.json()["ready"] is False

    def reason():
        return client.get("/api/ready").json()["checks"]["model"]

    # The probe started the load; once it failed, the probe says why (no server paths).
    assert wait_for(lambda: "cannot be loaded" in reason(), timeout=30)
    assert "model.safetensors is missing" in reason() and str(model_store) not in reason()
    assert ModelVersion.objects.get(is_active=True) == base_version

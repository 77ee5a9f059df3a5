"""POST/GET /api/jobs: start, watch and cancel fine-tuning jobs over HTTP."""

import base64

import pytest
from django.contrib.auth.models import Permission

from finetuning.models import FineTuningJob
from finetuning.services.jobs import job_execute

FAST = {"max_steps": 2, "batch_size": 4, "max_seq_length": 128}


def _basic(username, password):
    return {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


@pytest.fixture
def trainer(django_user_model):
    """A script's user: HTTP Basic, with the job permissions and nothing more."""
    user = django_user_model.objects.create_user("trainer", password="s3cret-pass")
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["add_finetuningjob", "view_finetuningjob", "change_finetuningjob"])
    )
    return _basic("trainer", "s3cret-pass")


def test_a_job_is_started_watched_and_finishes_over_the_api(client, trainer, base_version, dataset_factory):
    dataset = dataset_factory()
    response = client.post(
        "/api/jobs", {"dataset": dataset.name, "hyperparameters": FAST}, content_type="application/json", **trainer
    )
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "queued" and body["dataset"] == "shop" and body["hyperparameters"]["max_steps"] == 2
    assert body["snapshot"]["examples"] == 24 and len(body["snapshot"]["sha256"]) == 64
    assert body["time_limit_seconds"] > 0 and body["model_version"] is None

    job_execute(job_id=body["id"])  # what the worker does
    done = client.get(f"/api/jobs/{body['id']}", **trainer).json()
    assert done["status"] == "succeeded" and done["progress"] == 1.0 and done["step"] == 2
    assert done["model_version"]["name"] == f"shop-job{body['id']}"
    assert len(done["loss_history"]) == 2 and done["metrics"]["final_train_loss"] > 0
    assert done["environment"]["device"] == "cpu" and done["wall_seconds"] > 0
    assert [job["id"] for job in client.get("/api/jobs", **trainer).json()] == [body["id"]]


def test_bad_requests_name_the_field_and_queue_nothing(client, trainer, base_version, dataset_factory):
    dataset_factory()

    def post(body):
        return client.post("/api/jobs", body, content_type="application/json", **trainer)

    bad = post({"dataset": "shop", "hyperparameters": {"learning_rate": 3, "method": "magic", "colour": 1}})
    assert bad.status_code == 400
    assert set(bad.json()["hyperparameters"]) == {"learning_rate", "method", "colour"}
    assert "between" in bad.json()["hyperparameters"]["learning_rate"][0]
    missing = post({"dataset": "nope"})
    assert missing.status_code == 404 and missing.json() == {"detail": "dataset: no dataset named 'nope'"}
    assert post({}).status_code == 400
    unknown = post({"retrain": "no-such-version"})
    assert unknown.status_code == 404 and "no model version named 'no-such-version'" in unknown.json()["detail"]
    typed = post({"dataset": "shop", "hyperparameters": {"epochs": "3"}, "max_tokens": 5})
    assert typed.status_code == 400
    assert typed.json() == {
        "hyperparameters": {"epochs": ["A valid integer is required."]},
        "max_tokens": ["unknown field"],
    }
    assert not FineTuningJob.objects.exists()


def test_an_empty_dataset_is_a_conflict_not_a_bad_request(client, trainer, base_version):
    from finetuning.models import Dataset

    Dataset.objects.create(name="empty")
    response = client.post("/api/jobs", {"dataset": "empty"}, content_type="application/json", **trainer)
    assert response.status_code == 409 and "no examples" in response.json()["detail"]


def test_a_second_start_on_a_busy_dataset_is_a_conflict(client, trainer, base_version, dataset_factory):
    dataset_factory()
    body = {"dataset": "shop", "hyperparameters": FAST}
    first = client.post("/api/jobs", body, content_type="application/json", **trainer)
    second = client.post("/api/jobs", body, content_type="application/json", **trainer)
    assert first.status_code == 202 and second.status_code == 409
    assert f"job {first.json()['id']}" in second.json()["detail"]


def test_cancel_over_the_api(client, trainer, base_version, dataset_factory):
    dataset_factory()
    job = client.post("/api/jobs", {"dataset": "shop"}, content_type="application/json", **trainer).json()
    cancelled = client.post(f"/api/jobs/{job['id']}/cancel", **trainer)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/api/jobs/{job['id']}/cancel", **trainer)
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    assert client.post("/api/jobs/999/cancel", **trainer).status_code == 404


def test_retrain_over_the_api_reuses_the_versions_recipe(client, trainer, base_version, dataset_factory):
    dataset_factory()
    first = client.post(
        "/api/jobs", {"dataset": "shop", "hyperparameters": FAST}, content_type="application/json", **trainer
    ).json()
    version = job_execute(job_id=first["id"])
    again = client.post("/api/jobs", {"retrain": version.name}, content_type="application/json", **trainer)
    assert again.status_code == 202
    assert again.json()["snapshot"] == first["snapshot"] and again.json()["hyperparameters"] == first["hyperparameters"]


def test_jobs_need_an_authenticated_user_with_the_job_permission(
    client, django_user_model, base_version, dataset_factory
):
    dataset_factory()
    body = {"dataset": "shop"}
    anonymous = client.post("/api/jobs", body, content_type="application/json")
    assert anonymous.status_code == 401
    assert anonymous["WWW-Authenticate"] == 'Bearer realm="genapi", Basic realm="genapi"'

    django_user_model.objects.create_user("reader", password="s3cret-pass")
    reader = _basic("reader", "s3cret-pass")
    assert client.post("/api/jobs", body, content_type="application/json", **reader).status_code == 403
    assert client.get("/api/jobs", **reader).status_code == 403
    assert (
        client.post("/api/jobs", body, content_type="application/json", **_basic("reader", "wrong")).status_code == 401
    )
    assert not FineTuningJob.objects.exists()

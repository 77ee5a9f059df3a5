"""Jobs and evaluations in /metrics, read from the database at scrape time, and the workers'
heartbeats that /api/ready reads."""

import time
from unittest import mock

import pytest
from django.db import OperationalError, connection
from prometheus_client.parser import text_string_to_metric_families

from finetuning.models import Evaluation, FineTuningJob
from finetuning.services.jobs import job_cancel, job_execute, job_start
from finetuning.services.workers import work_claim
from genapi.health import worker_check, worker_heartbeat_start, worker_seen_get, worker_seen_record

FAST = {"max_steps": 2, "batch_size": 4, "max_seq_length": 128}


def gauges(client):
    """{(name, labels as a sorted tuple): value} of the gauges /metrics shows now."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def jobs(values, state):
    return values[("genapi_jobs", (("state", state),))]


def test_a_job_changing_state_moves_the_job_gauges(client, dataset_factory, base_version):
    start = gauges(client)
    assert jobs(start, "queued") == jobs(start, "running") == jobs(start, "succeeded") == 0
    assert start[("genapi_evaluations", (("state", "queued"),))] == 0

    job = job_start(dataset=dataset_factory(name="shop"), hyperparameters=FAST)
    queued = gauges(client)
    assert jobs(queued, "queued") == 1 and jobs(queued, "running") == 0

    other = job_start(dataset=dataset_factory(name="toys"), hyperparameters=FAST)
    assert work_claim(FineTuningJob, other.pk)  # a worker took it
    FineTuningJob.objects.filter(pk=other.pk).update(step=3, total_steps=8)  # as its progress meter writes
    running = gauges(client)
    assert jobs(running, "queued") == 1 and jobs(running, "running") == 1
    assert running[("genapi_job_step", (("job", str(other.pk)),))] == 3
    assert running[("genapi_job_total_steps", (("job", str(other.pk)),))] == 8

    assert job_execute(job_id=job.pk) is not None
    job_cancel(job=other)
    FineTuningJob.objects.filter(pk=other.pk).update(status="cancelled")  # as its worker ends it
    done = gauges(client)
    assert jobs(done, "queued") == jobs(done, "running") == 0
    assert jobs(done, "succeeded") == 1 and jobs(done, "cancelled") == 1
    # A job that no longer runs leaves the step series.
    assert not any(name == "genapi_job_step" for name, _ in done)
    evaluations = {state: done[("genapi_evaluations", (("state", state),))] for state in Evaluation.Status.values}
    assert sum(evaluations.values()) == Evaluation.objects.count()


def test_an_unreadable_database_says_so_instead_of_failing_the_scrape(client, db):
    failing = mock.Mock(side_effect=OperationalError("could not connect to server"))
    with mock.patch.multiple(connection, ensure_connection=failing, cursor=failing, chunked_cursor=failing):
        values = gauges(client)
    assert values[("genapi_database_up", ())] == 0
    assert not any(name == "genapi_jobs" for name, _ in values)
    assert any(name == "genapi_http_requests_total" for name, _ in values)  # the process's metrics are still there


@pytest.fixture
def stamps_in(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    return tmp_path


def test_a_worker_heartbeat_is_stamped_at_start_and_read_back(stamps_in, settings):
    settings.WORKER_HEARTBEAT_SECONDS = 0.05
    assert worker_check(FineTuningJob) == "no training worker has been seen"
    stop = worker_heartbeat_start(["training"])
    try:
        first = worker_seen_get("training")
        assert first is not None and "pid" in first["worker"]
        assert worker_check(FineTuningJob).startswith("ok: ")
        assert worker_check(Evaluation) == "no evaluation worker has been seen"  # it consumes no evaluation queue
        # It keeps beating.
        deadline = time.monotonic() + 5
        while worker_seen_get("training")["at"] == first["at"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker_seen_get("training")["at"] > first["at"]
    finally:
        stop.set()


def test_worker_stamps_go_to_a_shared_cache_when_there_is_one(stamps_in, settings):
    from django.core.cache import cache

    if not settings.CELERY_BROKER_URL.startswith("redis://"):
        pytest.skip("needs a Redis server: CELERY_BROKER_URL=redis://...")
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": settings.CELERY_BROKER_URL}
    }
    cache.delete("genapi:worker-seen:evaluation")
    try:
        assert worker_check(Evaluation) == "no evaluation worker has been seen"
        worker_seen_record(["evaluation"])
        assert cache.get("genapi:worker-seen:evaluation")["worker"]
        assert worker_check(Evaluation).startswith("ok: ")
    finally:
        cache.delete("genapi:worker-seen:evaluation")
    assert not (stamps_in / "celery" / "workers").exists()  # no file: the cache is the one place

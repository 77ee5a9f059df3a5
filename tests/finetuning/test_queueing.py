"""Handing work to the broker, and what happens when it is down or loses it: a start
that cannot reach it answers 503 and leaves nothing blocking the dataset, and a job
or evaluation whose task is gone is sent again or failed with a reason, never left
queued for good. Uses the configured broker (Redis in CI) and a port nobody serves."""

import socket
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from finetuning.models import Evaluation, FineTuningJob
from finetuning.services.jobs import JobNotQueued, job_execute, job_start, jobs_recheck_queued
from genapi.celery import app

FAST = {"max_steps": 2, "batch_size": 4, "max_seq_length": 128}
JOB_RUN = "finetuning.tasks.job_run"
EVALUATION_RUN = "finetuning.tasks.evaluation_run"


def _drain(queue_name="training"):
    """(task name, args) of every message in a queue (jobs go to "training"), taken off it."""
    sent = []
    # Read through the read URL: the tests break only the one tasks are sent through.
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(queue_name, no_ack=True)
        try:
            while True:
                message = queue.get_nowait()
                sent.append((message.headers["task"], message.decode()[0]))
        except queue.Empty:
            pass
        finally:
            queue.close()
    return sent


@pytest.fixture
def training_queue():
    """The real training and evaluation queues, empty before and after the test: read them with ``_drain``."""
    _drain(), _drain("evaluation")
    yield
    _drain(), _drain("evaluation")


def _broker_down(monkeypatch):
    """Tasks are sent to a port nobody listens on: the client's own 'connection refused'."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("CELERY_BROKER_WRITE_URL", f"redis://127.0.0.1:{port}/0")
    return port


@pytest.fixture
def broker_down(monkeypatch):
    return _broker_down(monkeypatch)


@pytest.fixture
def broker_hung(monkeypatch):
    """A broker that accepts connections and never answers (a half-dead host, a firewall)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        monkeypatch.setenv("CELERY_BROKER_WRITE_URL", f"redis://127.0.0.1:{server.getsockname()[1]}/0")
        yield


@pytest.fixture
def trainer(django_user_model):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("trainer")
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["add_finetuningjob", "view_finetuningjob", "change_finetuningjob"])
    )
    return user


def _post(client, body):
    return client.post("/api/jobs", body, content_type="application/json")


@pytest.mark.django_db(transaction=True)  # sent as the request commits, as in production
def test_a_start_that_cannot_reach_the_broker_answers_503_and_leaves_the_dataset_free(
    client, trainer, base_version, dataset_factory, training_queue, monkeypatch
):
    client.force_login(trainer)
    dataset_factory()
    first = _post(client, {"dataset": "shop", "hyperparameters": FAST})
    assert first.status_code == 202 and _drain() == [(JOB_RUN, [first.json()["id"]])]
    version = job_execute(job_id=first.json()["id"])
    assert [task for task, _ in _drain("evaluation")] == [EVALUATION_RUN]  # its own queue: never ahead of a job

    port = str(_broker_down(monkeypatch))
    began = time.monotonic()
    down = _post(client, {"dataset": "shop", "hyperparameters": FAST})
    assert time.monotonic() - began < 5
    assert down.status_code == 503 and down["Retry-After"] == "30"
    detail = down.json()["detail"]
    assert "task broker is not reachable" in detail and "try again" in detail
    assert not any(leak in down.content.decode() for leak in (port, "127.0.0.1", "redis", "Error 111", "refused"))
    failed = FineTuningJob.objects.exclude(pk=first.json()["id"]).get()
    assert f"job {failed.pk} could not be queued" in detail
    assert failed.status == "failed" and failed.finished_at
    assert failed.error.startswith("not queued: the task broker could not be reached")
    retrain = _post(client, {"retrain": version.name})
    assert retrain.status_code == 503 and "task broker is not reachable" in retrain.json()["detail"]
    assert _drain() == []

    monkeypatch.delenv("CELERY_BROKER_WRITE_URL")  # the broker is back: nothing blocks the dataset
    again = _post(client, {"dataset": "shop", "hyperparameters": FAST})
    assert again.status_code == 202 and again.json()["status"] == "queued"
    assert _drain() == [(JOB_RUN, [again.json()["id"]])]
    assert FineTuningJob.objects.filter(status="failed").count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_broker_that_never_answers_fails_the_start_within_the_timeout(
    base_version, dataset_factory, broker_hung, settings
):
    settings.JOB_PUBLISH_TIMEOUT_SECONDS = 1
    dataset = dataset_factory()
    began = time.monotonic()
    with pytest.raises(JobNotQueued, match="task broker is not reachable"):
        job_start(dataset=dataset, hyperparameters=FAST)
    assert time.monotonic() - began < 4
    job = FineTuningJob.objects.get()
    assert job.status == "failed" and "could not be reached" in job.error


@pytest.mark.django_db(transaction=True)
def test_the_admin_says_the_broker_is_down_and_the_dataset_stays_free(
    admin_client, base_version, dataset_factory, broker_down
):
    from django.urls import reverse

    from finetuning.forms import FineTuneForm

    dataset = dataset_factory()
    form = {name: field.initial for name, field in FineTuneForm().fields.items()}
    response = admin_client.post(reverse("admin:finetuning_dataset_finetune", args=[dataset.pk]), form)
    assert response.status_code == 200
    assert "task broker is not reachable" in str(response.context["form"].non_field_errors())
    assert FineTuningJob.objects.get().status == "failed"


def test_a_queued_job_whose_task_is_gone_is_sent_again(base_version, dataset_factory, settings, training_queue):
    settings.JOB_QUEUED_RECHECK_SECONDS = 300
    # Inside the test's transaction the task is never sent: as if the broker lost it.
    job = job_start(dataset=dataset_factory(), hyperparameters=FAST)
    assert jobs_recheck_queued() == ([], []) and _drain() == []  # young: it may be on its way

    FineTuningJob.objects.filter(pk=job.pk).update(enqueued_at=timezone.now() - timedelta(seconds=301))
    assert jobs_recheck_queued() == ([job.pk], [])
    assert _drain() == [(JOB_RUN, [job.pk])]
    job.refresh_from_db()
    assert job.status == "queued" and job.requeue_count == 1
    assert jobs_recheck_queued() == ([], [])  # sent again just now
    assert job_execute(job_id=job.pk) is not None and job_execute(job_id=job.pk) is None  # duplicates run once


def test_a_job_no_worker_takes_is_failed_with_a_reason_but_one_waiting_in_line_is_not(
    base_version, dataset_factory, settings, training_queue
):
    settings.JOB_QUEUED_RECHECK_SECONDS = 300
    settings.JOB_QUEUED_TIMEOUT_SECONDS = 600
    now = timezone.now()
    running = job_start(dataset=dataset_factory(name="running"), hyperparameters=FAST)
    FineTuningJob.objects.filter(pk=running.pk).update(
        status="running", started_at=now - timedelta(hours=3), heartbeat_at=now
    )
    waiting = job_start(dataset=dataset_factory(name="waiting"), hyperparameters=FAST)
    FineTuningJob.objects.filter(pk=waiting.pk).update(
        created_at=now - timedelta(hours=2), enqueued_at=now - timedelta(hours=2)
    )
    # In line behind a three-hour job on the only worker: sent again, not failed.
    assert jobs_recheck_queued() == ([waiting.pk], [])
    assert _drain() == [(JOB_RUN, [waiting.pk])]

    # The worker has taken nothing for longer than the timeout: nobody is listening.
    FineTuningJob.objects.filter(pk=running.pk).update(status="succeeded", finished_at=now - timedelta(seconds=601))
    assert jobs_recheck_queued() == ([], [waiting.pk])
    waiting.refresh_from_db()
    assert waiting.status == "failed" and waiting.finished_at
    assert waiting.error.startswith("never picked up: queued for more than 600 s (its task sent 2 times)")
    assert "worker consumes the training queue" in waiting.error and waiting.error.endswith("Start the job again.")
    assert job_start(dataset=waiting.dataset, hyperparameters=FAST).status == "queued"  # the dataset is free


def test_a_worker_that_starts_sends_every_queued_job_again_and_fails_none(
    base_version, dataset_factory, settings, training_queue
):
    settings.JOB_QUEUED_TIMEOUT_SECONDS = 600
    job = job_start(dataset=dataset_factory(), hyperparameters=FAST)
    FineTuningJob.objects.filter(pk=job.pk).update(created_at=timezone.now() - timedelta(hours=2))
    # Idle for hours, but a worker is here now: it gets the job rather than its failure.
    assert jobs_recheck_queued(worker_start=True) == ([job.pk], [])
    assert _drain() == [(JOB_RUN, [job.pk])]


def test_the_check_leaves_a_job_queued_while_the_broker_is_down(base_version, dataset_factory, broker_down):
    job = job_start(dataset=dataset_factory(), hyperparameters=FAST)
    FineTuningJob.objects.filter(pk=job.pk).update(enqueued_at=timezone.now() - timedelta(days=1))
    assert jobs_recheck_queued() == ([], [])
    job.refresh_from_db()
    assert job.status == "queued" and job.requeue_count == 1  # tried, and tried again at the next check


@pytest.mark.django_db(transaction=True)
def test_an_evaluation_that_cannot_be_queued_fails_once_with_the_reason_and_can_be_run_again(
    base_version, dataset_factory, training_queue, monkeypatch
):
    from finetuning.services.evaluations import evaluation_start, evaluations_recheck_queued

    dataset = dataset_factory()
    held = list(dataset.examples.order_by("id").values_list("id", flat=True)[:6])
    dataset.examples.filter(id__in=held).update(split="validation")
    job = job_start(dataset=dataset, hyperparameters=FAST)
    _broker_down(monkeypatch)
    version = job_execute(job_id=job.pk)  # its evaluation is queued as the version commits
    assert version is not None
    evaluation = Evaluation.objects.get(version=version)  # one, not a second "not evaluated" row
    assert evaluation.status == "failed" and evaluation.error.startswith("not queued: the task broker")

    monkeypatch.delenv("CELERY_BROKER_WRITE_URL")
    again = evaluation_start(version=version)
    assert again.status == "queued"
    assert _drain("evaluation") == [(EVALUATION_RUN, [again.pk])]
    assert EVALUATION_RUN not in [task for task, _ in _drain()]  # nothing of it in the training queue
    Evaluation.objects.filter(pk=again.pk).update(enqueued_at=timezone.now() - timedelta(days=1))
    assert evaluations_recheck_queued() == ([again.pk], [])  # its task lost: sent again
    assert _drain("evaluation") == [(EVALUATION_RUN, [again.pk])]


# --- The queue as curators read it -------------------------------------------------------


def test_queued_work_says_its_place_and_what_is_ahead(base_version, dataset_factory, settings):
    from finetuning.services.workers import queue_words

    now = timezone.now()
    running = job_start(dataset=dataset_factory(name="running"), hyperparameters=FAST)
    FineTuningJob.objects.filter(pk=running.pk).update(
        status="running", started_at=now, step=4, total_steps=10, eta_seconds=240
    )
    second = job_start(dataset=dataset_factory(name="second"), hyperparameters=FAST)
    third = job_start(dataset=dataset_factory(name="third"), hyperparameters=FAST)
    assert queue_words(second) == (
        f"2nd in the training queue, behind job {running.pk} (running, about 4 min 00 s left); "
        "starts in about 4 min 00 s"
    )
    # No job has run yet: how long the second one takes is unknown, so is when the third starts.
    assert queue_words(third) == (
        f"3rd in the training queue, behind job {running.pk} (running, about 4 min 00 s left), job {second.pk} (queued)"
    )
    running.refresh_from_db()
    assert queue_words(running) == ""  # not waiting: nothing to say

    # An earlier job measured the speed: the wait adds up.
    done = job_start(dataset=dataset_factory(name="done"), hyperparameters=FAST)
    FineTuningJob.objects.filter(pk=done.pk).update(
        status="succeeded", started_at=now - timedelta(minutes=5), finished_at=now - timedelta(minutes=4),
        metrics={"train_seconds": 60.0, "steps": 2},
    )  # fmt: skip
    third.refresh_from_db()
    assert queue_words(third).endswith(f"job {second.pk} (queued); starts in about 5 min 00 s")  # 240 s + 2 x 30 s


def test_an_evaluation_waits_only_behind_evaluations(base_version, dataset_factory):
    from finetuning.services.evaluations import evaluation_start
    from finetuning.services.workers import queue_words

    dataset = dataset_factory()
    dataset.examples.filter(id__in=list(dataset.examples.values_list("id", flat=True)[:4])).update(split="validation")
    version = job_execute(job_id=job_start(dataset=dataset, hyperparameters=FAST).pk)
    busy = job_start(dataset=dataset_factory(name="busy"), hyperparameters=FAST)
    FineTuningJob.objects.filter(pk=busy.pk).update(status="running", started_at=timezone.now(), eta_seconds=600)
    evaluation = evaluation_start(version=version, automatic=True)
    assert queue_words(evaluation) == "next in the evaluation queue, nothing ahead of it"
    # And a job queued after it does not wait for it.
    waiting = job_start(dataset=dataset_factory(name="waiting"), hyperparameters=FAST)
    assert f"behind job {busy.pk}" in queue_words(waiting) and "evaluation" not in queue_words(waiting)


def test_the_lists_and_pages_say_where_queued_work_stands(admin_client, base_version, dataset_factory):
    from django.urls import reverse

    running = job_start(dataset=dataset_factory(name="running"), hyperparameters=FAST)
    FineTuningJob.objects.filter(pk=running.pk).update(status="running", started_at=timezone.now(), eta_seconds=90)
    waiting = job_start(dataset=dataset_factory(name="waiting"), hyperparameters=FAST)
    listing = admin_client.get(reverse("admin:finetuning_finetuningjob_changelist")).content.decode()
    assert f"2nd in the training queue, behind job {running.pk} (running, about 1 min 30 s left)" in listing
    assert "about 1 min 30 s left" in listing
    page = admin_client.get(reverse("admin:finetuning_finetuningjob_change", args=[waiting.pk])).content.decode()
    assert f"2nd in the training queue, behind job {running.pk}" in page and "starts in about 1 min 30 s" in page

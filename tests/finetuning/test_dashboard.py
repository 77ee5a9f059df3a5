"""The admin home as a dashboard: what is serving, what runs and waits (with its place in
line, time left and a cancel button), and the last day's generations; and the job page's
example counts."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import strip_tags

from finetuning.models import Evaluation, FineTuningJob
from finetuning.services.evaluations import evaluation_start
from finetuning.services.jobs import job_execute, job_start
from inference.models import Generation

FAST = {"max_steps": 2, "batch_size": 4, "max_seq_length": 128}


@pytest.fixture
def trained(base_version, dataset_factory):
    dataset = dataset_factory(name="trained")
    held = list(dataset.examples.order_by("id").values_list("id", flat=True)[:4])
    dataset.examples.filter(id__in=held).update(split="validation")
    return job_execute(job_id=job_start(dataset=dataset, hyperparameters=FAST).pk)


def _generation(total_ms, *, error="", hours_ago=1, prompt_tokens=20, completion_tokens=50):
    row = Generation.objects.create(
        route="api",
        version_name="base",
        output="" if error else "A fine shoe.",
        error=error,
        total_ms=None if error else total_ms,
        prompt_tokens=prompt_tokens,
        completion_tokens=0 if error else completion_tokens,
    )
    Generation.objects.filter(pk=row.pk).update(created_at=timezone.now() - timedelta(hours=hours_ago))
    return row


def test_the_admin_home_shows_what_serves_runs_waits_and_how_generation_went(
    admin_client, base_version, trained, dataset_factory
):
    running = job_start(dataset=dataset_factory(name="running"), hyperparameters=FAST)
    FineTuningJob.objects.filter(pk=running.pk).update(
        status="running", started_at=timezone.now(), step=3, total_steps=12, progress=0.25, eta_seconds=240
    )
    waiting = job_start(dataset=dataset_factory(name="waiting"), hyperparameters=FAST)
    evaluation = evaluation_start(version=trained, automatic=True)
    for total_ms in (100, 200, 300, 400):
        _generation(total_ms)
    _generation(None, error="timeout")
    _generation(5000, hours_ago=30)  # older than a day: not counted

    page = admin_client.get(reverse("admin:index")).content.decode()
    version_url = reverse("admin:finetuning_modelversion_change", args=[base_version.pk])
    assert f'<a href="{version_url}"><strong>{base_version.name}</strong></a>' in page
    work = page.split('id="dashboard-work"')[1].split('id="dashboard-generations"')[0]
    assert f"Job {running.pk}" in work and "dataset running" in work and "3 / 12" in work
    assert "about 4 min 00 s left" in work
    assert f"2nd in the training queue, behind job {running.pk} (running, about 4 min 00 s left)" in work
    assert f"Evaluation {evaluation.pk}" in work and "after its job" in work
    assert "next in the evaluation queue" in work  # evaluations never wait behind training
    assert work.count('value="Cancel"') == 3
    # Running first, then queued in the order they will run.
    assert work.index(f"Job {running.pk}") < work.index(f"Job {waiting.pk}") < work.index(f"Evaluation {evaluation.pk}")
    generations = page.split('id="dashboard-generations"')[1].split("</table>")[0]
    cells = [strip_tags("<td" + cell).strip() for cell in generations.split("<td")[1:]]
    assert cells == ["5", "1", "200 ms", "400 ms", "100", "200"]
    assert "app-finetuning module" in page  # the app list is still there, below


def test_work_is_cancelled_from_the_dashboard_and_the_curator_comes_back_to_it(admin_client, trained):
    evaluation = evaluation_start(version=trained)
    response = admin_client.post(
        reverse("admin:finetuning_evaluation_cancel", args=[evaluation.pk]), {"next": reverse("admin:index")}
    )
    assert response.status_code == 302 and response.url == reverse("admin:index")
    assert Evaluation.objects.get(pk=evaluation.pk).status == "cancelled"
    page = admin_client.get(reverse("admin:index")).content.decode()
    assert f"Evaluation {evaluation.pk} cancelled." in page and "Nothing running or queued." in page
    # Elsewhere than this site: back to the evaluation's page instead.
    again = evaluation_start(version=trained)
    response = admin_client.post(
        reverse("admin:finetuning_evaluation_cancel", args=[again.pk]), {"next": "https://example.com/"}
    )
    assert response.url == reverse("admin:finetuning_evaluation_change", args=[again.pk])


def test_a_staff_user_sees_only_what_they_may(client, django_user_model, base_version, dataset_factory):
    from django.contrib.auth.models import Permission

    job_start(dataset=dataset_factory(), hyperparameters=FAST)
    _generation(100)
    viewer = django_user_model.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_finetuningjob"))
    client.force_login(viewer)
    page = client.get(reverse("admin:index")).content.decode()
    assert "next in the training queue" in page and 'value="Cancel"' not in page  # may look, not cancel
    assert "Generations in the last 24 hours" not in page and "Active version" not in page


def test_a_job_page_shows_examples_trained_skipped_and_truncated_at_the_top(
    admin_client, base_version, dataset_factory
):
    job = job_start(dataset=dataset_factory(), hyperparameters={**FAST, "max_seq_length": 96})
    FineTuningJob.objects.filter(pk=job.pk).update(
        status="succeeded",
        finished_at=timezone.now(),
        metrics={"train_examples": 8, "skipped_examples": 171, "truncated_examples": 3, "steps": 2},
    )
    page = admin_client.get(reverse("admin:finetuning_finetuningjob_change", args=[job.pk])).content.decode()
    counts = page.index("<strong>8</strong> trained on")
    assert counts < page.index("progress") < page.index("Recipe")  # near the top, before the rest
    assert "<strong>171</strong> skipped · <strong>3</strong> truncated" in page
    assert 'class="warning"' in page and "171 examples did not fit in max_seq_length 96" in page
    listing = admin_client.get(reverse("admin:finetuning_finetuningjob_changelist")).content.decode()
    assert "171 examples skipped" in listing

    clean = job_start(dataset=dataset_factory(name="clean"), hyperparameters=FAST)
    FineTuningJob.objects.filter(pk=clean.pk).update(
        status="succeeded", finished_at=timezone.now(), metrics={"train_examples": 22, "skipped_examples": 0}
    )
    page = admin_client.get(reverse("admin:finetuning_finetuningjob_change", args=[clean.pk])).content.decode()
    assert "<strong>22</strong> trained on · <strong>0</strong> skipped" in page and 'class="warning"' not in page

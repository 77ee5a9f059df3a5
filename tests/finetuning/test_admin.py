import pytest
from django.urls import reverse

from finetuning.models import FineTuningJob, ModelVersion, TrainingExample


@pytest.fixture
def curator(admin_client):
    return admin_client


@pytest.fixture
def job(base_version, dataset_factory):
    return FineTuningJob.objects.create(
        dataset=dataset_factory(name="jobs"), base_model="tiny-llama", hyperparameters={}
    )


def test_every_admin_page_renders_for_a_curator(curator, base_version, dataset_factory, job):
    dataset = dataset_factory()
    example = dataset.examples.first()
    pages = [
        reverse("admin:index"),
        reverse("admin:finetuning_dataset_changelist"),
        reverse("admin:finetuning_dataset_change", args=[dataset.pk]),
        reverse("admin:finetuning_dataset_finetune", args=[dataset.pk]),
        reverse("admin:finetuning_trainingexample_changelist"),
        reverse("admin:finetuning_trainingexample_changelist")
        + f"?dataset__id__exact={dataset.pk}&split=unassigned&category=Shoes&source=manual&q=Product",
        reverse("admin:finetuning_trainingexample_add"),
        reverse("admin:finetuning_trainingexample_change", args=[example.pk]),
        reverse("admin:finetuning_finetuningjob_changelist"),
        reverse("admin:finetuning_finetuningjob_change", args=[job.pk]),
        reverse("admin:finetuning_modelversion_changelist"),
        reverse("admin:finetuning_modelversion_change", args=[base_version.pk]),
        reverse("admin:inference_apikey_changelist"),
        reverse("admin:inference_apikey_add"),
        reverse("admin:inference_apikeyusage_changelist"),
    ]
    for page in pages:
        response = curator.get(page)
        assert response.status_code == 200, page


def test_dataset_page_shows_its_counts(curator, dataset_factory):
    dataset = dataset_factory(examples=5, split="train")
    response = curator.get(reverse("admin:finetuning_dataset_changelist"))
    row = response.content.decode().split(f">{dataset.name}</a>")[1].split("</tr>")[0]
    assert '<td class="field-example_count">5</td>' in row
    assert '<td class="field-train_count">5</td>' in row


def test_example_search_and_category_filter(curator, dataset_factory):
    dataset_factory()
    response = curator.get(reverse("admin:finetuning_trainingexample_changelist") + "?category=Kitchen")
    assert response.context["cl"].result_count == 8
    response = curator.get(reverse("admin:finetuning_trainingexample_changelist") + "?q=Product+13")
    assert response.context["cl"].result_count == 1


def test_curator_adds_an_example_with_attribute_fields(curator, dataset_factory):
    dataset = dataset_factory(examples=0)
    data = {
        "dataset": dataset.pk,
        "split": "train",
        "source": "manual",
        "name": "  Oak Stool ",
        "category": "Furniture",
        "price": "$45",
        "features": "solid oak\nstacks neatly",
        "other_attributes": '{"height": "45 cm"}',
        "description": "A sturdy stool.",
    }
    response = curator.post(reverse("admin:finetuning_trainingexample_add"), data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    example = TrainingExample.objects.get()
    assert example.attributes == {
        "name": "Oak Stool", "category": "Furniture", "price": 45.0, "features": ["solid oak", "stacks neatly"], "height": "45 cm",
    }  # fmt: skip
    assert example.name == "Oak Stool" and example.category == "Furniture"

    duplicate = curator.post(reverse("admin:finetuning_trainingexample_add"), data)
    assert duplicate.status_code == 200
    assert "already in" in duplicate.content.decode()
    bad_price = curator.post(reverse("admin:finetuning_trainingexample_add"), {**data, "price": "cheap"})
    assert "is not a number" in str(bad_price.context["adminform"].form.errors["price"])
    assert TrainingExample.objects.count() == 1


def test_start_fine_tuning_from_the_dataset_page_queues_a_job(
    curator, base_version, dataset_factory, django_capture_on_commit_callbacks
):
    dataset = dataset_factory()
    url = reverse("admin:finetuning_dataset_finetune", args=[dataset.pk])
    form = {
        **_full_form(),
        "method": "lora",
        "epochs": 1,
        "max_steps": 2,
        "learning_rate": 0.0002,
        "batch_size": 4,
        "max_seq_length": 128,
        "seed": 1,
        "lora_r": 8,
    }
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = curator.post(url, form)
    job = FineTuningJob.objects.get()
    assert response.status_code == 302
    assert response.url == reverse("admin:finetuning_finetuningjob_change", args=[job.pk])
    assert job.status == "queued" and job.hyperparameters["lora_r"] == 8 and len(callbacks) == 1
    assert job.hyperparameters["name_product"] is True  # the box starts ticked

    refused = curator.post(url, {**form, "learning_rate": 3})
    assert refused.status_code == 200
    assert "learning_rate" in refused.context["form"].errors
    assert FineTuningJob.objects.count() == 1


def test_a_version_is_activated_from_the_admin_after_a_confirmation(curator, base_version, dataset_factory):
    from finetuning.models import Activation
    from finetuning.services.jobs import job_execute, job_start

    job = job_start(dataset=dataset_factory(), hyperparameters={"max_steps": 1, "batch_size": 4, "max_seq_length": 96})
    version = job_execute(job_id=job.pk)
    page = curator.get(reverse("admin:finetuning_modelversion_change", args=[version.pk])).content.decode()
    assert f'value="Activate {version.name}"' in page and 'name="reason"' in page
    url = reverse("admin:finetuning_modelversion_activate", args=[version.pk])
    confirmation = curator.get(url)
    assert confirmation.status_code == 200 and "has no finished evaluation" in confirmation.content.decode()
    assert ModelVersion.objects.get(is_active=True) == base_version  # asking is not activating
    response = curator.post(url, {"confirm": "yes", "reason": "reads better"})
    assert response.status_code == 302
    assert ModelVersion.objects.get(is_active=True) == version
    activation = Activation.objects.first()
    assert (activation.version, activation.previous, activation.user.username, activation.reason) == (
        version, base_version, "admin", "reads better"
    )  # fmt: skip

    version.refresh_from_db()
    assert version.approved_at is not None and version.approved_by.username == "admin"  # activating releases it

    # The list action leads to the same confirmation.
    changelist = reverse("admin:finetuning_modelversion_changelist")
    response = curator.post(changelist, {"action": "activate_selected", "_selected_action": [base_version.pk]})
    assert response.status_code == 302 and response.url == reverse(
        "admin:finetuning_modelversion_activate", args=[base_version.pk]
    )

    # Roll back from the list, through a page that asks why.
    listing = curator.get(changelist).content.decode()
    assert f"Roll back to {base_version.name}" in listing and "reads better" in listing  # the history
    rollback = reverse("admin:finetuning_modelversion_rollback")
    curator.post(rollback, {"version": base_version.pk, "reason": "customers preferred the old texts"})
    assert ModelVersion.objects.get(is_active=True) == base_version
    assert Activation.objects.first().kind == "rollback"


def test_a_version_is_approved_for_clients_and_withdrawn_from_its_page(curator, base_version, model_store):
    from finetuning.services.versions import version_register

    version = version_register(
        name="shop-job5", kind="base", base_model=base_version.base_model, relpath=base_version.artifact_path,
        sha256=base_version.sha256, hyperparameters={}, metrics={},
    )  # fmt: skip
    page = curator.get(reverse("admin:finetuning_modelversion_change", args=[version.pk])).content.decode()
    assert "Approve for clients" in page and not version.is_released
    url = reverse("admin:finetuning_modelversion_approval", args=[version.pk])
    approved = curator.post(url, {"approve": "yes"}, follow=True).content.decode()
    assert "every API key may generate with it by name" in approved and "Withdraw approval" in approved
    assert ModelVersion.objects.get(pk=version.pk).is_released
    curator.post(url)
    assert not ModelVersion.objects.get(pk=version.pk).is_released


def test_only_curators_with_the_permission_activate_or_roll_back(client, django_user_model, base_version):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("editor", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_modelversion", "change_modelversion"]))
    client.force_login(user)
    assert client.post(reverse("admin:finetuning_modelversion_rollback")).status_code == 403
    url = reverse("admin:finetuning_modelversion_activate", args=[base_version.pk])
    assert client.post(url, {"confirm": "yes"}).status_code == 403
    approval = reverse("admin:finetuning_modelversion_approval", args=[base_version.pk])
    assert client.post(approval, {"approve": "yes"}).status_code == 403


def test_the_version_page_compares_metrics_and_texts_side_by_side(curator, base_version, dataset_factory):
    from finetuning.models import Evaluation, EvaluationScore
    from finetuning.services.jobs import job_execute, job_start

    job = job_start(dataset=dataset_factory(), hyperparameters={"max_steps": 1, "batch_size": 4, "max_seq_length": 96})
    version = job_execute(job_id=job.pk)
    evaluation = Evaluation.objects.create(
        version=version,
        status="succeeded",
        example_ids=[7],
        samples=[{"id": 7, "attributes": {"name": "Blue Kettle"}, "reference": "A kettle that boils fast."}],
        decoding={"greedy": True, "max_new_tokens": 64, "repetition_penalty": 1.0},
        promotion={"passed": False, "activated": False, "reason": "ROUGE-L +0.50, less than the required margin"},
    )
    for role, owner, rouge, text, claims in [
        ("candidate", version, 31.25, "The Blue Kettle boils water in a minute.", []),
        ("active", base_version, 12.5, "Kettle kettle kettle, in leather.", ["leather"]),
        ("base", base_version, 12.5, "Kettle kettle kettle, in leather.", ["leather"]),
    ]:
        EvaluationScore.objects.create(
            evaluation=evaluation, version=owner, role=role,
            metrics={"rouge_l": rouge, "attribute_coverage": 1.0, "unsupported_claim_share": float(bool(claims))},
            outputs=[{"text": text, "finish_reason": "stop", "unsupported": claims}],
        )  # fmt: skip
    for url in (
        reverse("admin:finetuning_modelversion_change", args=[version.pk]),
        reverse("admin:finetuning_modelversion_activate", args=[version.pk]),
        reverse("admin:finetuning_evaluation_change", args=[evaluation.pk]),
    ):
        page = curator.get(url).content.decode()
        assert "31.25" in page and "12.50" in page and "▲ +18.75</b> better" in page, url
        assert "Name: Blue Kettle" in page and "A kettle that boils fast." in page
        assert "The Blue Kettle boils water in a minute." in page and "Kettle kettle kettle, in leather." in page
        # Unsupported claims: the metric side by side, and the terms under the texts that make them.
        assert "outputs with an unsupported claim" in page and "100.0%" in page and "0.0%" in page
        assert "unsupported: leather" in page
        assert "less than the required margin" in page
    assert "<svg" in curator.get(reverse("admin:finetuning_modelversion_change", args=[version.pk])).content.decode()
    assert curator.get(reverse("admin:finetuning_evaluation_changelist")).status_code == 200
    assert curator.get(reverse("admin:finetuning_activation_changelist")).status_code == 200


def test_a_curator_without_permission_cannot_start_jobs(client, django_user_model, dataset_factory):
    dataset = dataset_factory()
    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    client.force_login(user)
    response = client.post(reverse("admin:finetuning_dataset_finetune", args=[dataset.pk]), {"method": "lora"})
    assert response.status_code == 403
    assert not FineTuningJob.objects.exists()


def test_a_finished_job_page_shows_progress_the_loss_chart_and_its_snapshot(curator, base_version, dataset_factory):
    from finetuning.services.jobs import job_execute, job_start

    job = job_start(dataset=dataset_factory(), hyperparameters={"max_steps": 4, "batch_size": 4, "max_seq_length": 128})
    job_execute(job_id=job.pk)
    page = curator.get(reverse("admin:finetuning_finetuningjob_change", args=[job.pk])).content.decode()
    assert '<progress value="100" max="100"' in page and "4 / 4" in page
    assert "<svg" in page and "<polyline" in page and "validation loss" in page
    assert job.snapshot.sha256 in page and "unassigned chosen by description hash" in page
    assert 'http-equiv="refresh"' not in page  # finished: nothing left to watch
    assert "Cancel this job" not in page
    version_page = curator.get(reverse("admin:finetuning_modelversion_change", args=[job.model_version.pk]))
    assert "<polyline" in version_page.content.decode() and "Retrain exactly" in version_page.content.decode()


def test_a_running_job_page_refreshes_and_can_be_cancelled(curator, base_version, dataset_factory):
    from finetuning.services.jobs import job_start

    job = job_start(dataset=dataset_factory(), hyperparameters={"max_steps": 4})
    FineTuningJob.objects.filter(pk=job.pk).update(
        status="running", step=2, total_steps=8, progress=0.25, eta_seconds=95, loss_history=[[1, 3.2], [2, 2.9]]
    )
    url = reverse("admin:finetuning_finetuningjob_change", args=[job.pk])
    page = curator.get(url).content.decode()
    assert 'http-equiv="refresh"' in page and "2 / 8" in page and "about 1 min 35 s" in page
    assert "Cancel this job" in page and "<polyline" in page
    response = curator.post(reverse("admin:finetuning_finetuningjob_cancel", args=[job.pk]), follow=True)
    assert "will stop at its next training step" in response.content.decode()
    job.refresh_from_db()
    assert job.cancel_requested_at is not None and job.status == "running"


def test_retrain_from_the_version_page_queues_the_same_recipe(curator, base_version, dataset_factory):
    from finetuning.services.jobs import job_execute, job_start

    first = job_start(dataset=dataset_factory(), hyperparameters={"max_steps": 2, "batch_size": 4, "seed": 5})
    version = job_execute(job_id=first.pk)
    response = curator.post(reverse("admin:finetuning_modelversion_retrain", args=[version.pk]))
    again = FineTuningJob.objects.exclude(pk=first.pk).get()
    assert response.status_code == 302 and response.url.endswith(f"/{again.pk}/change/")
    assert again.snapshot_id == first.snapshot_id and again.hyperparameters == first.hyperparameters


def test_starting_on_a_busy_dataset_says_why_on_the_form(curator, base_version, dataset_factory):
    from finetuning.services.jobs import job_start

    dataset = dataset_factory()
    running = job_start(dataset=dataset, hyperparameters={})
    response = curator.post(
        reverse("admin:finetuning_dataset_finetune", args=[dataset.pk]),
        _full_form(),
    )
    assert response.status_code == 200
    assert f"already has a queued fine-tuning job (job {running.pk})" in response.content.decode()
    assert FineTuningJob.objects.count() == 1


def _full_form():
    from finetuning.forms import FineTuneForm

    form = FineTuneForm()
    return {name: field.initial for name, field in form.fields.items()}


def test_a_curator_queues_an_evaluation_from_the_version_page(curator, base_version, dataset_factory):
    from finetuning.models import Evaluation
    from finetuning.services.jobs import job_execute, job_start

    dataset = dataset_factory()
    held = list(dataset.examples.values_list("id", flat=True)[:4])
    dataset.examples.filter(id__in=held).update(split="validation")
    job = job_start(dataset=dataset, hyperparameters={"max_steps": 1, "batch_size": 4, "max_seq_length": 96})
    version = job_execute(job_id=job.pk)
    url = reverse("admin:finetuning_modelversion_evaluate", args=[version.pk])
    response = curator.post(url)
    evaluation = Evaluation.objects.get(version=version)
    assert response.status_code == 302 and response.url == reverse(
        "admin:finetuning_evaluation_change", args=[evaluation.pk]
    )
    assert evaluation.status == "queued" and set(held) <= set(evaluation.example_ids)
    page = curator.get(response.url).content.decode()
    assert "Queued" in page  # (no refresh while it is queued: the page offers to size it first)
    again = curator.post(url, follow=True).content.decode()
    assert "already has an evaluation queued or running" in again
    assert Evaluation.objects.count() == 1
    # The base model has no validation split of its own: no button, and a clear refusal.
    base_page = curator.get(reverse("admin:finetuning_modelversion_change", args=[base_version.pk]))
    assert "Evaluate</button>" not in base_page.content.decode()
    refused = curator.post(reverse("admin:finetuning_modelversion_evaluate", args=[base_version.pk]), follow=True)
    assert "Not evaluated" in refused.content.decode() and "has no validation split" in refused.content.decode()

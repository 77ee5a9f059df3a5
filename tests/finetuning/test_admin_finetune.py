"""The "Start fine-tuning" screen: its pre-flight, the refusal past the skipped share and its
confirmation, the presets; and the example form's history naming only real changes."""

import json
import re

import pytest
from django.urls import reverse

from finetuning.forms import FineTuneForm
from finetuning.hyperparameters import PRESETS, Hyperparameters, hyperparameters_parse
from finetuning.models import FineTuningJob
from tests.finetuning.test_preflight import mixed_dataset


@pytest.fixture
def curator(admin_client):
    return admin_client


def _form(**changes):
    """The form as a browser posts it untouched: every field's initial value."""
    form = FineTuneForm()
    data = {name: field.initial for name, field in form.fields.items()}
    data.update(changes)
    return {key: value for key, value in data.items() if value is not False}  # an unticked box is not sent


def _url(dataset):
    return reverse("admin:finetuning_dataset_finetune", args=[dataset.pk])


@pytest.mark.django_db
def test_the_form_shows_the_preflight_in_admin_fieldsets(curator, base_version):
    dataset = mixed_dataset()
    page = curator.get(_url(dataset)).content.decode()
    for heading in ("Preset", "Training", "LoRA", "Data", "Pre-flight at max_seq_length 256"):
        assert f">{heading}</h2>" in page
    assert "as_p" not in page and 'class="submit-row"' in page
    assert "30 examples in the dataset" in page
    assert "no estimate yet" in page  # nothing measured on this worker yet

    checked = curator.post(_url(dataset), _form(max_seq_length=100, _check="Check pre-flight"))
    preflight = checked.context["preflight"]
    assert checked.status_code == 200 and FineTuningJob.objects.count() == 0  # Check never starts
    assert preflight.max_seq_length == 100 and preflight.skipped > 0 and preflight.truncated > 0
    text = checked.content.decode()
    assert "Pre-flight at max_seq_length 100" in text
    assert f"all fit at {preflight.longest}; 95% fit at {preflight.most}" in text


@pytest.mark.django_db
def test_the_preflight_url_answers_for_the_fields_as_they_are(curator, base_version):
    dataset = mixed_dataset()
    url = reverse("admin:finetuning_dataset_finetune_preflight", args=[dataset.pk])
    body = curator.get(url, _form(max_seq_length=100)).json()
    assert body["examples"] == 30 and body["skipped"] > 0 and body["needs_confirmation"] is True
    assert f"Train anyway on {30 - body['skipped']} of 30 examples" in body["html"]
    roomy = curator.get(url, _form(max_seq_length=512)).json()
    assert roomy["skipped"] == roomy["truncated"] == 0 and "Train anyway" not in roomy["html"]

    bad = curator.get(url, _form(max_seq_length=8))
    assert bad.status_code == 400 and "max_seq_length" in bad.json()["errors"]


@pytest.mark.django_db
def test_skipping_too_many_refuses_to_start_until_confirmed(curator, base_version, settings):
    settings.PREFLIGHT_MAX_SKIPPED_SHARE = 0.05
    dataset = mixed_dataset()
    refused = curator.post(_url(dataset), _form(max_seq_length=100))
    preflight = refused.context["preflight"]
    kept = preflight.kept
    assert refused.status_code == 200 and FineTuningJob.objects.count() == 0
    error = " ".join(refused.context["form"].errors["max_seq_length"])
    assert f"{preflight.skipped} of 30 examples" in error and f"all fit at {preflight.longest}" in error
    page = refused.content.decode()
    assert "Please correct the error below." in page
    assert f'value="{kept}"' in page and f"Train anyway on {kept} of 30 examples" in page

    # A confirmation given for other numbers (the settings changed since) does not count.
    stale = curator.post(_url(dataset), _form(max_seq_length=100, confirm_examples=kept + 1))
    assert stale.status_code == 200 and FineTuningJob.objects.count() == 0

    started = curator.post(_url(dataset), _form(max_seq_length=100, confirm_examples=kept))
    job = FineTuningJob.objects.get()
    assert started.status_code == 302 and job.hyperparameters["max_seq_length"] == 100


@pytest.mark.django_db
def test_nothing_fitting_is_refused_even_with_a_confirmation(curator, base_version):
    dataset = mixed_dataset()
    refused = curator.post(_url(dataset), _form(max_seq_length=32, confirm_examples=0))
    assert refused.status_code == 200 and FineTuningJob.objects.count() == 0
    assert "Not one of the" in " ".join(refused.context["form"].errors["max_seq_length"])


@pytest.mark.django_db
def test_a_preset_fills_the_form_and_what_is_submitted_trains(curator, base_version):
    dataset = mixed_dataset()
    page = curator.get(_url(dataset) + "?preset=quick_check")
    form = page.context["form"]
    assert form.initial["preset"] == "quick_check"
    assert hyperparameters_parse(form.hyperparameters()) == PRESETS["quick_check"].hyperparameters
    # The page's script fills the fields from these values when the preset changes.
    presets = json.loads(re.search(r'id="finetune-presets"[^>]*>(.*?)</script>', page.content.decode()).group(1))
    assert presets["thorough"]["max_seq_length"] == PRESETS["thorough"].hyperparameters.max_seq_length == 384
    assert set(presets) == {"quick_check", "default", "thorough"}
    for preset in PRESETS.values():
        assert preset.description and hyperparameters_parse(preset.hyperparameters.as_dict()) == preset.hyperparameters
    assert PRESETS["default"].hyperparameters == Hyperparameters()

    # Every value stays editable: a preset's values with one changed train as submitted.
    values = {**presets["thorough"], "max_seq_length": 512, "lora_r": 8}
    started = curator.post(_url(dataset), _form(preset="thorough", **values))
    assert started.status_code == 302, started.context["form"].errors
    job = FineTuningJob.objects.get()
    assert job.hyperparameters["epochs"] == 3 and job.hyperparameters["eval_steps"] == 50
    assert job.hyperparameters["max_seq_length"] == 512 and job.hyperparameters["lora_r"] == 8


@pytest.mark.django_db
def test_an_untouched_example_saves_with_no_change_recorded_and_a_real_change_is_named(curator, dataset_factory):
    from django.contrib.admin.models import LogEntry

    from finetuning.models import TrainingExample

    example = dataset_factory(examples=1).examples.get()
    example.attributes = {**example.attributes, "keywords": ["stool", "oak"]}
    example.save()
    url = reverse("admin:finetuning_trainingexample_change", args=[example.pk])
    form = curator.get(url).context["adminform"].form
    data = {}
    for name in form.fields:
        value = form[name].value()  # as the page shows it
        data[name] = "" if value is None else value
    # What a browser sends back: the text shown, a textarea's lines joined by CRLF.
    data["features"] = data["features"].replace("\n", "\r\n")
    data["keywords"] = data["keywords"].replace("\n", "\r\n")
    data["dataset"] = example.dataset_id

    response = curator.post(url, data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    entry = LogEntry.objects.get(object_id=str(example.pk))
    assert entry.get_change_message() == "No fields changed."
    assert TrainingExample.objects.get().attributes == example.attributes

    curator.post(url, {**data, "price": "99.5"})
    changed = LogEntry.objects.filter(object_id=str(example.pk)).order_by("-action_time").first()
    assert changed.get_change_message() == "Changed price."
    assert TrainingExample.objects.get().attributes["price"] == 99.5

"""The version page's playground: side-by-side generation through the API's serving path,
checked by the API's serializer, recorded in the generation log."""

import json

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from finetuning.models import ModelVersion, TrainingExample
from finetuning.services.snapshots import snapshot_freeze
from finetuning.services.versions import version_activate
from inference.engine.params import GenerationParams
from inference.models import Generation
from inference.services.generation import generation_begin, run_result
from inference.services.playground import playground_begin, playground_events, playground_request_parse

PRODUCT = {"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey", "features": ["grippy", "light"]}


@pytest.fixture
def curator(admin_client):
    return admin_client


@pytest.fixture
def candidate(base_version):
    """A second version on the tiny model's weights: neither active nor the base."""
    return ModelVersion.objects.create(
        name="shop-job5",
        kind=ModelVersion.Kind.FULL,
        base_model=base_version.base_model,
        artifact_path=base_version.artifact_path,
        sha256=base_version.sha256,
        prompt_format_version=base_version.prompt_format_version,
    )


def _generate(client, version, body):
    url = reverse("admin:finetuning_modelversion_playground_generate", args=[version.pk])
    return client.post(url, data=json.dumps(body), content_type="application/json")


def _events(response):
    assert response["Content-Type"] == "application/x-ndjson"
    return [json.loads(line) for line in b"".join(response.streaming_content).decode().splitlines()]


def _columns(client, version, query=""):
    page = client.get(reverse("admin:finetuning_modelversion_change", args=[version.pk]) + query)
    assert page.status_code == 200
    return page, [(column.version.name, column.roles) for column in page.context["playground"]["columns"]]


def test_the_version_page_offers_the_panel_with_the_apis_defaults_and_limits(curator, base_version, settings):
    page = curator.get(reverse("admin:finetuning_modelversion_change", args=[base_version.pk])).content.decode()
    assert "Try it" in page and 'id="pg-generate"' in page
    assert 'data-pg-param="max_new_tokens"' in page
    assert f'max="{settings.GENERATE_MAX_NEW_TOKENS}"' in page
    assert f'value="{settings.GENERATE_DEFAULT_MAX_NEW_TOKENS}"' in page
    for name in ("name", "category", "color", "brand", "audience", "price", "currency", "features", "keywords"):
        assert f'data-pg-attribute="{name}"' in page
    for name in ("min_new_tokens", "temperature", "top_p", "repetition_penalty", "no_repeat_ngram_size", "seed"):
        assert f'data-pg-param="{name}"' in page
    # The fact guard is a checkbox, set as the service's default.
    guard = page.split('id="pg-fact_guard"')[1].split(">")[0]
    assert 'type="checkbox"' in page.split('id="pg-fact_guard"')[0].rsplit("<input", 1)[1]
    assert f'data-pg-default="{str(settings.GENERATE_FACT_GUARD).lower()}"' in guard
    assert ("checked" in guard) == settings.GENERATE_FACT_GUARD
    # Inside the change form: no input of the panel is submitted with it.
    panel = page.split('id="playground"')[1].split("</script>")[0]
    assert " name=" not in panel


def test_the_columns_are_this_version_the_active_one_and_the_base_merged_when_the_same(
    curator, base_version, candidate
):
    assert _columns(curator, candidate)[1] == [
        ("shop-job5", ["this version"]),
        (base_version.name, ["active", "base"]),
    ]
    assert _columns(curator, base_version)[1] == [(base_version.name, ["this version", "active", "base"])]
    version_activate(version=candidate, user=None, reason="test")
    assert _columns(curator, candidate)[1] == [
        ("shop-job5", ["this version", "active"]),
        (base_version.name, ["base"]),
    ]
    page = curator.get(reverse("admin:finetuning_modelversion_change", args=[candidate.pk])).content.decode()
    assert "this version · active" in page


def test_generating_streams_the_requested_versions_answer_and_logs_it_for_the_user(curator, candidate):
    response = _generate(curator, candidate, {"product": PRODUCT, "max_new_tokens": 12})
    assert response.status_code == 200 and response["X-Model-Version"] == "shop-job5"
    events = _events(response)
    assert events[0]["started"]["prompt_tokens"] > 10  # at once: the page shows the column is under way
    done = events[-1]["done"]
    chunks = [event for event in events[:-1] if "chunk" in event]
    assert "".join(event["chunk"] for event in chunks) == done["text"]
    assert [event["tokens"] for event in chunks] == sorted(event["tokens"] for event in chunks)
    assert done["finish_reason"] in ("stop", "length")
    assert 1 <= done["usage"]["completion_tokens"] <= 12 and done["usage"]["prompt_tokens"] > 10
    assert {"total_ms", "first_token_ms", "tokens_per_second"} <= set(done["timings"])
    # The API's own serving path gives the same greedy text for the same version and product.
    api = run_result(generation_begin(params=GenerationParams(max_new_tokens=12), product=PRODUCT, version=candidate))
    assert done["text"] == api["choices"][0]["text"]

    row = Generation.objects.get(pk=done["generation_id"])
    assert row.route == Generation.Route.PLAYGROUND and row.user.username == "admin" and row.api_key is None
    assert row.version == candidate and row.version_name == "shop-job5"
    assert row.input == {"product": PRODUCT} and row.output == done["text"] and "Trail Running Shoe" in row.prompt
    assert row.parameters["max_new_tokens"] == 12 and row.completion_tokens == done["usage"]["completion_tokens"]
    assert row.finish_reason == done["finish_reason"] and row.error == ""


def test_the_fact_guard_box_reaches_the_generation(curator, base_version):
    body = {"product": PRODUCT, "max_new_tokens": 6, "fact_guard": True}
    done = _events(_generate(curator, base_version, body))[-1]["done"]
    assert Generation.objects.get(pk=done["generation_id"]).parameters["fact_guard"] is True
    body["fact_guard"] = "yes please"
    assert _generate(curator, base_version, body).json()["errors"]["fact_guard"] == ["Must be true or false."]


def test_sampling_uses_the_seed_and_reports_it(curator, base_version):
    body = {"product": PRODUCT, "max_new_tokens": 10, "temperature": 1.5, "top_p": 0.9, "seed": 7}
    first = _events(_generate(curator, base_version, body))[-1]["done"]
    second = _events(_generate(curator, base_version, body))[-1]["done"]
    assert first["seed"] == 7 and first["text"] == second["text"]
    assert Generation.objects.filter(route="playground", parameters__seed=7, parameters__top_p=0.9).count() == 2


def test_bad_input_names_each_field_with_the_apis_messages_and_generates_nothing(curator, base_version, settings):
    body = {
        "product": {"price": "cheap", "Bad Key": "x"},
        "temperature": 5,
        "max_new_tokens": settings.GENERATE_MAX_NEW_TOKENS + 1,
        "top_p": "high",
        "prompt": "free text",
    }
    response = _generate(curator, base_version, body)
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert errors["product.name"] == ["This field is required."]
    assert "price" in errors["product.price"][0]
    assert errors["product.Bad Key"][0].startswith("attribute names are lower-case letters")
    assert errors["temperature"] == ["Ensure this value is less than or equal to 2.0."]
    assert errors["max_new_tokens"] == [
        f"Ensure this value is less than or equal to {settings.GENERATE_MAX_NEW_TOKENS}."
    ]
    assert errors["top_p"] == ["A valid number is required."]
    assert errors["prompt"] == ["not a playground field"]
    assert _generate(curator, base_version, ["not", "an", "object"]).json() == {
        "errors": {"request": ["must be a JSON object"]}
    }
    # The page checks the form once before the columns start: the same messages.
    check = curator.post(
        reverse("admin:finetuning_modelversion_playground_check"),
        data=json.dumps(body),
        content_type="application/json",
    )
    assert check.status_code == 400 and check.json()["errors"] == errors
    good = curator.post(
        reverse("admin:finetuning_modelversion_playground_check"),
        data=json.dumps({"product": PRODUCT}),
        content_type="application/json",
    )
    assert good.json() == {"errors": {}}
    assert not Generation.objects.exists()


def test_a_model_that_cannot_load_is_a_503_naming_it_and_is_logged(curator, base_version):
    broken = ModelVersion.objects.create(
        name="broken-job9", kind="full", base_model=base_version.base_model, artifact_path="versions/missing",
        sha256="0" * 64, prompt_format_version=1,
    )  # fmt: skip
    response = _generate(curator, broken, {"product": PRODUCT, "max_new_tokens": 4})
    assert response.status_code == 503
    assert "broken-job9 cannot be loaded" in response.json()["error"]
    row = Generation.objects.get()
    assert row.version == broken and "cannot be loaded" in row.error and row.user.username == "admin"


def test_a_generation_past_the_time_limit_ends_with_an_error_in_its_column(curator, base_version, settings):
    settings.GENERATE_TIMEOUT_SECONDS = 1e-6
    response = _generate(curator, base_version, {"product": PRODUCT, "max_new_tokens": 50})
    assert response.status_code == 200
    last = _events(response)[-1]
    assert "error" in last and "waited" in last["error"]
    assert Generation.objects.get(pk=last["generation_id"]).error == last["error"]


def test_leaving_before_the_end_stops_the_generation_and_logs_it(base_version, admin_user):
    request = playground_request_parse(data={"product": PRODUCT, "max_new_tokens": 200})
    run = playground_begin(version=base_version, request=request, user=admin_user)
    events = playground_events(run=run, request=request, user=admin_user)
    events.close()  # what the server does when the page goes away, here before the first event
    assert run.generation.cancelled
    row = Generation.objects.get()
    assert row.error == "stopped: the page left before the end" and row.user == admin_user
    assert row.version == base_version and row.input == {"product": PRODUCT}


def test_only_staff_who_may_view_versions_use_it(client, django_user_model, base_version):
    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    client.force_login(user)
    assert _generate(client, base_version, {"product": PRODUCT}).status_code == 403
    example_url = reverse("admin:finetuning_modelversion_playground_example", args=[1])
    assert client.get(example_url).status_code == 403
    user.user_permissions.add(Permission.objects.get(codename="view_modelversion"))
    response = _generate(client, base_version, {"product": PRODUCT, "max_new_tokens": 2})
    assert response.status_code == 200 and "done" in _events(response)[-1]
    assert client.get(example_url).status_code == 403  # examples need their own permission
    assert Generation.objects.get().user == user

    client.logout()
    outsider = django_user_model.objects.create_user("outsider", password="pw")
    client.force_login(outsider)
    assert _generate(client, base_version, {"product": PRODUCT}).status_code == 302  # to the login page
    assert Generation.objects.count() == 1


def test_the_validation_examples_of_the_versions_snapshot_are_offered(curator, base_version, dataset_factory):
    dataset = dataset_factory(examples=6, split="train")
    held = list(dataset.examples.order_by("id")[:2])
    TrainingExample.objects.filter(pk__in=[example.pk for example in held]).update(split="validation")
    version = ModelVersion.objects.create(
        name="shop-job6", kind="full", base_model=base_version.base_model, artifact_path=base_version.artifact_path,
        sha256=base_version.sha256, prompt_format_version=1, snapshot=snapshot_freeze(dataset=dataset),
    )  # fmt: skip
    page, _ = _columns(curator, version)
    examples = page.context["playground"]["examples"]
    assert [example["id"] for example in examples] == [example.pk for example in held]
    assert examples[0]["description"] == held[0].description
    html = page.content.decode()
    assert f'<option value="{held[0].pk}">{held[0].pk}: {held[0].name}</option>' in html

    no_snapshot, _ = _columns(curator, base_version)
    assert "no validation examples" in no_snapshot.content.decode()


def test_any_example_by_id_fills_the_form(curator, dataset_factory):
    example = dataset_factory(examples=1).examples.get()
    url = reverse("admin:finetuning_modelversion_playground_example", args=[example.pk])
    assert curator.get(url).json() == {
        "id": example.pk, "name": example.name, "dataset": "shop", "attributes": example.attributes,
        "description": example.description,
    }  # fmt: skip
    missing = curator.get(reverse("admin:finetuning_modelversion_playground_example", args=[example.pk + 99]))
    assert missing.status_code == 404 and "no training example" in missing.json()["error"]


def test_an_example_page_opens_the_active_versions_playground_with_it(curator, base_version, dataset_factory):
    example = dataset_factory(examples=1).examples.get()
    page = curator.get(reverse("admin:finetuning_trainingexample_change", args=[example.pk])).content.decode()
    link = reverse("admin:finetuning_modelversion_playground") + f"?example={example.pk}"
    assert f'href="{link}"' in page and "Try in playground" in page
    response = curator.get(link)
    assert response.status_code == 302
    assert response.url == reverse("admin:finetuning_modelversion_change", args=[base_version.pk]) + (
        f"?example={example.pk}#playground"
    )
    version_page = curator.get(response.url)
    assert version_page.context["playground"]["preset"]["description"] == example.description
    assert example.description in version_page.content.decode()  # in the page's data, shown as the reference


def test_without_an_active_version_the_playground_link_says_so(curator, dataset_factory):
    response = curator.get(reverse("admin:finetuning_modelversion_playground"), follow=True)
    assert "No version is active" in response.content.decode()

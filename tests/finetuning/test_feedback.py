"""The feedback loop in the admin: a curator reads the generation log, rates an output,
corrects it and adds it to a dataset as a training example, linked both ways."""

import json

import pytest
from django.urls import reverse

from finetuning.models import Dataset, TrainingExample
from inference.models import Generation
from inference.services.feedback import FeedbackError, generation_example_add
from inference.services.generation_log import generation_record

PRODUCT = {"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey", "features": ["grippy outsole"]}


@pytest.fixture
def curator(admin_client):
    return admin_client


def _generation(version, *, input=None, output="A grey shoe for the trail.", **fields):
    row = generation_record(
        route=Generation.Route.API,
        version=version,
        input={"product": PRODUCT} if input is None else input,
        prompt="the prompt the model saw",
        output=output,
        parameters={"max_new_tokens": 40, "temperature": 0.0},
        finish_reason="stop",
        prompt_tokens=30,
        completion_tokens=9,
        timings={"load_ms": 0.1, "first_token_ms": 20.0, "total_ms": 123.4},
        **fields,
    )
    assert row is not None
    return row


def _page(curator, generation):
    return curator.get(reverse("admin:inference_generation_change", args=[generation.pk]))


def _post(curator, generation, **data):
    body = {"rating": "", "rating_note": "", "corrected_output": generation.output, "dataset": "", **data}
    return curator.post(reverse("admin:inference_generation_change", args=[generation.pk]), body, follow=True)


def test_the_log_lists_generations_with_filters_and_search(curator, base_version, key_factory, admin_user):
    key, _ = key_factory(name="shop CMS")
    by_key = _generation(base_version, api_key=key, output="Grippy and light " + "x" * 300)
    chat = _generation(base_version, input={"messages": [{"role": "user", "content": "Describe a scarf."}]},
                       output="A warm scarf.", user=admin_user)  # fmt: skip
    chat.rating = Generation.Rating.GOOD
    chat.save()
    changelist = reverse("admin:inference_generation_changelist")
    page = curator.get(changelist)
    assert page.status_code == 200
    text = page.content.decode()
    assert "key shop CMS" in text
    assert "product</span><br>Trail Running Shoe" in text and "chat</span><br>Describe a scarf." in text
    assert "x" * 300 not in text  # truncated in the list; whole on the page
    assert [row.pk for row in page.context["cl"].result_list] == [chat.pk, by_key.pk]  # newest first
    assert "x" * 300 in _page(curator, by_key).content.decode()

    def found(query):
        return [row.pk for row in curator.get(changelist + query).context["cl"].result_list]

    assert found(f"?api_key__id__exact={key.pk}") == [by_key.pk]
    assert found("?rating=good") == [chat.pk]
    assert found("?rating=none") == [by_key.pk]
    assert found("?q=scarf") == [chat.pk]
    assert found("?q=Grippy") == [by_key.pk]
    assert found("?has_example=yes") == []
    assert found(f"?version__id__exact={base_version.pk}&route__exact=api") == [chat.pk, by_key.pk]
    assert found(f"?created_at__year={chat.created_at.year}") == [chat.pk, by_key.pk]  # the date hierarchy
    assert found(f"?created_at__year={chat.created_at.year - 1}") == []


def test_the_detail_page_shows_input_prompt_output_parameters_and_timings(curator, base_version):
    generation = _generation(base_version)
    text = _page(curator, generation).content.decode()
    for shown in ("Trail Running Shoe", "grippy outsole", "the prompt the model saw", "A grey shoe for the trail.",
                  "max_new_tokens", "first_token_ms", "123.4", "Add to dataset as training example"):  # fmt: skip
        assert shown in text, shown


def test_a_curator_rates_corrects_and_adds_an_output_to_a_dataset(curator, base_version, admin_user):
    dataset = Dataset.objects.create(name="shoes")
    generation = _generation(base_version)
    page = _post(curator, generation, rating="bad", rating_note="says nothing of the colour")
    assert "Feedback on generation" in page.content.decode()
    generation.refresh_from_db()
    assert (generation.rating, generation.rating_note, generation.rated_by) == ("bad", "says nothing of the colour",
                                                                                admin_user)  # fmt: skip
    assert generation.corrected_output == ""  # the text was not changed: no correction

    corrected = "A grey trail shoe with a grippy outsole."
    page = _post(curator, generation, rating="bad", rating_note="says nothing of the colour",
                 corrected_output=corrected, dataset=dataset.pk, _add_example="1")  # fmt: skip
    assert "Added to shoes as training example" in page.content.decode()
    generation.refresh_from_db()
    example = generation.example
    assert example.dataset == dataset and example.description == corrected
    assert example.attributes["name"] == "Trail Running Shoe" and example.attributes["features"] == ["grippy outsole"]
    assert (example.source, example.review) == (TrainingExample.Source.FEEDBACK, TrainingExample.Review.DRAFT)
    # Linked back: the example's page names the generation it came from, with a link.
    example_page = curator.get(reverse("admin:finetuning_trainingexample_change", args=[example.pk])).content.decode()
    link = reverse("admin:inference_generation_change", args=[generation.pk])
    assert f'<a href="{link}">generation {generation.pk}</a>' in example_page
    # The dataset counts it.
    datasets = curator.get(reverse("admin:finetuning_dataset_changelist")).content.decode()
    row = datasets.split(">shoes</a>")[1].split("</tr>")[0]
    assert 'source__exact=feedback">1</a>' in row


def test_a_duplicate_or_invalid_example_is_refused_with_a_message_and_writes_nothing(curator, base_version):
    dataset = Dataset.objects.create(name="shoes")
    first = _generation(base_version)
    second = _generation(base_version)  # the same product and text
    _post(curator, first, dataset=dataset.pk, _add_example="1")
    page = _post(curator, second, dataset=dataset.pk, _add_example="1").content.decode()
    assert "Not added to shoes: description: the same example is already in shoes" in page
    second.refresh_from_db()
    assert second.example is None and dataset.examples.count() == 1

    nameless = _generation(base_version, input={"product": {"name": " ", "color": "Red"}})
    page = _post(curator, nameless, dataset=dataset.pk, _add_example="1").content.decode()
    assert "attributes.name: every example needs a product name" in page
    assert dataset.examples.count() == 1

    page = _post(curator, _generation(base_version), _add_example="1").content.decode()
    assert "Choose the dataset the example goes to." in page


def test_a_chat_or_free_prompt_cannot_become_an_example_and_the_page_says_why(curator, base_version):
    dataset = Dataset.objects.create(name="shoes")
    chat = _generation(base_version, input={"messages": [{"role": "user", "content": "Describe a scarf."}]})
    text = _page(curator, chat).content.decode()
    assert "Cannot become an example" in text and "only generations of a product can become examples" in text
    assert "Add to dataset as training example" not in text
    with pytest.raises(FeedbackError, match="asked with a chat"):
        generation_example_add(generation=chat, dataset=dataset)
    with pytest.raises(FeedbackError, match="asked with a free prompt"):
        generation_example_add(generation=_generation(base_version, input={"prompt": "hi"}), dataset=dataset)
    assert not dataset.examples.exists()


def test_a_generation_logged_by_the_api_becomes_an_example(client, curator, base_version, auth):
    dataset = Dataset.objects.create(name="shoes")
    answer = client.post(
        "/api/generate", data=json.dumps({"product": PRODUCT, "max_new_tokens": 8}), content_type="application/json",
        **auth,
    )  # fmt: skip
    [generation] = Generation.objects.all()
    text = answer.json()["choices"][0]["text"] or "fallback"
    _post(curator, generation, corrected_output=text + " Edited.", dataset=dataset.pk, _add_example="1")
    generation.refresh_from_db()
    assert generation.example.description.endswith("Edited.")
    assert generation.example.attributes == {**PRODUCT}


def test_a_playground_generation_with_bare_attributes_becomes_an_example(base_version):
    dataset = Dataset.objects.create(name="shoes")
    generation = _generation(base_version, input=dict(PRODUCT))
    example = generation_example_add(generation=generation, dataset=dataset)
    generation.refresh_from_db()
    assert generation.example == example and example.attributes["color"] == "Grey"
    with pytest.raises(FeedbackError, match=f"already training example {example.pk}"):
        generation_example_add(generation=generation, dataset=dataset)

"""Review status decides what trains: approved examples always, drafts while the dataset's
train_unreviewed is on, rejected never; curators set it in bulk from the examples list."""

import pytest
from django.urls import reverse

from finetuning.models import TrainingExample
from finetuning.selectors import trainable_examples
from finetuning.services.examples import examples_review_set
from finetuning.services.jobs import JobError, job_start
from finetuning.services.snapshots import SnapshotError, snapshot_freeze

Review = TrainingExample.Review


@pytest.fixture
def curator(admin_client):
    return admin_client


def _set(dataset, review, count):
    ids = list(dataset.examples.filter(review=Review.DRAFT).order_by("pk").values_list("pk", flat=True)[:count])
    return examples_review_set(examples=dataset.examples.filter(pk__in=ids), review=review)


def test_review_status_decides_what_the_snapshot_trains_on(dataset_factory):
    dataset = dataset_factory(examples=30)
    assert _set(dataset, Review.APPROVED, 10) == 10
    assert _set(dataset, Review.REJECTED, 5) == 5
    # Drafts train while train_unreviewed is on (the default): 10 approved + 15 drafts.
    snapshot = snapshot_freeze(dataset=dataset)
    assert snapshot.examples == 25
    assert "review left out 5 rejected" in snapshot.note
    rejected = set(dataset.examples.filter(review=Review.REJECTED).values_list("pk", flat=True))
    assert not rejected & {row["id"] for row in trainable_examples(dataset=dataset)}

    dataset.train_unreviewed = False
    dataset.save()
    snapshot = snapshot_freeze(dataset=dataset)
    assert snapshot.examples == 10
    assert {row["id"] for row in trainable_examples(dataset=dataset)} == set(
        dataset.examples.filter(review=Review.APPROVED).values_list("pk", flat=True)
    )
    assert "review left out 15 drafts and 5 rejected: only 10 examples to train on" in snapshot.note


def test_a_job_on_a_dataset_with_nothing_approved_says_so(dataset_factory, base_version):
    dataset = dataset_factory(examples=6)
    dataset.train_unreviewed = False
    dataset.save()
    _set(dataset, Review.REJECTED, 2)
    with pytest.raises(SnapshotError) as caught:
        snapshot_freeze(dataset=dataset)
    message = str(caught.value)
    assert "no examples to train on after review" in message and "4 drafts and 2 rejected are left out" in message
    assert "only approved examples train" in message
    with pytest.raises(JobError, match="none is approved"):
        job_start(dataset=dataset, hyperparameters={"max_steps": 1})


def test_bulk_actions_approve_reject_and_send_back_to_draft(curator, dataset_factory):
    dataset = dataset_factory(examples=6)
    changelist = reverse("admin:finetuning_trainingexample_changelist")
    ids = list(dataset.examples.order_by("pk").values_list("pk", flat=True))

    def act(action, selected, query=""):
        response = curator.post(changelist + query, {"action": action, "_selected_action": selected}, follow=True)
        return [str(m) for m in response.context["messages"]]

    assert act("approve_selected", ids[:4]) == ["4 examples approved."]
    assert act("reject_selected", ids[3:5]) == ["2 examples rejected."]
    assert act("approve_selected", ids[:2]) == ["0 examples approved (2 already approved, left as they were)."]
    # From a list filtered by review: the count is of the selection, not of what still matches.
    assert act("draft_selected", ids[:3], "?review__exact=approved") == ["3 examples back to draft."]
    reviews = dict(dataset.examples.values_list("pk", "review"))
    assert [reviews[pk] for pk in ids] == ["draft", "draft", "draft", "rejected", "rejected", "draft"]


def test_the_examples_list_shows_and_filters_review_status(curator, dataset_factory):
    dataset = dataset_factory(examples=4)
    _set(dataset, Review.APPROVED, 1)
    changelist = reverse("admin:finetuning_trainingexample_changelist")
    page = curator.get(changelist)
    assert "field-review_display" in page.content.decode() and ">Approved</span>" in page.content.decode()
    assert curator.get(changelist + "?review__exact=approved").context["cl"].result_count == 1
    assert curator.get(changelist + "?review__exact=draft").context["cl"].result_count == 3


def test_a_curator_sets_train_unreviewed_on_the_dataset_page(curator, dataset_factory):
    dataset = dataset_factory(examples=2)
    _set(dataset, Review.APPROVED, 1)
    page = curator.get(reverse("admin:finetuning_dataset_change", args=[dataset.pk])).content.decode()
    assert 'name="train_unreviewed"' in page and "2 train (approved and drafts)" in page
    response = curator.post(
        reverse("admin:finetuning_dataset_change", args=[dataset.pk]),
        {"name": dataset.name, "description": "", "train_unreviewed": ""},
    )
    assert response.status_code == 302
    dataset.refresh_from_db()
    assert not dataset.train_unreviewed
    assert [row["id"] for row in trainable_examples(dataset=dataset)] == list(
        dataset.examples.filter(review=Review.APPROVED).values_list("pk", flat=True)
    )
    lists = curator.get(reverse("admin:finetuning_dataset_changelist")).content.decode()
    assert "(1 train)" in lists

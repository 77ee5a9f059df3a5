import math
import shutil

import pytest

from finetuning import store
from finetuning.models import Activation, Evaluation, EvaluationScore, ModelVersion
from finetuning.selectors import rollback_target
from finetuning.services.evaluations import evaluation_after_job, evaluation_execute, evaluation_start
from finetuning.services.jobs import job_execute, job_start
from finetuning.services.promotion import promotion_consider, promotion_decide
from finetuning.services.versions import VersionError, version_activate, version_rollback

FAST = {"max_steps": 2, "batch_size": 4, "max_seq_length": 256}
VALIDATION = 6


@pytest.fixture
def trained(base_version, dataset_factory):
    """A LoRA version trained by a job on a dataset with 6 validation examples."""

    def make(name="shop"):
        dataset = dataset_factory(name=name)
        held = list(dataset.examples.order_by("id").values_list("id", flat=True)[:VALIDATION])
        dataset.examples.filter(id__in=held).update(split="validation")
        job = job_start(dataset=dataset, hyperparameters=FAST)
        version = job_execute(job_id=job.pk)
        assert version is not None, job.error
        return version

    return make


@pytest.fixture
def worker_inline(monkeypatch):
    """Stands in for the broker and a worker: a queued evaluation runs when committed."""
    from finetuning import tasks

    monkeypatch.setattr(
        tasks.evaluation_run, "apply_async", lambda args, **kwargs: evaluation_execute(evaluation_id=args[0])
    )


def test_a_successful_job_is_evaluated_next_to_the_active_version_and_the_base(
    base_version, dataset_factory, worker_inline, django_capture_on_commit_callbacks
):
    dataset = dataset_factory()
    held = list(dataset.examples.order_by("id").values_list("id", flat=True)[:VALIDATION])
    dataset.examples.filter(id__in=held).update(split="validation")
    job = job_start(dataset=dataset, hyperparameters=FAST)
    with django_capture_on_commit_callbacks(execute=True):
        version = job_execute(job_id=job.pk)

    evaluation = Evaluation.objects.get(version=version)
    assert evaluation.status == "succeeded", evaluation.error
    assert evaluation.automatic is True  # started by the job, not by a curator
    # Its steps are examples x versions scored (candidate, and the base, which is also the active one).
    assert evaluation.progress == 1.0 and evaluation.step == evaluation.total_steps == VALIDATION * 2
    assert evaluation.example_ids == held  # exactly the validation examples, in order
    assert evaluation.decoding["greedy"] is True
    scores = {score.role: score for score in evaluation.scores.all()}
    assert set(scores) == {"candidate", "active", "base"}
    assert scores["candidate"].version == version
    assert scores["active"].version == scores["base"].version == base_version
    for score in scores.values():
        assert len(score.outputs) == VALIDATION
        assert {"validation_loss", "perplexity", "rouge_l", "chrf", "bleu", "attribute_coverage", "length_ratio",
                "cut_off_share", "distinct_2", "repeated_4gram_share", "format_failure_share"} <= set(score.metrics)  # fmt: skip
        assert score.metrics["perplexity"] == pytest.approx(math.exp(score.metrics["validation_loss"]))
        # Unsupported claims are measured with the vocabulary the evaluation recorded, and each
        # output carries the terms it claims without support.
        claiming = [bool(output["unsupported"]) for output in score.outputs]
        assert score.metrics["unsupported_claim_share"] == pytest.approx(sum(claiming) / VALIDATION)
        assert all(set(output["unsupported"]) <= set(evaluation.fact_terms) for output in score.outputs)
    assert "leather" in evaluation.fact_terms and "primegreen" in evaluation.fact_terms
    # The same examples, the same loss as the job's own validation pass computed (another code path).
    job.refresh_from_db()
    assert scores["candidate"].metrics["validation_loss"] == pytest.approx(job.validation_history[-1][1], rel=1e-3)
    # The gate ran and, with auto-activation off (the default), left the base active.
    assert evaluation.promotion["activated"] is False and evaluation.promotion["reason"]
    assert ModelVersion.objects.get(is_active=True) == base_version


def test_evaluation_is_capped_at_the_configured_number_of_examples(trained, settings):
    version = trained()
    settings.EVALUATION_MAX_EXAMPLES = 2
    evaluation = evaluation_start(version=version)
    assert len(evaluation.example_ids) == 2 and len(evaluation.samples) == 2


def test_a_version_without_a_validation_split_gets_a_failed_evaluation_that_says_why(base_version, dataset_factory):
    dataset = dataset_factory(examples=5)  # too few to hold any out
    version = job_execute(job_id=job_start(dataset=dataset, hyperparameters=FAST).pk)
    evaluation = evaluation_after_job(version_id=version.pk)
    assert evaluation.status == "failed" and "no validation examples" in evaluation.error


def test_a_failed_evaluation_activates_nothing(trained, base_version, settings):
    settings.PROMOTION_AUTO_ACTIVATE = True
    version = trained()
    evaluation = evaluation_start(version=version)
    shutil.rmtree(store.absolute(version.artifact_path))  # the weights vanished
    evaluation = evaluation_execute(evaluation_id=evaluation.pk)
    assert evaluation.status == "failed" and version.name in evaluation.error
    assert not evaluation.scores.exists()
    assert ModelVersion.objects.get(is_active=True) == base_version
    assert promotion_decide(evaluation).activate is False


# --- The promotion gate, on hand-made scores -------------------------------------------

GOOD = {"rouge_l": 20.0, "attribute_coverage": 0.5, "repeated_4gram_share": 0.1, "format_failure_share": 0.0}


def _evaluated(version, active, candidate_metrics, active_metrics, status="succeeded"):
    evaluation = Evaluation.objects.create(version=version, status=status, example_ids=[1], samples=[], decoding={})
    EvaluationScore.objects.create(evaluation=evaluation, version=version, role="candidate", metrics=candidate_metrics)
    EvaluationScore.objects.create(evaluation=evaluation, version=active, role="active", metrics=active_metrics)
    return evaluation


@pytest.fixture
def gate_on(settings):
    settings.PROMOTION_AUTO_ACTIVATE = True
    settings.PROMOTION_PRIMARY_METRIC = "rouge_l"
    settings.PROMOTION_MARGIN = 1.0
    settings.PROMOTION_GUARD_METRICS = ["attribute_coverage", "repeated_4gram_share", "format_failure_share"]


def test_the_gate_activates_a_version_that_beats_the_active_one(trained, base_version, gate_on):
    version = trained()
    evaluation = _evaluated(version, base_version, GOOD, {**GOOD, "rouge_l": 18.5})
    promotion_consider(evaluation=evaluation)
    assert ModelVersion.objects.get(is_active=True) == version
    activation = Activation.objects.first()
    assert (activation.version, activation.previous, activation.kind) == (version, base_version, "auto")
    assert activation.evaluation == evaluation and "ROUGE-L" in activation.reason
    assert evaluation.promotion["activated"] is True


@pytest.mark.parametrize(
    ("active_metrics", "candidate_metrics", "reason"),
    [
        ({**GOOD, "rouge_l": 19.5}, GOOD, "less than the required margin"),
        ({**GOOD, "rouge_l": 10.0}, {**GOOD, "attribute_coverage": 0.4}, "attribute coverage"),
        ({**GOOD, "rouge_l": 10.0}, {**GOOD, "repeated_4gram_share": 0.2}, "repeated 4-gram"),
        ({**GOOD, "rouge_l": 10.0}, {**GOOD, "format_failure_share": 0.05}, "format failures"),
    ],
)
def test_the_gate_refuses_a_small_gain_or_a_worse_guard(
    trained, base_version, gate_on, active_metrics, candidate_metrics, reason
):
    version = trained()
    evaluation = promotion_consider(evaluation=_evaluated(version, base_version, candidate_metrics, active_metrics))
    assert ModelVersion.objects.get(is_active=True) == base_version
    assert evaluation.promotion["activated"] is False and reason in evaluation.promotion["reason"]


def test_the_gate_records_each_check_with_its_values_and_reason(trained, base_version, gate_on):
    version = trained()
    candidate = {**GOOD, "rouge_l": 19.8, "repeated_4gram_share": 0.2}
    del candidate["format_failure_share"]  # not measured: not held against the version
    evaluation = promotion_consider(evaluation=_evaluated(version, base_version, candidate, GOOD))
    checks = {check["metric"]: check for check in evaluation.promotion["checks"]}
    assert list(checks) == ["rouge_l", "attribute_coverage", "repeated_4gram_share", "format_failure_share"]
    assert checks["rouge_l"] == {
        "metric": "rouge_l", "label": "ROUGE-L F1", "rule": "primary", "candidate": 19.8, "active": 20.0,
        "passed": False, "reason": "19.80 against 20.00: -0.20, less than the required margin of 1",
    }  # fmt: skip
    assert checks["attribute_coverage"]["passed"] is True
    assert checks["repeated_4gram_share"]["passed"] is False
    assert checks["repeated_4gram_share"]["reason"] == "worse than the active version: 20.0% against 10.0%"
    assert checks["format_failure_share"]["passed"] is None
    # The verdict names the margin and the guard that was worse, not only the first.
    reason = evaluation.promotion["reason"]
    assert (
        "less than the required margin" in reason and "outputs with a repeated 4-gram (20.0% against 10.0%)" in reason
    )
    assert (evaluation.promotion["passed"], evaluation.promotion["activated"]) == (False, False)


def test_the_gate_shows_a_lower_is_better_gain_as_a_gain(trained, base_version, gate_on, settings):
    settings.PROMOTION_PRIMARY_METRIC = "validation_loss"
    settings.PROMOTION_MARGIN = 0.05
    version = trained()
    evaluation = _evaluated(
        version, base_version, {**GOOD, "validation_loss": 3.1234}, {**GOOD, "validation_loss": 3.2}
    )
    evaluation = promotion_consider(evaluation=evaluation)
    assert evaluation.promotion["activated"] is True
    assert evaluation.promotion["checks"][0]["reason"] == (
        "3.1234 against 3.2000: +0.0766, at least the required margin of 0.05"
    )


def test_the_gate_never_activates_without_the_setting_or_on_a_failed_evaluation(
    trained, base_version, gate_on, settings
):
    version = trained()
    failed = _evaluated(version, base_version, GOOD, {**GOOD, "rouge_l": 1.0}, status="failed")
    assert promotion_consider(evaluation=failed).promotion["activated"] is False
    settings.PROMOTION_AUTO_ACTIVATE = False
    passed = promotion_consider(evaluation=_evaluated(version, base_version, GOOD, {**GOOD, "rouge_l": 1.0}))
    assert passed.promotion == {**passed.promotion, "passed": True, "activated": False}
    assert "PROMOTION_AUTO_ACTIVATE is off" in passed.promotion["reason"]
    assert ModelVersion.objects.get(is_active=True) == base_version


def test_the_gate_does_not_act_on_a_comparison_with_a_version_no_longer_active(trained, base_version, gate_on):
    first, second = trained("one"), trained("two")
    evaluation = _evaluated(second, base_version, GOOD, {**GOOD, "rouge_l": 1.0})
    version_activate(version=first)  # activated by hand while the evaluation ran
    evaluation = promotion_consider(evaluation=evaluation)
    assert ModelVersion.objects.get(is_active=True) == first
    assert evaluation.promotion["activated"] is False and "changed" in evaluation.promotion["reason"]


def test_a_misconfigured_gate_says_which_setting(trained, base_version, gate_on, settings):
    settings.PROMOTION_PRIMARY_METRIC = "rouge"
    evaluation = promotion_consider(evaluation=_evaluated(trained(), base_version, GOOD, GOOD))
    assert "PROMOTION_PRIMARY_METRIC" in evaluation.promotion["reason"]


# --- Activation history and rollback --------------------------------------------------


def test_every_activation_is_recorded_and_rollback_reactivates_the_previous_version(
    trained, base_version, django_user_model
):
    curator = django_user_model.objects.create_user("curator")
    version = trained()
    assert rollback_target() is None  # only the first activation so far
    with pytest.raises(VersionError, match="no earlier active version"):
        version_rollback(user=curator, reason="testing")

    version_activate(version=version, user=curator, reason="better ROUGE-L")
    latest = Activation.objects.first()
    assert (latest.version, latest.previous, latest.user, latest.kind, latest.reason) == (
        version, base_version, curator, "manual", "better ROUGE-L"
    )  # fmt: skip
    assert rollback_target() == base_version

    with pytest.raises(VersionError, match="say why"):
        version_rollback(user=curator, reason="  ")
    assert version_rollback(user=curator, reason="the texts got worse") == base_version
    assert ModelVersion.objects.get(is_active=True) == base_version
    latest = Activation.objects.first()
    assert (latest.version, latest.previous, latest.kind) == (base_version, version, "rollback")
    assert latest.reason == "the texts got worse" and latest.user == curator
    assert Activation.objects.count() == 3  # initial, manual, rollback


def test_undoing_a_rollback_is_a_roll_forward(trained, base_version):
    from finetuning.selectors import reactivation_get

    version = trained()
    version_activate(version=version, reason="better")
    assert (reactivation_get().version, reactivation_get().label) == (base_version, f"Roll back to {base_version.name}")
    version_rollback(reason="worse in production")
    undo = reactivation_get()
    assert (undo.version, undo.direction, undo.label) == (version, "forward", f"Roll forward to {version.name}")
    version_rollback(reason="fixed", expected=version)
    latest = Activation.objects.first()
    # Recorded as a roll forward, never as a roll back.
    assert (latest.version, latest.previous, latest.kind, latest.reason) == (
        version,
        base_version,
        "roll_forward",
        "fixed",
    )
    assert reactivation_get().direction == "back"
    with pytest.raises(VersionError, match="would now activate"):
        version_rollback(reason="stale page", expected=version)


def test_activating_the_active_version_again_is_refused_and_records_nothing(base_version):
    with pytest.raises(VersionError, match="already the active version"):
        version_activate(version=base_version)
    assert Activation.objects.count() == 1


def test_an_evaluation_whose_worker_died_is_failed_not_left_running(trained, settings):
    from datetime import timedelta

    from django.utils import timezone

    from finetuning.services.evaluations import evaluations_reap_stale

    evaluation = evaluation_start(version=trained())
    stale = timezone.now() - timedelta(seconds=settings.JOB_STALE_AFTER_SECONDS + 5)
    Evaluation.objects.filter(pk=evaluation.pk).update(status="running", heartbeat_at=stale, worker="host pid 1")
    fresh = evaluation_start(version=trained("other"))
    Evaluation.objects.filter(pk=fresh.pk).update(status="running", heartbeat_at=timezone.now())
    assert evaluations_reap_stale() == [evaluation.pk]
    evaluation.refresh_from_db()
    assert evaluation.status == "failed" and "worker lost" in evaluation.error and "host pid 1" in evaluation.error
    # A worker that comes back late does not overwrite the verdict or run the gate.
    assert evaluation_execute(evaluation_id=evaluation.pk) is None
    assert Evaluation.objects.get(pk=fresh.pk).status == "running"


# --- Cancelling and sizing --------------------------------------------------------------


def test_cancelling_a_queued_evaluation_stops_it_before_it_starts(trained):
    from finetuning.services.evaluations import EvaluationError, evaluation_cancel

    evaluation = evaluation_cancel(evaluation=evaluation_start(version=trained()))
    assert evaluation.status == "cancelled" and evaluation.finished_at and evaluation.cancel_requested_at
    assert evaluation_execute(evaluation_id=evaluation.pk) is None  # its message arrives anyway
    assert not evaluation.scores.exists()
    with pytest.raises(EvaluationError, match="already cancelled"):
        evaluation_cancel(evaluation=evaluation)
    assert evaluation_start(version=evaluation.version).status == "queued"  # the version is free again


def test_a_running_evaluation_cancelled_stops_at_the_next_example_and_keeps_nothing(
    trained, base_version, monkeypatch, settings
):
    from finetuning.services import evaluations, workers
    from finetuning.services.evaluations import evaluation_cancel

    settings.PROMOTION_AUTO_ACTIVATE = True
    settings.JOB_PROGRESS_SECONDS = 0
    version = trained()
    evaluation = evaluation_start(version=version)
    real_score = evaluations.version_score
    monkeypatch.setattr(workers, "CANCEL_CHECK_SECONDS", 0)

    def score(version, examples, decoding, *, fact_terms, on_progress):
        def progress(done):
            if done == len(examples) + 2:  # the second output of the first version
                evaluation_cancel(evaluation=Evaluation.objects.get(pk=evaluation.pk))
            on_progress(done)

        return real_score(version, examples, decoding, on_progress=progress)

    monkeypatch.setattr(evaluations, "version_score", score)
    evaluation = evaluation_execute(evaluation_id=evaluation.pk)
    assert evaluation.status == "cancelled" and evaluation.finished_at
    assert evaluation.error == f"cancelled after 2 of {evaluation.total_steps} examples scored"
    assert evaluation.step == 1  # the last progress written before the cancel was seen
    assert not evaluation.scores.exists() and evaluation.promotion == {}
    assert ModelVersion.objects.get(is_active=True) == base_version


def test_a_cancel_that_comes_while_the_scores_are_saved_wins(trained, monkeypatch):
    from finetuning.services import evaluations
    from finetuning.services.evaluations import evaluation_cancel

    evaluation = evaluation_start(version=trained())
    real_score = evaluations.version_score
    scored = []

    def score(version, examples, decoding, *, fact_terms, on_progress):
        result = real_score(version, examples, decoding, on_progress=on_progress)
        scored.append(version)
        if len(scored) == 2:  # the last version: the cancel lands after every check
            evaluation_cancel(evaluation=Evaluation.objects.get(pk=evaluation.pk))
        return result

    monkeypatch.setattr(evaluations, "version_score", score)
    evaluation = evaluation_execute(evaluation_id=evaluation.pk)
    assert evaluation.status == "cancelled" and "while saving" in evaluation.error
    assert not evaluation.scores.exists()


def test_a_queued_evaluation_is_sized_and_its_time_limit_follows(
    trained, monkeypatch, django_capture_on_commit_callbacks
):
    from finetuning import tasks
    from finetuning.services.evaluations import EvaluationError, EvaluationSizeError, evaluation_resize

    version = trained()
    sent = []
    monkeypatch.setattr(tasks.evaluation_run, "apply_async", lambda **kwargs: sent.append(kwargs))
    with django_capture_on_commit_callbacks(execute=True):
        evaluation = evaluation_start(version=version)
    first_limit = evaluation.time_limit_seconds
    assert len(evaluation.example_ids) == VALIDATION and evaluation.total_steps == VALIDATION * 2  # candidate, base
    assert sent[-1]["soft_time_limit"] == first_limit

    with django_capture_on_commit_callbacks(execute=True):
        smaller = evaluation_resize(evaluation=evaluation, examples=2, max_new_tokens=16)
    assert (
        smaller.example_ids == evaluation.example_ids[:2] and [s["id"] for s in smaller.samples] == smaller.example_ids
    )
    assert smaller.decoding["max_new_tokens"] == 16 and smaller.total_steps == 4
    assert smaller.time_limit_seconds < first_limit
    assert len(sent) == 1  # the message already sent allows more than it needs now

    with pytest.raises(EvaluationSizeError) as refused:
        evaluation_resize(evaluation=evaluation, examples=VALIDATION + 1, max_new_tokens=100_000)
    assert set(refused.value.errors) == {"examples", "max_new_tokens"}
    assert f"between 1 and {VALIDATION}" in refused.value.errors["examples"]
    assert Evaluation.objects.get(pk=evaluation.pk).decoding["max_new_tokens"] == 16  # nothing half-written

    with django_capture_on_commit_callbacks(execute=True):
        larger = evaluation_resize(evaluation=evaluation, examples=VALIDATION, max_new_tokens=200)
    assert larger.time_limit_seconds > first_limit
    assert sent[-1]["args"] == [evaluation.pk] and sent[-1]["soft_time_limit"] == larger.time_limit_seconds
    # The message sent before would stop it too early: it is left for the one sent with the new size.
    assert evaluation_execute(evaluation_id=evaluation.pk, message_time_limit=first_limit) is None
    assert Evaluation.objects.get(pk=evaluation.pk).status == "queued"
    ran = evaluation_execute(evaluation_id=evaluation.pk, message_time_limit=larger.time_limit_seconds)
    assert ran.status == "succeeded" and all(len(score.outputs) == VALIDATION for score in ran.scores.all())
    with pytest.raises(EvaluationError, match="only a queued one can be sized"):
        evaluation_resize(evaluation=ran, examples=1, max_new_tokens=8)


def test_an_evaluation_after_a_job_is_marked_automatic(trained):
    version = trained()
    evaluation = evaluation_after_job(version_id=version.pk)
    assert evaluation.automatic is True and evaluation.status == "queued"
    assert evaluation_start(version=trained("other")).automatic is False


# --- The evaluation admin: cancel, bulk cancel, sizing ----------------------------------


def test_a_queued_evaluation_page_sizes_it_and_cancels_it(admin_client, trained):
    from django.urls import reverse

    evaluation = evaluation_start(version=trained())
    url = reverse("admin:finetuning_evaluation_change", args=[evaluation.pk])
    page = admin_client.get(url).content.decode()
    assert "Size this evaluation before it starts" in page and "Cancel this evaluation" in page
    assert f"{VALIDATION} available" in page and "next in the evaluation queue" in page
    assert 'http-equiv="refresh"' not in page  # a reload would throw away what the curator types

    size = reverse("admin:finetuning_evaluation_size", args=[evaluation.pk])
    refused = admin_client.post(size, {"examples": 99, "max_new_tokens": 32})
    assert refused.status_code == 200
    text = refused.content.decode()
    assert f"must be between 1 and {VALIDATION}" in text and 'value="99"' in text  # the typed value is kept
    assert len(Evaluation.objects.get(pk=evaluation.pk).example_ids) == VALIDATION

    response = admin_client.post(size, {"examples": 3, "max_new_tokens": 32}, follow=True)
    assert "will score 3 examples with at most 32 new tokens" in response.content.decode()
    evaluation.refresh_from_db()
    assert len(evaluation.example_ids) == 3 and evaluation.decoding["max_new_tokens"] == 32

    cancel = reverse("admin:finetuning_evaluation_cancel", args=[evaluation.pk])
    response = admin_client.post(cancel, follow=True)
    assert f"Evaluation {evaluation.pk} cancelled." in response.content.decode()
    assert Evaluation.objects.get(pk=evaluation.pk).status == "cancelled"
    page = admin_client.get(url).content.decode()
    assert "Cancel this evaluation" not in page and "Size this evaluation" not in page


def test_evaluations_are_cancelled_in_bulk_from_the_list(admin_client, trained):
    from django.urls import reverse

    queued = evaluation_start(version=trained("one"))
    running = evaluation_start(version=trained("two"))
    Evaluation.objects.filter(pk=running.pk).update(status="running")
    response = admin_client.post(
        reverse("admin:finetuning_evaluation_changelist"),
        {"action": "cancel_selected", "_selected_action": [queued.pk, running.pk]},
        follow=True,
    )
    text = response.content.decode()
    assert (
        f"Evaluation {queued.pk} cancelled." in text
        and f"Evaluation {running.pk} will stop at its next example" in text
    )
    assert Evaluation.objects.get(pk=queued.pk).status == "cancelled"
    running.refresh_from_db()
    assert running.status == "running" and running.cancel_requested_at is not None

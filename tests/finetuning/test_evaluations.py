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
    assert evaluation.progress == 1.0 and evaluation.step == evaluation.total_steps > 0
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
        version_rollback(user=curator)

    version_activate(version=version, user=curator, reason="better ROUGE-L")
    latest = Activation.objects.first()
    assert (latest.version, latest.previous, latest.user, latest.kind, latest.reason) == (
        version, base_version, curator, "manual", "better ROUGE-L"
    )  # fmt: skip
    assert rollback_target() == base_version

    assert version_rollback(user=curator) == base_version
    assert ModelVersion.objects.get(is_active=True) == base_version
    latest = Activation.objects.first()
    assert (latest.version, latest.previous, latest.kind) == (base_version, version, "rollback")
    assert f"from {version.name}" in latest.reason
    assert Activation.objects.count() == 3  # initial, manual, rollback


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

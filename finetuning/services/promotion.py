"""The promotion gate: whether a freshly evaluated version replaces the active one, and why."""

import logging
from dataclasses import dataclass

from django.conf import settings
from django.utils import timezone

from finetuning.metrics import METRICS, improvement, is_worse, metric_format, promotion_settings_problems
from finetuning.models import Activation, Evaluation, EvaluationScore
from finetuning.services.versions import VersionError, version_activate

logger = logging.getLogger(__name__)

Status = Evaluation.Status
Role = EvaluationScore.Role


class PromotionRuleError(Exception):
    """The promotion settings are not usable."""


@dataclass
class Decision:
    activate: bool
    reason: str


def _rule_check():
    problems = promotion_settings_problems()
    if problems:
        raise PromotionRuleError("; ".join(problems))
    return settings.PROMOTION_PRIMARY_METRIC, settings.PROMOTION_GUARD_METRICS


def promotion_decide(evaluation):
    """Whether ``evaluation``'s version should replace the active one, and why:
    it must have succeeded, beat the active version's primary metric by the margin,
    and be no worse on any guard metric."""
    if evaluation.status != Status.SUCCEEDED:
        return Decision(False, f"the evaluation {evaluation.status}: nothing is activated on it")
    primary, guards = _rule_check()
    candidate, active = evaluation.score(Role.CANDIDATE), evaluation.score(Role.ACTIVE)
    if active is None:
        return Decision(False, "no version was active to compare with")
    if active.version_id == candidate.version_id:
        return Decision(False, f"{candidate.version.name} was already the active version")
    ours, theirs = candidate.metrics.get(primary), active.metrics.get(primary)
    label = METRICS[primary].label
    if ours is None or theirs is None:
        return Decision(False, f"{label} is missing from the evaluation")
    gain = improvement(primary, ours, theirs)
    if gain < settings.PROMOTION_MARGIN:
        return Decision(
            False,
            f"{label} {metric_format(primary, ours)} against the active version's {metric_format(primary, theirs)}: "
            f"{gain:+.2f}, less than the required margin of {settings.PROMOTION_MARGIN:g}",
        )
    worse = [
        f"{METRICS[key].label} {metric_format(key, candidate.metrics.get(key))} "
        f"(active {metric_format(key, active.metrics.get(key))})"
        for key in guards
        if is_worse(key, candidate.metrics.get(key), active.metrics.get(key))
    ]
    if worse:
        return Decision(False, f"{label} {gain:+.2f}, but worse on: {'; '.join(worse)}")
    return Decision(
        True,
        f"{label} {metric_format(primary, ours)} against {metric_format(primary, theirs)} ({gain:+.2f}, margin "
        f"{settings.PROMOTION_MARGIN:g}); no guard metric worse ({', '.join(METRICS[k].label for k in guards)})",
    )


def promotion_consider(*, evaluation):
    """Apply the promotion gate to a finished evaluation and record its decision.
    Activates only when PROMOTION_AUTO_ACTIVATE is on and the gate passes."""
    try:
        decision = promotion_decide(evaluation)
    except PromotionRuleError as exc:
        decision = Decision(False, str(exc))
    activated = False
    reason = decision.reason
    if decision.activate and not settings.PROMOTION_AUTO_ACTIVATE:
        reason = f"passes the gate, not activated: PROMOTION_AUTO_ACTIVATE is off ({decision.reason})"
    elif decision.activate:
        active = evaluation.score(Role.ACTIVE).version
        try:
            version_activate(
                version=evaluation.version,
                kind=Activation.Kind.AUTO,
                reason=decision.reason,
                evaluation=evaluation,
                expected_active=active,
            )
            activated = True
        except VersionError as exc:
            reason = f"passes the gate, not activated: {exc}"
    Evaluation.objects.filter(pk=evaluation.pk).update(
        promotion={
            "passed": decision.activate,
            "activated": activated,
            "reason": reason,
            "at": timezone.now().isoformat(),
        }
    )
    evaluation.refresh_from_db()
    logger.info("Promotion of %s: %s", evaluation.version.name, reason)
    return evaluation

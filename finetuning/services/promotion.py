"""The promotion gate: whether a freshly evaluated version replaces the active one, and why."""

import logging
from dataclasses import dataclass, field

from django.conf import settings
from django.utils import timezone

from finetuning.metrics import (
    METRICS,
    decimals_to_tell_apart,
    improvement,
    is_worse,
    metric_amount,
    metric_delta,
    metric_format,
    promotion_settings_problems,
)
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
    # One per metric the gate looked at: {metric, label, rule, candidate, active, passed, reason};
    # passed is None for a guard the evaluation did not measure (not held against the version).
    checks: list = field(default_factory=list)


def _rule_check():
    problems = promotion_settings_problems()
    if problems:
        raise PromotionRuleError("; ".join(problems))
    return settings.PROMOTION_PRIMARY_METRIC, settings.PROMOTION_GUARD_METRICS


def _against(key, ours, theirs):
    places = decimals_to_tell_apart(key, [ours, theirs])
    return f"{metric_format(key, ours, places)} against {metric_format(key, theirs, places)}", places


def _primary_check(key, ours, theirs):
    check = {"metric": key, "label": METRICS[key].label, "rule": "primary", "candidate": ours, "active": theirs}
    if ours is None or theirs is None:
        return {**check, "passed": False, "reason": "missing from the evaluation"}
    shown, places = _against(key, ours, theirs)
    # The gain in the direction that is better, so that a lower loss reads as a positive gain.
    better, worse = (ours, theirs) if METRICS[key].better == "higher" else (theirs, ours)
    gain = metric_delta(key, better, worse, places)
    margin = metric_amount(key, settings.PROMOTION_MARGIN)
    if improvement(key, ours, theirs) < settings.PROMOTION_MARGIN:
        return {**check, "passed": False, "reason": f"{shown}: {gain}, less than the required margin of {margin}"}
    return {**check, "passed": True, "reason": f"{shown}: {gain}, at least the required margin of {margin}"}


def _guard_check(key, ours, theirs):
    check = {"metric": key, "label": METRICS[key].label, "rule": "guard", "candidate": ours, "active": theirs}
    if ours is None or theirs is None:
        return {**check, "passed": None, "reason": "not measured in this evaluation: not checked"}
    shown, _ = _against(key, ours, theirs)
    if is_worse(key, ours, theirs):
        return {**check, "passed": False, "reason": f"worse than the active version: {shown}"}
    return {**check, "passed": True, "reason": f"no worse than the active version: {shown}"}


def promotion_decide(evaluation):
    """Whether ``evaluation``'s version should replace the active one, why, and each check:
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
    first = _primary_check(primary, candidate.metrics.get(primary), active.metrics.get(primary))
    guarded = [_guard_check(key, candidate.metrics.get(key), active.metrics.get(key)) for key in guards]
    checks = [first, *guarded]
    gain = f"{first['label']} {first['reason']}"
    worse = "; ".join(
        f"{check['label']} ({_against(check['metric'], check['candidate'], check['active'])[0]})"
        for check in guarded
        if check["passed"] is False
    )
    if not first["passed"]:
        return Decision(False, f"{gain}{f'; also worse on {worse}' if worse else ''}", checks)
    if worse:
        return Decision(False, f"{gain}, but worse on {worse}", checks)
    held = ", ".join(check["label"] for check in guarded if check["passed"])
    return Decision(True, f"{gain}; no guard metric worse ({held or 'none checked'})", checks)


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
            "checks": decision.checks,
            "at": timezone.now().isoformat(),
        }
    )
    evaluation.refresh_from_db()
    logger.info("Promotion of %s: %s", evaluation.version.name, reason)
    return evaluation

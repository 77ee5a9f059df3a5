"""An evaluation laid out for the admin: metrics side by side, and sample texts."""

from django.conf import settings

from finetuning.metrics import METRICS, is_worse, metric_format
from finetuning.models import EvaluationScore
from finetuning.prompts import product_lines

ROLE_ORDER = (EvaluationScore.Role.CANDIDATE, EvaluationScore.Role.ACTIVE, EvaluationScore.Role.BASE)
SAMPLES_SHOWN = 12


def comparison_build(evaluation):
    """{columns, rows, samples, ...} of a succeeded evaluation; None otherwise.
    A row marks this version's value better or worse than the active version's."""
    if evaluation is None or evaluation.status != evaluation.Status.SUCCEEDED:
        return None
    by_role = {score.role: score for score in evaluation.scores.all()}
    scores = [by_role[role] for role in ROLE_ORDER if role in by_role]
    if not scores:
        return None
    candidate, active = by_role.get(EvaluationScore.Role.CANDIDATE), by_role.get(EvaluationScore.Role.ACTIVE)
    guards = set(settings.PROMOTION_GUARD_METRICS)
    rows = []
    for key, metric in METRICS.items():
        values = [score.metrics.get(key) for score in scores]
        verdict = ""
        if candidate and active and active.version_id != candidate.version_id:
            ours, theirs = candidate.metrics.get(key), active.metrics.get(key)
            if is_worse(key, ours, theirs):
                verdict = "worse"
            elif is_worse(key, theirs, ours):
                verdict = "better"
        rows.append(
            {
                "label": metric.label,
                "key": key,
                "values": [metric_format(key, value) for value in values],
                "verdict": verdict,
                "primary": key == settings.PROMOTION_PRIMARY_METRIC,
                "guard": key in guards,
                "better": metric.better,
            }
        )
    samples = []
    for index, sample in enumerate(evaluation.samples[:SAMPLES_SHOWN]):
        samples.append(
            {
                "id": sample.get("id"),
                "product": product_lines(sample["attributes"]),
                "reference": sample["reference"],
                "texts": [
                    score.outputs[index] if index < len(score.outputs) else {"text": "", "finish_reason": ""}
                    for score in scores
                ],
            }
        )
    return {
        "evaluation": evaluation,
        "columns": [{"role": score.get_role_display(), "version": score.version} for score in scores],
        "rows": rows,
        "samples": samples,
        "example_count": len(evaluation.example_ids),
        "decoding": evaluation.decoding,
        "promotion": evaluation.promotion,
    }

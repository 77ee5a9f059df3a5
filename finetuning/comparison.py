"""An evaluation laid out for the decision to activate: metrics side by side with the change
against the active version, the promotion gate's verdict on each metric it checked, and
sample texts in pages."""

from django.conf import settings

from finetuning.metrics import METRICS, decimals_to_tell_apart, is_worse, metric_delta, metric_format
from finetuning.models import EvaluationScore, ModelVersion
from finetuning.prompts import product_lines

Role = EvaluationScore.Role
ROLE_ORDER = (Role.CANDIDATE, Role.ACTIVE, Role.BASE)
SAMPLES_PER_PAGE = 5


def _columns(by_role):
    """One column per distinct version, named by every role it plays ("active = base" when
    the active version is the base model): the same outputs twice tell a curator nothing."""
    columns = []
    for role in ROLE_ORDER:
        score = by_role.get(role)
        if score is None:
            continue
        same = next((column for column in columns if column["version"].pk == score.version_id), None)
        if same is not None:
            same["roles"].append(role)
            continue
        columns.append({"version": score.version, "score": score, "roles": [role]})
    # "active" is the role the version had when the evaluation ran; once another version is
    # active (this one, after activating it), saying "active" would name the wrong version.
    active_now = ModelVersion.objects.filter(is_active=True).values_list("pk", flat=True).first()
    active = by_role.get(Role.ACTIVE)
    active_word = "active" if active is None or active.version_id == active_now else "active when evaluated"
    short = {Role.CANDIDATE: "this version", Role.ACTIVE: active_word, Role.BASE: "base"}
    for column in columns:
        column["active_word"] = active_word
        column["label"] = " = ".join(short[role] for role in column["roles"])
        column["is_candidate"] = Role.CANDIDATE in column["roles"]
    return columns


def _reference(columns):
    """The column this version is measured against: the active version, or the base model
    when this version is the active one; None when there is no other column."""
    for role in (Role.ACTIVE, Role.BASE):
        column = next((c for c in columns if role in c["roles"] and not c["is_candidate"]), None)
        if column is not None:
            return column, column["active_word"] if role == Role.ACTIVE else "base"
    return None, ""


def _change(key, ours, theirs, places):
    """{delta, arrow, verdict} of ``ours`` against ``theirs``; None when either is missing."""
    delta = metric_delta(key, ours, theirs, places)
    if delta is None:
        return None
    if not METRICS[key].better:
        verdict = ""  # a description of the outputs: neither way is better
    elif is_worse(key, ours, theirs):
        verdict = "worse"
    elif is_worse(key, theirs, ours):
        verdict = "better"
    else:
        verdict = "same"
    arrow = "▲" if ours > theirs else ("▼" if ours < theirs else "=")
    return {"delta": delta, "arrow": arrow, "verdict": verdict}


def _sample_pages(evaluation, columns):
    samples = []
    for index, sample in enumerate(evaluation.samples):
        samples.append(
            {
                "number": index + 1,
                "id": sample.get("id"),
                "product": product_lines(sample["attributes"]),
                "reference": sample["reference"],
                "texts": [
                    column["score"].outputs[index]
                    if index < len(column["score"].outputs)
                    else {"text": "", "finish_reason": ""}
                    for column in columns
                ],
            }
        )
    return [
        {"first": start + 1, "last": start + len(page), "samples": page}
        for start in range(0, len(samples), SAMPLES_PER_PAGE)
        for page in [samples[start : start + SAMPLES_PER_PAGE]]
    ]


def comparison_build(evaluation):
    """{columns, rows, sample_pages, gate, ...} of a succeeded evaluation; None otherwise.
    Each row carries this version's change against the active version (or the base model
    when this version is the active one) and the promotion gate's check of that metric."""
    if evaluation is None or evaluation.status != evaluation.Status.SUCCEEDED:
        return None
    by_role = {score.role: score for score in evaluation.scores.all()}
    if not by_role:
        return None
    columns = _columns(by_role)
    candidate = by_role.get(Role.CANDIDATE)
    reference, reference_role = _reference(columns) if candidate else (None, "")
    promotion = evaluation.promotion or {}
    checks = {check["metric"]: check for check in promotion.get("checks") or []}
    rows = []
    for key, metric in METRICS.items():
        raw = [column["score"].metrics.get(key) for column in columns]
        places = decimals_to_tell_apart(key, raw)
        change = None
        if reference is not None:
            change = _change(key, candidate.metrics.get(key), reference["score"].metrics.get(key), places)
        rows.append(
            {
                "label": metric.label,
                "key": key,
                "values": [metric_format(key, value, places) for value in raw],
                "change": change,
                "check": checks.get(key),
                "primary": key == settings.PROMOTION_PRIMARY_METRIC,
                "guard": key in settings.PROMOTION_GUARD_METRICS,
                "better": metric.better,
            }
        )
    return {
        "evaluation": evaluation,
        "columns": columns,
        "reference_role": reference_role,
        "rows": rows,
        "has_checks": bool(checks),
        "sample_pages": _sample_pages(evaluation, columns),
        "example_count": len(evaluation.example_ids),
        "decoding": evaluation.decoding,
        "promotion": promotion,
    }

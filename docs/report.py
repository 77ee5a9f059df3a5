"""Regenerate docs/REPORT.md: train the default recipe on the adidas reference
data and evaluate it against the base model, all through the service's own
commands and services, then fill the numbers into docs/REPORT.template.md.

    make report            # or: python docs/report.py [--keep]

Everything runs in a scratch directory (var/report/: its own SQLite database
and model store), with Celery tasks run in-process, so the service's data is
untouched. It takes about 20 minutes on 2 CPU cores. The reference data
(../shared/data/adidas_usa.csv) is read, never copied into the repository;
the report quotes a few of its descriptions as examples.
"""

import argparse
import csv
import json
import os
import platform
import shutil
import string
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "docs"))
import costs  # noqa: E402  (the deployment cost table, section 10)
from train_bench import ADIDAS_CSV, ADIDAS_MAPPING  # noqa: E402  (the file and its documented mapping)

SCRATCH = ROOT / "var" / "report"
EXAMPLES_SHOWN = 4


def log(message):
    print(f"[report {time.strftime('%H:%M:%S')}] {message}", flush=True)


def setup(scratch, *, fresh=True):
    if fresh:
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "genapi.settings.dev",
            "GENAPI_VAR_DIR": str(scratch),
            "DATABASE_URL": f"sqlite:///{scratch / 'report.sqlite3'}",
            "MODEL_STORE": str(scratch / "models"),
            "CELERY_TASK_ALWAYS_EAGER": "true",
            "PROMOTION_AUTO_ACTIVATE": "true",
        }
    )
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def run_pipeline(scratch):
    from django.core.management import call_command

    from finetuning.models import Dataset, Evaluation, FineTuningJob
    from finetuning.services.jobs import job_start

    call_command("migrate", verbosity=0)
    log("preparing the base model")
    call_command("prepare_base_model")
    log("importing the adidas reference data")
    call_command("import_examples", str(ADIDAS_CSV), "--dataset", "adidas", *[f"--map={m}" for m in ADIDAS_MAPPING])
    dataset = Dataset.objects.get(name="adidas")
    log("fine-tuning with the default recipe, then the automatic evaluation (tasks run in this process)")
    started = time.monotonic()
    job = job_start(dataset=dataset)  # eager: trains, registers, evaluates, applies the promotion gate
    job = FineTuningJob.objects.select_related("snapshot").get(pk=job.pk)
    if job.status != "succeeded":
        raise SystemExit(f"the job {job.status}: {job.error}")
    version = job.model_version
    evaluation = Evaluation.objects.filter(version=version).first()
    log(f"job {job.pk} {job.status} in {time.monotonic() - started:.0f} s: version {version.name}")

    results = {}
    for label, arguments in (
        ("base", ["--version", "base", "--split-of", version.name]),
        ("fine-tuned", ["--version", version.name]),
    ):
        out = scratch / f"evaluate-{label}.json"
        log(f"python manage.py evaluate {' '.join(arguments)} --json {out.name}")
        call_command("evaluate", *arguments, "--json", str(out))
        results[label] = json.loads(out.read_text())
    return dataset, job, version, evaluation, results


def last_run(scratch):
    results_path = scratch / "results.json"
    if not results_path.is_file():
        raise SystemExit(f"report: no earlier run in {scratch}; run without --render-only first")
    setup(scratch, fresh=False)
    from finetuning.models import Dataset, Evaluation, FineTuningJob

    results = json.loads(results_path.read_text())
    job = FineTuningJob.objects.select_related("snapshot").get(status="succeeded")
    version = job.model_version
    evaluation = Evaluation.objects.filter(version=version).first()
    return Dataset.objects.get(name="adidas"), job, version, evaluation, results, results.get("elapsed_seconds", 0)


def _number(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


# Metrics of a text alone, meaningful for the reference descriptions themselves.
REFERENCE_METRICS = ("attribute_coverage", "mean_words", "distinct_2", "repeated_4gram_share", "format_failure_share")


def reference_metrics(results):
    """The text-only metrics of the reference descriptions, as if they were outputs:
    what the shop's own copy does, for scale."""
    from finetuning.metrics import text_metrics

    examples = results["fine-tuned"]["examples"]
    references = [e["reference"] for e in examples]
    return text_metrics(references, references, [e["attributes"] for e in examples], ["stop"] * len(examples))


def coverage_table(results):
    """Which attribute values each side mentions, by attribute: where coverage comes from."""
    from finetuning.metrics import attribute_values_by_key, mentions

    examples = results["fine-tuned"]["examples"]
    sides = {
        "references": [e["reference"] for e in examples],
        "base": [e["text"] for e in results["base"]["examples"]],
        "fine-tuned": [e["text"] for e in examples],
    }
    keys = []
    counts = {side: {} for side in sides}
    for side, texts in sides.items():
        for text, example in zip(texts, examples, strict=True):
            for key, value in attribute_values_by_key(example["attributes"]):
                if key not in keys:
                    keys.append(key)
                total, hit = counts[side].get(key, (0, 0))
                counts[side][key] = (total + 1, hit + mentions(text, value))
    lines = ["| values mentioned | " + " | ".join(sides) + " |", "|---|" + "---:|" * len(sides)]
    for key in keys:
        cells = [f"{counts[side][key][1]} of {counts[side][key][0]}" for side in sides]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_table(results):
    from finetuning.metrics import METRICS, metric_format

    base, tuned = results["base"]["metrics"], results["fine-tuned"]["metrics"]
    references = reference_metrics(results)
    lines = ["| metric | base | fine-tuned | change | references |", "|---|---:|---:|---:|---:|"]
    for key, metric in METRICS.items():
        a, b = base.get(key), tuned.get(key)
        own = metric_format(key, references[key]) if key in REFERENCE_METRICS else ""
        change = "–"
        if a is not None and b is not None:
            if key == "perplexity" or (key == "validation_loss"):
                change = f"{100 * (b - a) / a:+.1f}%"
            elif metric.percent:
                change = f"{100 * (b - a):+.1f} pts"
            else:
                change = f"{b - a:+.2f}"
        better = f" ({metric.better} is better)" if metric.better else ""
        lines.append(
            f"| {metric.label}{better} | {metric_format(key, a)} | {metric_format(key, b)} | {change} | {own} |"
        )
    return "\n".join(lines)


def targets_table(results):
    base, tuned = results["base"]["metrics"], results["fine-tuned"]["metrics"]

    def gap(metrics):
        return abs(metrics["length_ratio"] - 1)

    rows = [
        ("ROUGE-L at least 5 points above base", tuned["rouge_l"] - base["rouge_l"] >= 5,
         f"{tuned['rouge_l'] - base['rouge_l']:+.2f} points"),
        ("perplexity of the references at least 30% lower", tuned["perplexity"] <= 0.7 * base["perplexity"],
         f"{100 * (tuned['perplexity'] - base['perplexity']) / base['perplexity']:+.1f}%"),
        ("chrF no worse", tuned["chrf"] >= base["chrf"], f"{tuned['chrf'] - base['chrf']:+.2f}"),
        ("attribute coverage no worse", tuned["attribute_coverage"] >= base["attribute_coverage"],
         f"{100 * (tuned['attribute_coverage'] - base['attribute_coverage']):+.1f} pts"),
        ("length ratio no worse (closer to 1)", gap(tuned) <= gap(base),
         f"{base['length_ratio']:.2f} -> {tuned['length_ratio']:.2f}"),
        ("repetition no higher (outputs with a repeated 4-gram)",
         tuned["repeated_4gram_share"] <= base["repeated_4gram_share"],
         f"{100 * base['repeated_4gram_share']:.1f}% -> {100 * tuned['repeated_4gram_share']:.1f}%"),
    ]  # fmt: skip
    lines = ["| target | result | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, ok, value in rows]
    return "\n".join(lines), all(ok for _, ok, _ in rows)


def examples_section(results):
    from finetuning.prompts import product_lines

    base, tuned = results["base"]["examples"], results["fine-tuned"]["examples"]
    parts = []
    for number, (a, b) in enumerate(zip(base[:EXAMPLES_SHOWN], tuned[:EXAMPLES_SHOWN], strict=True), start=1):
        facts = "; ".join(product_lines(a["attributes"]))

        def flat(text):
            return " ".join(text.split()) or "(empty)"

        parts.append(
            f"**{number}. {facts}**\n\n"
            f"- *Reference:* {flat(a['reference'])}\n"
            f"- *Base:* {flat(a['text'])}{' [cut off]' if a['finish_reason'] == 'length' else ''}\n"
            f"- *Fine-tuned:* {flat(b['text'])}{' [cut off]' if b['finish_reason'] == 'length' else ''}\n"
        )
    return "\n".join(parts)


def data_numbers(job):
    with open(ADIDAS_CSV, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    snapshot = job.snapshot
    return {
        "csv_rows": len(rows),
        "csv_descriptions": len({row["description"] for row in rows}),
        "example_count": snapshot.examples,
        "train_examples": snapshot.train_examples,
        "validation_examples": snapshot.validation_examples,
        "split_note": snapshot.note,
    }


def render(dataset, job, version, evaluation, results, elapsed):
    import torch
    import transformers
    from django.conf import settings

    from finetuning.metrics import metric_format

    hp = job.hyperparameters
    metrics = job.metrics
    base, tuned = results["base"]["metrics"], results["fine-tuned"]["metrics"]
    targets, all_met = targets_table(results)
    data = data_numbers(job)
    decoding = results["fine-tuned"]["decoding"]
    history = job.validation_history
    values = {
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_minutes": f"{elapsed / 60:.0f}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        "base_model": settings.BASE_MODEL_NAME,
        **{key: str(value) for key, value in data.items()},
        "hyperparameters": "\n".join(f"| `{key}` | {value} |" for key, value in hp.items()),
        "steps": str(metrics.get("steps")),
        "train_minutes": f"{metrics.get('train_seconds', 0) / 60:.1f}",
        "target_tokens_per_second": _number(metrics.get("target_tokens_per_second"), 0),
        "final_train_loss": _number(metrics.get("final_train_loss"), 3),
        "validation_curve": ", ".join(f"step {step}: {loss:.3f}" for step, loss in history) or "–",
        "evaluation_examples": str(len(results["fine-tuned"]["examples"])),
        "evaluation_source": results["fine-tuned"]["source"],
        "max_new_tokens": str(decoding["max_new_tokens"]),
        "repetition_penalty": f"{decoding['repetition_penalty']:g}",
        "version": version.name,
        "metrics_table": metrics_table(results),
        **{f"base_{key}": metric_format(key, value) for key, value in base.items()},
        **{f"tuned_{key}": metric_format(key, value) for key, value in tuned.items()},
        "coverage_table": coverage_table(results),
        "targets_table": targets,
        "targets_verdict": "All targets are met." if all_met else "**Not every target is met**: see the table.",
        "gate_decision": (evaluation.promotion or {}).get("reason", "–") if evaluation else "–",
        "gate_activated": "was activated" if (evaluation and (evaluation.promotion or {}).get("activated")) else
        "was not activated",
        "examples": examples_section(results),
        "examples_shown": str(EXAMPLES_SHOWN),
    }  # fmt: skip
    template = string.Template((ROOT / "docs" / "REPORT.template.md").read_text())
    # The cost table goes in after the substitution: its dollar signs are not placeholders.
    return costs.with_table(template.substitute(values), costs.table())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="Keep var/report/ (database, model store) afterwards.")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "REPORT.md")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="Fill the template again from the last run's results in var/report/ (after editing the template).",
    )
    args = parser.parse_args()
    if not ADIDAS_CSV.is_file():
        raise SystemExit(f"report: the reference data is not at {ADIDAS_CSV}")
    started = time.monotonic()
    if args.render_only:
        dataset, job, version, evaluation, results, elapsed = last_run(SCRATCH)
    else:
        setup(SCRATCH)
        dataset, job, version, evaluation, results = run_pipeline(SCRATCH)
        elapsed = time.monotonic() - started
        results["elapsed_seconds"] = elapsed
        (SCRATCH / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    text = render(dataset, job, version, evaluation, results, elapsed)
    temporary = args.output.with_suffix(".md.partial")
    temporary.write_text(text)
    os.replace(temporary, args.output)  # a failed run leaves the previous report whole
    log(f"wrote {args.output} in {(time.monotonic() - started) / 60:.0f} min")
    if not args.keep:
        shutil.rmtree(SCRATCH / "models", ignore_errors=True)


if __name__ == "__main__":
    main()

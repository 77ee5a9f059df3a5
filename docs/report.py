"""Regenerate docs/REPORT.md: train the default recipe on the adidas reference data with
three seeds, each version scored beside the base model on the whole validation split, with
the fact guard off (as served by default) and on, all through the service's own commands and services; then fill the numbers (mean ± standard
deviation over seeds) into docs/REPORT.template.md, draw the figures into docs/report/ and
write docs/report/results.json, the summary the slides (docs/slides.py) are made from.

    make report            # or: python docs/report.py [--jobs 2] [--seeds 42,7,1234] [--keep]

Each seed runs in a process and scratch directory of its own (var/report/seed-N/: its own
SQLite database and model store), with Celery tasks run in-process, so the service's data is
untouched. About 40 minutes per seed on 2 CPU cores; with --jobs 2, two seeds at once on one
core each. The reference data (../shared/data/adidas_usa.csv) is read, never copied into the
repository; the report quotes a few of its descriptions as examples.
"""

import argparse
import csv
import dataclasses
import json
import os
import platform
import shutil
import statistics
import string
import subprocess
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
DEFAULT_SEED = 42  # the recipe's own seed (finetuning/hyperparameters.py); the other two are overrides
SEEDS = (DEFAULT_SEED, 7, 1234)
# The default recipe before invented_facts, as this script measured it (issue 20, item 5).
BEFORE = ROOT / "docs" / "report" / "before.json"
# Today's training recipe with the decoding before the repeated n-gram rule: what each change did.
BETWEEN = ROOT / "docs" / "report" / "between.json"
EXAMPLES_SHOWN = 4


def log(message):
    print(f"[report {time.strftime('%H:%M:%S')}] {message}", flush=True)


def setup(scratch, *, threads=0):
    """This process's settings: its own SQLite database and model store in ``scratch``, Celery
    tasks run in-process, and evaluations on the whole validation split."""
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "genapi.settings.dev",
            "GENAPI_VAR_DIR": str(scratch),
            "DATABASE_URL": f"sqlite:///{scratch / 'report.sqlite3'}",
            "MODEL_STORE": str(scratch / "models"),
            "CELERY_TASK_ALWAYS_EAGER": "true",
            "PROMOTION_AUTO_ACTIVATE": "true",
            # The whole validation split, in the jobs' own evaluations.
            "EVALUATION_MAX_EXAMPLES": "100000",
            # The decode kernels `make install` built, not a scratch folder's that has none.
            "INFERENCE_NATIVE_DIR": os.environ.get("INFERENCE_NATIVE_DIR", str(ROOT / "var" / "native")),
        }
    )
    if threads:
        os.environ.update({"TRAINING_TORCH_THREADS": str(threads), "INFERENCE_TORCH_THREADS": str(threads)})
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def _scored(evaluation, role):
    """One version's part of an evaluation, as `manage.py evaluate --json` writes it."""
    score = evaluation.score(role)
    return {
        "version": score.version.name,
        "source": f"the validation split of {evaluation.version.name} (snapshot {evaluation.snapshot.sha256[:12]})",
        "decoding": evaluation.decoding,
        "metrics": score.metrics,
        "examples": [
            {"attributes": sample["attributes"], "reference": sample["reference"], **output}
            for sample, output in zip(evaluation.samples, score.outputs, strict=True)
        ],
    }


def guarded_evaluation(version, guard, seed):
    """``version``'s evaluation on the whole validation split with the fact guard ``guard`` ("on" or
    "off") and otherwise today's decoding settings: one it already has, else one run now (in this
    process: Celery runs tasks eagerly here)."""
    from finetuning.models import Evaluation
    from finetuning.scoring import Decoding
    from finetuning.services.evaluations import evaluation_start

    wanted = dataclasses.replace(Decoding.from_settings(), fact_guard=guard == "on")

    def found():
        for evaluation in Evaluation.objects.filter(version=version, status="succeeded").order_by("-pk"):
            if Decoding.from_dict(evaluation.decoding) == wanted:
                return evaluation
        return None

    if found() is None:
        log(f"seed {seed}: evaluating {version.name} with the fact guard {guard}")
        evaluation = evaluation_start(version=version, fact_guard=guard == "on")
        evaluation.refresh_from_db()
        if evaluation.status != "succeeded":
            raise SystemExit(f"seed {seed}: the evaluation with the fact guard {guard} {evaluation.status}: "
                             f"{evaluation.error}")  # fmt: skip
    return found()


def seed_run(seed, scratch, max_steps=0):
    """One seed of the default recipe in its own scratch: import the adidas data, train through a
    real job, which the service then scores beside the base on the whole validation split (its
    automatic evaluation), and score it again with the fact guard the other way, so that the report
    has both; the promotion gate's decision is the one on the evaluation as served. A seed that a rerun (--resume) finds finished in its
    scratch is not trained again. Writes and returns ``scratch/run.json``."""
    from django.conf import settings
    from django.core.management import call_command

    from finetuning.models import Dataset, Evaluation, FineTuningJob
    from finetuning.services.jobs import job_start
    from finetuning.services.promotion import promotion_decide

    call_command("migrate", verbosity=0)
    call_command("prepare_base_model")
    if not Dataset.objects.filter(name="adidas").exists():
        call_command("import_examples", str(ADIDAS_CSV), "--dataset", "adidas",
                     *[f"--map={m}" for m in ADIDAS_MAPPING])  # fmt: skip
    dataset = Dataset.objects.get(name="adidas")
    done = [
        job
        for job in FineTuningJob.objects.filter(dataset=dataset, status="succeeded").select_related("snapshot")
        if job.hyperparameters.get("seed") == seed and job.hyperparameters.get("max_steps") == max_steps
    ]
    if done:
        job = done[0]
        log(f"seed {seed}: job {job.pk} finished in an earlier run, version {job.model_version.name}")
    else:
        log(f"seed {seed}: fine-tuning with the default recipe, then the automatic evaluation")
        started = time.monotonic()
        # The recipe's own seed is the default recipe exactly as a curator starts it (no overrides).
        overrides = ({} if seed == DEFAULT_SEED else {"seed": seed}) | ({"max_steps": max_steps} if max_steps else {})
        job = job_start(dataset=dataset, hyperparameters=overrides or None)
        job = FineTuningJob.objects.select_related("snapshot").get(pk=job.pk)
        if job.status != "succeeded":
            raise SystemExit(f"seed {seed}: the job {job.status}: {job.error}")
        log(f"seed {seed}: job {job.pk} and its evaluation in {time.monotonic() - started:.0f} s")
    automatic = Evaluation.objects.filter(version=job.model_version, automatic=True).first()
    if automatic is None or automatic.status != "succeeded":
        raise SystemExit(f"seed {seed}: the evaluation of {job.model_version.name} did not succeed: "
                         f"{automatic.error if automatic else 'none was made'}")  # fmt: skip
    by_guard = {guard: guarded_evaluation(job.model_version, guard, seed) for guard in ("on", "off")}
    served = by_guard["on" if settings.EVALUATION_FACT_GUARD else "off"]
    decision = promotion_decide(served)
    run = {
        "seed": seed,
        "version": job.model_version.name,
        "hyperparameters": job.hyperparameters,
        "job_metrics": job.metrics,
        "loss_history": job.loss_history,
        "validation_history": job.validation_history,
        # The gate on the evaluation as served (the job's own ran on the settings of its day).
        "promotion": {"passed": decision.activate, "reason": decision.reason},
        "fact_terms": served.fact_terms,
        "snapshot": job.snapshot.sha256,
        "data": data_numbers(job.snapshot),
        "evaluation": _scored(served, "candidate"),
        "base": _scored(served, "base"),
        "by_guard": {
            guard: {"evaluation": _scored(evaluation, "candidate"), "base": _scored(evaluation, "base")}
            for guard, evaluation in by_guard.items()
        },
    }
    (scratch / "run.json").write_text(json.dumps(run, indent=2, ensure_ascii=False))
    return run


def run_seeds(seeds, jobs, max_steps=0):
    """Every seed in a process of its own (``jobs`` at once, the cores shared among them), each
    with its own database and model store under var/report/seed-N/; their results combined."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending, running, runs = list(seeds), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            command = [sys.executable, __file__, "--seed-run", str(seed), "--threads", str(threads),
                       "--max-steps", str(max_steps)]  # fmt: skip
            log(f"seed {seed}: started ({threads} thread{'s' if threads > 1 else ''}), var/report/seed-{seed}/")
            running[seed] = subprocess.Popen(command)
        time.sleep(2)
        for seed, process in list(running.items()):
            if process.poll() is None:
                continue
            del running[seed]
            if process.returncode != 0:
                for other in running.values():
                    other.terminate()
                raise SystemExit(f"report: seed {seed} failed (exit {process.returncode}); its scratch stays")
            runs[seed] = json.loads((SCRATCH / f"seed-{seed}" / "run.json").read_text())
    runs = [runs[seed] for seed in seeds]
    if len({run["snapshot"] for run in runs}) != 1:
        raise SystemExit("report: the seeds were trained on different snapshots of the data")
    return {"seeds": list(seeds), "runs": runs, "base": runs[0]["base"], "data": runs[0]["data"]}


def last_run(scratch):
    results_path = scratch / "results.json"
    if not results_path.is_file():
        raise SystemExit(f"report: no earlier run in {scratch}; run without --render-only first")
    return json.loads(results_path.read_text())


def parent_setup():
    """The combining process's settings: a database of its own (the fact vocabulary's curators'
    terms are read from it when a run did not record its vocabulary)."""
    from django.core.management import call_command

    setup(SCRATCH)
    call_command("migrate", verbosity=0)


def _number(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


# Metrics of a text alone, meaningful for the reference descriptions themselves.
REFERENCE_METRICS = (
    "attribute_coverage",
    "mean_words",
    "distinct_2",
    "repeated_4gram_share",
    "format_failure_share",
    "unsupported_claim_share",
    "invented_number_share",
)


def first(results):
    """The first seed's evaluation: the default recipe exactly as a curator runs it, whose
    outputs the per-example parts of the report show."""
    return results["runs"][0]["evaluation"]


def reference_metrics(results):
    """The text-only metrics of the reference descriptions, as if they were outputs:
    what the shop's own copy does, for scale."""
    from finetuning.metrics import text_metrics
    from finetuning.selectors import fact_vocabulary

    examples = first(results)["examples"]
    references = [e["reference"] for e in examples]
    attributes = [e["attributes"] for e in examples]
    # The vocabulary the evaluations used (recorded with each), so that the references are judged alike.
    terms = results["runs"][0].get("fact_terms") or fact_vocabulary()
    return text_metrics(references, references, attributes, ["stop"] * len(examples), fact_terms=terms)


def metric_summary(results):
    """Per metric: the base's value, every seed's, their mean and standard deviation, and the
    references' own value where the metric means something for them."""
    from finetuning.metrics import METRICS

    references = reference_metrics(results)
    summary = {}
    for key, metric in METRICS.items():
        runs = [run["evaluation"]["metrics"].get(key) for run in results["runs"]]
        if any(value is None for value in runs):
            continue
        summary[key] = {
            "label": metric.label,
            "better": metric.better,
            "percent": metric.percent,
            "base": results["base"]["metrics"].get(key),
            "runs": runs,
            "mean": statistics.fmean(runs),
            "sd": statistics.stdev(runs) if len(runs) > 1 else 0.0,
            "references": references[key] if key in REFERENCE_METRICS else None,
        }
    return summary


# The metrics that item 5 of issue 20 holds the fact guard to, against the text without it.
GUARD_METRICS = (
    "unsupported_claim_share",
    "invented_number_share",
    "rouge_l",
    "chrf",
    "attribute_coverage",
    "repeated_4gram_share",
    "length_ratio",
    "mean_words",
)


def guard_summary(results):
    """Per metric of GUARD_METRICS: the base's and the fine-tuned versions' values (every seed's,
    mean and sd) with the fact guard off and on."""
    from finetuning.metrics import METRICS

    summary = {}
    for key in GUARD_METRICS:
        row = {"label": METRICS[key].label, "better": METRICS[key].better, "percent": METRICS[key].percent}
        for guard in ("off", "on"):
            runs = [run["by_guard"][guard]["evaluation"]["metrics"][key] for run in results["runs"]]
            row[guard] = {
                "base": results["runs"][0]["by_guard"][guard]["base"]["metrics"][key],
                "runs": runs,
                "mean": statistics.fmean(runs),
                "sd": statistics.stdev(runs) if len(runs) > 1 else 0.0,
            }
        summary[key] = row
    return summary


def recipe_summary(results, before, between):
    """Per metric of GUARD_METRICS: the default recipe before ``invented_facts`` (``before``,
    docs/report/before.json: its seeds' values), today's training recipe with the decoding before
    the repeated n-gram rule (``between``, docs/report/between.json) and today's
    default (this run's versions), all with the fact guard off, in the shape of guard_summary's rows
    ("before", "between" and "now"); None for a metric an earlier run did not measure."""
    from finetuning.metrics import METRICS

    summary = {}
    for key in GUARD_METRICS:
        row = {"label": METRICS[key].label, "better": METRICS[key].better, "percent": METRICS[key].percent}
        now = [run["by_guard"]["off"]["evaluation"]["metrics"][key] for run in results["runs"]]
        for side, runs in (
            ("before", before["metrics"].get(key, {}).get("runs")),
            ("between", between["metrics"].get(key, {}).get("runs")),
            ("now", now),
        ):
            row[side] = runs and {
                "runs": runs,
                "mean": statistics.fmean(runs),
                "sd": statistics.stdev(runs) if len(runs) > 1 else 0.0,
            }
        summary[key] = row
    return summary


def recipe_table(summary, before, between, seeds):
    from finetuning.metrics import METRICS

    def run(label, measured):
        return f"{label} ({measured['generated'][:10]}, seeds {', '.join(map(str, measured['seeds']))})"

    lines = [
        f"| metric | {run('before: `invented_facts` learn, repeats allowed', before)} "
        f"| {run('`avoid`, repeats allowed', between)} | now: today's default (seeds {', '.join(map(str, seeds))}) "
        "| change, before to now |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, row in summary.items():
        better = f" ({METRICS[key].better} is better)" if METRICS[key].better else ""
        change = _change(key, row["before"] and row["before"]["mean"], row["now"]["mean"])
        lines.append(
            f"| {row['label']}{better} | {_spread(key, row['before'])} | {_spread(key, row['between'])} "
            f"| {_spread(key, row['now'])} | {change} |"
        )
    return "\n".join(lines)


def guard_targets(summary, old="off", new="on"):
    """Issue 20's item 5 on the fine-tuned versions, ``new`` against ``old`` (the fact guard on
    against off, or today's default recipe against the one before it): on the means, and in how
    many seeds each held on its own (the n-th seed of one side against the n-th of the other)."""

    def rows(off, on):
        return [
            ("outputs with an unsupported claim at most half", on["unsupported_claim_share"]
             <= 0.5 * off["unsupported_claim_share"],
             f"{100 * off['unsupported_claim_share']:.1f}% -> {100 * on['unsupported_claim_share']:.1f}%"),
            ("ROUGE-L at most 1 point lower", on["rouge_l"] >= off["rouge_l"] - 1,
             f"{on['rouge_l'] - off['rouge_l']:+.2f} points"),
            ("chrF no worse", on["chrf"] >= off["chrf"], f"{on['chrf'] - off['chrf']:+.2f}"),
            ("attribute coverage no worse", on["attribute_coverage"] >= off["attribute_coverage"],
             f"{100 * (on['attribute_coverage'] - off['attribute_coverage']):+.1f} pts"),
            ("repetition no higher (outputs with a repeated 4-gram)",
             on["repeated_4gram_share"] <= off["repeated_4gram_share"],
             f"{100 * off['repeated_4gram_share']:.1f}% -> {100 * on['repeated_4gram_share']:.1f}%"),
        ]  # fmt: skip

    seeds = min(len(next(iter(summary.values()))[side]["runs"]) for side in (old, new))
    # Only the metrics both sides measured (an earlier run may predate one).
    both = {k: r for k, r in summary.items() if r[old] and r[new]}
    means = [rows({k: r[old]["mean"] for k, r in both.items()}, {k: r[new]["mean"] for k, r in both.items()})]
    per_seed = [
        rows({k: r[old]["runs"][i] for k, r in both.items()}, {k: r[new]["runs"][i] for k, r in both.items()})
        for i in range(seeds)
    ]
    return [
        {"name": name, "value": value, "met": met, "seeds_met": sum(seed[index][1] for seed in per_seed),
         "seeds": seeds}
        for index, (name, met, value) in enumerate(means[0])
    ]  # fmt: skip


def guard_table(summary, seeds):
    from finetuning.metrics import metric_format

    lines = [
        f"| metric | base, guard off | base, guard on | fine-tuned, guard off (mean ± sd of {len(seeds)} seeds) "
        "| fine-tuned, guard on | change with the guard |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, row in summary.items():
        better = f" ({row['better']} is better)" if row["better"] else ""
        lines.append(
            f"| {row['label']}{better} | {metric_format(key, row['off']['base'])} "
            f"| {metric_format(key, row['on']['base'])} | {_spread(key, row['off'])} | {_spread(key, row['on'])} "
            f"| {_change(key, row['off']['mean'], row['on']['mean'])} |"
        )
    return "\n".join(lines)


def _spread(key, row):
    from finetuning.metrics import METRICS, metric_format

    if row is None:
        return "–"  # not measured
    text = metric_format(key, row["mean"])
    if len(row["runs"]) > 1:
        places = METRICS[key].decimals
        text += f" ± {metric_format(key, row['sd'], places).removesuffix('%')}"
    return text


def _change(key, base, tuned):
    from finetuning.metrics import METRICS

    if base is None or tuned is None:
        return "–"
    if key in ("perplexity", "validation_loss"):
        return f"{100 * (tuned - base) / base:+.1f}%"
    if METRICS[key].percent:
        return f"{100 * (tuned - base):+.1f} pts"
    return f"{tuned - base:+.2f}"


def coverage_table(results):
    """Which attribute values each side mentions, by attribute: where coverage comes from."""
    from finetuning.metrics import attribute_values_by_key, mentions

    examples = first(results)["examples"]
    sides = {
        "references": [e["reference"] for e in examples],
        "base": [e["text"] for e in results["base"]["examples"]],
        f"fine-tuned (seed {results['runs'][0]['seed']})": [e["text"] for e in examples],
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


def metrics_table(summary, seeds):
    from finetuning.metrics import metric_format

    lines = [
        f"| metric | base | fine-tuned, mean ± sd of {len(seeds)} seeds | change of the mean | references |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, row in summary.items():
        better = f" ({row['better']} is better)" if row["better"] else ""
        own = metric_format(key, row["references"]) if row["references"] is not None else ""
        lines.append(
            f"| {row['label']}{better} | {metric_format(key, row['base'])} | {_spread(key, row)} "
            f"| {_change(key, row['base'], row['mean'])} | {own} |"
        )
    return "\n".join(lines)


def targets(summary):
    """The evaluation issue's targets against the base, on the mean over seeds, and in how
    many of the seeds each one held on its own."""

    def gap(value):
        return abs(value - 1)

    def rows(base, tuned):
        return [
            ("ROUGE-L at least 5 points above base", tuned["rouge_l"] - base["rouge_l"] >= 5,
             f"{tuned['rouge_l'] - base['rouge_l']:+.2f} points"),
            ("perplexity of the references at least 30% lower", tuned["perplexity"] <= 0.7 * base["perplexity"],
             f"{100 * (tuned['perplexity'] - base['perplexity']) / base['perplexity']:+.1f}%"),
            ("chrF no worse", tuned["chrf"] >= base["chrf"], f"{tuned['chrf'] - base['chrf']:+.2f}"),
            ("attribute coverage no worse", tuned["attribute_coverage"] >= base["attribute_coverage"],
             f"{100 * (tuned['attribute_coverage'] - base['attribute_coverage']):+.1f} pts"),
            ("length ratio no worse (closer to 1)", gap(tuned["length_ratio"]) <= gap(base["length_ratio"]),
             f"{base['length_ratio']:.2f} -> {tuned['length_ratio']:.2f}"),
            ("repetition no higher (outputs with a repeated 4-gram)",
             tuned["repeated_4gram_share"] <= base["repeated_4gram_share"],
             f"{100 * base['repeated_4gram_share']:.1f}% -> {100 * tuned['repeated_4gram_share']:.1f}%"),
            ("format failures no higher (a guard)", tuned["format_failure_share"] <= base["format_failure_share"],
             f"{100 * base['format_failure_share']:.1f}% -> {100 * tuned['format_failure_share']:.1f}%"),
            ("unsupported claims no higher (a guard since issue 20)",
             tuned["unsupported_claim_share"] <= base["unsupported_claim_share"],
             f"{100 * base['unsupported_claim_share']:.1f}% -> {100 * tuned['unsupported_claim_share']:.1f}%"),
        ]  # fmt: skip

    base = {key: row["base"] for key, row in summary.items()}
    mean = {key: row["mean"] for key, row in summary.items()}
    seeds = len(next(iter(summary.values()))["runs"])
    per_seed = [rows(base, {key: row["runs"][i] for key, row in summary.items()}) for i in range(seeds)]
    out = []
    for index, (name, met, value) in enumerate(rows(base, mean)):
        held = sum(seed_rows[index][1] for seed_rows in per_seed)
        out.append({"name": name, "value": value, "met": met, "seeds_met": held, "seeds": seeds})
    return out


def targets_table(rows):
    lines = ["| target | mean over seeds | met by the mean | seeds that met it |", "|---|---|---|---:|"]
    lines += [
        f"| {row['name']} | {row['value']} | {'yes' if row['met'] else '**no**'} | {row['seeds_met']} of {row['seeds']} |"
        for row in rows
    ]
    return "\n".join(lines)


def _flat(text):
    return " ".join(text.split()) or "(empty)"


def examples(results, count):
    from finetuning.prompts import product_lines

    def shown(output):
        return _flat(output["text"]) + (" [cut off]" if output["finish_reason"] == "length" else "")

    guarded = results["runs"][0]["by_guard"]["on"]["evaluation"]["examples"]
    unguarded = results["runs"][0]["by_guard"]["off"]["evaluation"]["examples"]
    out = []
    outputs = zip(results["base"]["examples"], unguarded, guarded, strict=True)
    for a, b, c in list(outputs)[:count]:
        out.append(
            {
                "facts": "; ".join(product_lines(a["attributes"])),
                "reference": _flat(a["reference"]),
                "base": shown(a),
                "tuned": shown(b),
                "unsupported": b.get("unsupported") or [],
                "tuned_guarded": shown(c),
                "unsupported_guarded": c.get("unsupported") or [],
            }
        )
    return out


def examples_section(shown):
    def claims(terms):
        return f" *(unsupported: {', '.join(terms)})*" if terms else ""

    parts = []
    for number, example in enumerate(shown, start=1):
        parts.append(
            f"**{number}. {example['facts']}**\n\n"
            f"- *Reference:* {example['reference']}\n"
            f"- *Base:* {example['base']}\n"
            f"- *Fine-tuned:* {example['tuned']}{claims(example['unsupported'])}\n"
            f"- *Fine-tuned, fact guard on:* {example['tuned_guarded']}{claims(example['unsupported_guarded'])}\n"
        )
    return "\n".join(parts)


def data_numbers(snapshot):
    with open(ADIDAS_CSV, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    return {
        "csv_rows": len(rows),
        "csv_descriptions": len({row["description"] for row in rows}),
        "example_count": snapshot.examples,
        "train_examples": snapshot.train_examples,
        "validation_examples": snapshot.validation_examples,
        "split_note": snapshot.note,
    }


def training_rows(results):
    out = []
    for run in results["runs"]:
        metrics = run["job_metrics"]
        out.append(
            {
                "seed": run["seed"],
                "version": run["version"],
                "steps": metrics.get("steps"),
                "train_minutes": round(metrics.get("train_seconds", 0) / 60, 1),
                "target_tokens_per_second": metrics.get("target_tokens_per_second"),
                "final_train_loss": metrics.get("final_train_loss"),
                "validation_history": run["validation_history"],
            }
        )
    return out


def training_table(rows):
    lines = [
        "| seed | version | steps | training | target tokens/s | last training loss | validation loss by epoch |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        curve = ", ".join(f"{loss:.3f}" for _, loss in row["validation_history"]) or "–"
        lines.append(
            f"| {row['seed']} | {row['version']} | {row['steps']} | {row['train_minutes']} min "
            f"| {_number(row['target_tokens_per_second'], 0)} | {_number(row['final_train_loss'], 3)} | {curve} |"
        )
    return "\n".join(lines)


def draw_figures(results, summary, measured, folder):
    import report_figures as figures

    folder.mkdir(parents=True, exist_ok=True)
    examples_scored = first(results)["examples"]
    tuned_texts = [e["text"] for run in results["runs"] for e in run["evaluation"]["examples"]]
    return {
        "loss": figures.loss_curves(results["runs"], folder / "loss.png"),
        "metrics": figures.metric_bars(summary, folder / "metrics.png"),
        "lengths": figures.length_histogram(
            [e["reference"] for e in examples_scored],
            [e["text"] for e in results["base"]["examples"]],
            tuned_texts,
            first(results)["decoding"]["max_new_tokens"],
            folder / "lengths.png",
        ),
        "serving": figures.serving_bars(measured, folder / "serving.png"),
    }


def cpu_name():
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def serving_values(measured):
    """Section 3's speeds, from the serving measurement that section 10 quotes."""
    baseline = measured["baseline"]["one_stream_tokens_per_second"]
    default = next(iter(measured["rows"].values()))
    one, eight = default["one_stream_tokens_per_second"], default["aggregate_8_clients_tokens_per_second"]
    llama = next((row for name, row in (measured.get("anchors") or {}).items() if name.startswith("llama.cpp")), None)
    return {
        "serving_baseline": f"{baseline:.1f}",
        "serving_engine_one": f"{one:.1f}",
        "serving_engine_one_ratio": f"{one / baseline:.2f}",
        "serving_engine_eight": f"{eight:.1f}",
        "serving_engine_eight_ratio": f"{eight / baseline:.2f}",
        "serving_llama_sentence": f"llama.cpp on the same GGUF decoded one stream at "
        f"{llama['one_stream_tokens_per_second']:.1f} tokens/s in that run"
        if llama
        else "llama.cpp was not measured in that run",
    }


def render(results, folder, before=None, between=None):
    """The report's text, and the summary (docs/report/results.json) that the slides are made
    from; the figures are written into ``folder`` on the way. ``before``: the default recipe
    before ``invented_facts`` (default docs/report/before.json), which today's is compared with;
    ``between``: today's training recipe with the decoding before the repeated n-gram rule (default
    docs/report/between.json), shown beside them."""
    import torch
    import transformers
    from django.conf import settings

    from finetuning.metrics import metric_format

    served = "on" if settings.EVALUATION_FACT_GUARD else "off"  # the main tables: text as served
    for run in results["runs"]:
        run["evaluation"], run["base"] = run["by_guard"][served]["evaluation"], run["by_guard"][served]["base"]
    results["base"] = results["runs"][0]["base"]
    summary = metric_summary(results)
    target_rows = targets(summary)
    guarding = guard_summary(results)
    guard_rows = guard_targets(guarding)
    before = before or json.loads(BEFORE.read_text())
    between = between or json.loads(BETWEEN.read_text())
    recipe = recipe_summary(results, before, between)
    recipe_rows = guard_targets(recipe, "before", "now")
    measured = costs.check_measured(json.loads((ROOT / "docs" / "measured_serving.json").read_text()))
    figures = draw_figures(results, summary, measured, folder)
    scored = first(results)
    gate = results["runs"][0]["promotion"]
    shown = examples(results, EXAMPLES_SHOWN)
    training = training_rows(results)
    seeds = results["seeds"]
    values = {
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        "base_model": settings.BASE_MODEL_NAME,
        **{key: str(value) for key, value in results["data"].items()},
        "hyperparameters": "\n".join(f"| `{key}` | {value} |" for key, value in results["runs"][0]["hyperparameters"].items()),
        "seeds": ", ".join(map(str, seeds)),
        "seed_count": str(len(seeds)),
        "training_table": training_table(training),
        "evaluation_examples": str(len(scored["examples"])),
        "evaluation_source": scored["source"],
        "max_new_tokens": str(scored["decoding"]["max_new_tokens"]),
        "repetition_penalty": f"{scored['decoding']['repetition_penalty']:g}",
        "version": results["runs"][0]["version"],
        "versions": ", ".join(run["version"] for run in results["runs"]),
        "metrics_table": metrics_table(summary, seeds),
        **{f"base_{key}": metric_format(key, row["base"]) for key, row in summary.items()},
        **{f"tuned_{key}": _spread(key, row) for key, row in summary.items()},
        **{f"references_{key}": metric_format(key, row["references"]) for key, row in summary.items()},
        "coverage_table": coverage_table(results),
        "targets_table": targets_table(target_rows),
        "targets_verdict": "All targets are met by the mean." if all(r["met"] for r in target_rows) else
        "**Not every target is met**: see the table.",
        "gate_decision": gate.get("reason", "–"),
        "gate_activated": "passes" if gate.get("passed") else "does not pass",
        "gate_passed": f"{sum(bool(run['promotion'].get('passed')) for run in results['runs'])} of the "
        f"{len(results['runs'])}",
        "recipe_table": recipe_table(recipe, before, between, seeds),
        "recipe_targets_table": targets_table(recipe_rows),
        "recipe_verdict": "Every line of it is met by the mean." if all(r["met"] for r in recipe_rows) else
        "**Not every line of it is met**: see the table.",
        "recipe_same_examples": "the same" if before["evaluation_source"] == scored["source"] else
        f"**not** the same ({before['evaluation_source']})",
        **{f"before_{key}": _spread(key, row["before"]) for key, row in recipe.items()},
        **{f"now_{key}": _spread(key, row["now"]) for key, row in recipe.items()},
        **{f"between_{key}": _spread(key, row["between"]) for key, row in recipe.items()},
        "no_repeat_ngram_size": str(scored["decoding"].get("no_repeat_ngram_size", 0)),
        "guard_table": guard_table(guarding, seeds),
        "guard_targets_table": targets_table(guard_rows),
        "guard_verdict": "Every line of it is met by the mean." if all(r["met"] for r in guard_rows) else
        "**Not every line of it is met**: see the table.",
        **{f"guarded_{key}": _spread(key, row["on"]) for key, row in guarding.items()},
        **{f"base_guarded_{key}": metric_format(key, row["on"]["base"]) for key, row in guarding.items()},
        "examples": examples_section(shown),
        "served_guard": served,
        "examples_shown": str(EXAMPLES_SHOWN),
        **{f"figure_{name}": f"report/{file}" for name, file in figures.items()},
        **serving_values(measured),
    }  # fmt: skip
    template = string.Template((ROOT / "docs" / "REPORT.template.md").read_text())
    # The cost table goes in after the substitution: its dollar signs are not placeholders.
    text = costs.with_table(template.substitute(values), costs.table(measured=measured))
    facts = {
        "generated": values["generated"],
        "machine": values["machine"],
        "base_model": values["base_model"],
        "data": results["data"],
        "seeds": seeds,
        "evaluation_examples": len(scored["examples"]),
        "evaluation_source": scored["source"],
        "decoding": scored["decoding"],
        "hyperparameters": results["runs"][0]["hyperparameters"],
        "training": training,
        "metrics": summary,
        "targets": target_rows,
        "recipe_before": {"generated": before["generated"], "hyperparameters": before["hyperparameters"]},
        "recipe_between": {"generated": between["generated"], "decoding": between["decoding"]},
        "recipe_change": recipe,
        "recipe_change_targets": recipe_rows,
        "fact_guard": guarding,
        "fact_guard_targets": guard_rows,
        "examples": shown,
        "serving": measured,
        "costs": costs.summary(measured=measured),
        "figures": figures,
    }
    return text, facts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="Keep the model stores in var/report/ afterwards.")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "REPORT.md")
    parser.add_argument(
        "--seeds",
        default=",".join(map(str, SEEDS)),
        help=f"training seeds of the default recipe, comma-separated (default {','.join(map(str, SEEDS))})",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="seeds trained at once, each in its own process (default 1)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Reuse the seeds an interrupted run finished in var/report/ (default: start from an empty one).",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=0,
        help="Stop each training after N steps: a quick check of this script, not a report (use with --output).",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="Fill the template again from the last run's results in var/report/ (after editing the template).",
    )
    parser.add_argument("--seed-run", type=int, default=None, help=argparse.SUPPRESS)  # one seed's process
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seed_run is not None:
        scratch = SCRATCH / f"seed-{args.seed_run}"
        setup(scratch, threads=args.threads)
        seed_run(args.seed_run, scratch, args.max_steps)
        return
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: comma-separated whole numbers, not {args.seeds!r}")
    if args.jobs < 1:
        parser.error("--jobs: at least 1")
    if not ADIDAS_CSV.is_file():
        raise SystemExit(f"report: the reference data is not at {ADIDAS_CSV}")
    started = time.monotonic()
    if args.render_only:
        results = last_run(SCRATCH)
        parent_setup()
    else:
        if not args.resume and SCRATCH.exists():
            shutil.rmtree(SCRATCH)
        results = run_seeds(seeds, args.jobs, args.max_steps)
        results["elapsed_seconds"] = time.monotonic() - started
        results["jobs"] = args.jobs
        parent_setup()
        (SCRATCH / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    folder = args.output.parent / "report"
    text, facts = render(results, folder)
    for path, content in ((folder / "results.json", json.dumps(facts, indent=2, ensure_ascii=False) + "\n"),
                          (args.output, text)):  # fmt: skip
        temporary = path.with_name(path.name + ".partial")
        temporary.write_text(content)
        os.replace(temporary, path)  # a failed run leaves the previous report whole
    log(f"wrote {args.output} in {(time.monotonic() - started) / 60:.0f} min")
    if not args.keep:
        for seed in seeds if not args.render_only else ():
            shutil.rmtree(SCRATCH / f"seed-{seed}" / "models", ignore_errors=True)


if __name__ == "__main__":
    main()

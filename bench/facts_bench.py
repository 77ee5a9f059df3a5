"""Invented facts: the default recipe against the same recipe with ``facts_from_description``
on, trained on the same snapshot of the adidas reference data with the same seed, each scored
by its automatic evaluation beside the base model.

    python bench/facts_bench.py [--seeds 42] [--examples 40]

Runs in a scratch directory (var/facts-bench/: its own SQLite database and model store, Celery
tasks in this process), so the service's data is untouched; about 25 minutes per seed and
recipe on 2 CPU cores. Prints, per recipe, the mean (and, with several seeds, the standard
deviation) of the unsupported-claim share and of the metrics the change must not cost:
ROUGE-L, chrF, attribute coverage, repeated 4-grams and perplexity.
"""

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from train_bench import ADIDAS_CSV, ADIDAS_MAPPING  # noqa: E402  (the file and its documented mapping)

SCRATCH = ROOT / "var" / "facts-bench"
METRICS = ("unsupported_claim_share", "rouge_l", "chrf", "attribute_coverage", "repeated_4gram_share", "perplexity")
RECIPES = {"default": {}, "facts_from_description": {"facts_from_description": True}}


def log(message):
    print(f"[facts-bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def setup(examples, scratch=SCRATCH):
    """A fresh ``scratch``: its own SQLite database and model store, Celery tasks in this process,
    evaluations of ``examples`` validation examples without the fact guard."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "genapi.settings.dev",
            "GENAPI_VAR_DIR": str(scratch),
            "DATABASE_URL": f"sqlite:///{scratch / 'bench.sqlite3'}",
            "MODEL_STORE": str(scratch / "models"),
            "CELERY_TASK_ALWAYS_EAGER": "true",
            "PROMOTION_AUTO_ACTIVATE": "false",
            "EVALUATION_MAX_EXAMPLES": str(examples),
            # The recipes' own text: the fact guard (bench/fact_guard_bench.py) would hide the difference.
            "EVALUATION_FACT_GUARD": "false",
            "INFERENCE_NATIVE_DIR": os.environ.get("INFERENCE_NATIVE_DIR", str(ROOT / "var" / "native")),
        }
    )
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="42", help="comma-separated training seeds (default 42)")
    parser.add_argument("--examples", type=int, default=40, help="validation examples scored (default 40)")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    setup(args.examples)

    from django.core.management import call_command

    from finetuning.models import Dataset, Evaluation, FineTuningJob
    from finetuning.services.jobs import job_start

    call_command("migrate", verbosity=0)
    call_command("prepare_base_model")
    call_command("import_examples", str(ADIDAS_CSV), "--dataset", "adidas", *[f"--map={m}" for m in ADIDAS_MAPPING])
    dataset = Dataset.objects.get(name="adidas")

    scores = {name: [] for name in ("base", *RECIPES)}
    snapshot = None
    for seed in seeds:
        for recipe, hyperparameters in RECIPES.items():
            started = time.monotonic()
            job = job_start(dataset=dataset, hyperparameters={**hyperparameters, "seed": seed}, snapshot=snapshot)
            job = FineTuningJob.objects.get(pk=job.pk)
            if job.status != "succeeded":
                raise SystemExit(f"{recipe}, seed {seed}: the job {job.status}: {job.error}")
            snapshot = job.snapshot  # every recipe and seed trains on the same examples
            evaluation = Evaluation.objects.get(version=job.model_version)
            if evaluation.status != "succeeded":
                raise SystemExit(f"{recipe}, seed {seed}: the evaluation {evaluation.status}: {evaluation.error}")
            by_role = {score.role: score.metrics for score in evaluation.scores.all()}
            scores[recipe].append(by_role["candidate"])
            if recipe == "default":
                scores["base"].append(by_role["base"])
            log(f"{recipe}, seed {seed}: {job.model_version.name} trained and evaluated in "
                f"{time.monotonic() - started:.0f} s")  # fmt: skip

    examples = len(evaluation.example_ids)
    print(f"\nadidas validation examples scored: {examples}; seeds: {', '.join(map(str, seeds))}\n")
    print(f"{'':24}" + "".join(f"{key:>26}" for key in METRICS))
    for name, runs in scores.items():
        cells = []
        for key in METRICS:
            values = [run[key] for run in runs if run.get(key) is not None]
            mean = statistics.fmean(values)
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{mean:.3f}{spread}")
        print(f"{name:24}" + "".join(f"{cell:>26}" for cell in cells))
    default, facts = (statistics.fmean(run["unsupported_claim_share"] for run in scores[r]) for r in RECIPES)
    print(f"\nunsupported-claim share, facts_from_description / default: "
          f"{facts / default if default else float('nan'):.2f} (target <= 0.5)")  # fmt: skip


if __name__ == "__main__":
    main()

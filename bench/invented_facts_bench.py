"""Does a recipe that trains invented facts to be unlikely make the model state fewer facts, or
other ones? A check with a held-out half of the fact vocabulary.

    python bench/invented_facts_bench.py [--recipes learn,avoid] [--seed 42]

The unsupported-claims metric reads the same vocabulary that ``invented_facts`` (the recipe
setting, finetuning/hyperparameters.py) marks in the training descriptions, so a model taught
not to write "mesh" that writes "nylon" instead would look better by the metric alone. Here
training marks half A of the vocabulary only (bench/fact_guard_bench.py's halves: terms that
share a word stay together); half B is held out. Each recipe is trained on the same snapshot of
the adidas data with the same seed, in a scratch directory (var/invented-facts-bench/: its own
SQLite database and model store, Celery tasks in this process), and its automatic evaluation
scores the whole validation split. The bench prints, per recipe, the share of outputs with an
unsupported claim of half A, of half B and of the whole vocabulary, with ROUGE-L, chrF and the
mean words. Half B's share against the "learn" recipe's is the test: about the same or lower
means the avoided facts did not turn into other facts of the kinds the vocabulary covers.

About 40 minutes per recipe on 2 CPU cores, each alone.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from fact_guard_bench import halves  # noqa: E402  (the same split as the guard's check)
from facts_bench import setup  # noqa: E402  (a scratch of its own, tasks in this process, no fact guard)
from train_bench import ADIDAS_CSV, ADIDAS_MAPPING  # noqa: E402  (the file and its documented mapping)

SCRATCH = ROOT / "var" / "invented-facts-bench"
RECIPES = ("learn", "skip", "avoid")


def log(message):
    print(f"[invented-facts-bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="learn,avoid", help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    unknown = [recipe for recipe in recipes if recipe not in RECIPES]
    if unknown:
        raise SystemExit(f"invented_facts_bench: --recipes: {unknown[0]} is not one of {', '.join(RECIPES)}")
    setup(examples=100_000, scratch=SCRATCH)  # the whole validation split

    from django.core.management import call_command

    from finetuning.facts import unsupported
    from finetuning.models import Dataset, Evaluation, FineTuningJob
    from finetuning.selectors import fact_vocabulary
    from finetuning.services import jobs

    call_command("migrate", verbosity=0)
    call_command("prepare_base_model")
    call_command("import_examples", str(ADIDAS_CSV), "--dataset", "adidas", *[f"--map={m}" for m in ADIDAS_MAPPING])
    dataset = Dataset.objects.get(name="adidas")
    terms = fact_vocabulary()
    a, b = halves(terms)
    log(f"vocabulary {len(terms)} terms; training marks half A ({len(a)}): {', '.join(a)}")
    log(f"held out, half B ({len(b)}): {', '.join(b)}")
    # Training reads the vocabulary through jobs.fact_vocabulary; here it gets half A only.
    jobs.fact_vocabulary = lambda: list(a)

    rows, snapshot = [], None
    for recipe in recipes:
        started = time.monotonic()
        job = jobs.job_start(
            dataset=dataset, hyperparameters={"invented_facts": recipe, "seed": args.seed}, snapshot=snapshot
        )
        job = FineTuningJob.objects.get(pk=job.pk)
        if job.status != "succeeded":
            raise SystemExit(f"{recipe}: the job {job.status}: {job.error}")
        snapshot = job.snapshot  # every recipe trains on the same examples
        evaluation = Evaluation.objects.get(version=job.model_version)
        if evaluation.status != "succeeded":
            raise SystemExit(f"{recipe}: the evaluation {evaluation.status}: {evaluation.error}")
        log(f"{recipe}: {job.model_version.name} trained and evaluated in {time.monotonic() - started:.0f} s")
        score = evaluation.score("candidate")
        texts = [output["text"] for output in score.outputs]
        products = [sample["attributes"] for sample in evaluation.samples]
        shares = [
            sum(bool(unsupported(text, product, half)) for text, product in zip(texts, products, strict=True))
            / len(texts)
            for half in (a, b, terms)
        ]
        words = sum(len(text.split()) for text in texts) / len(texts)
        rows.append((recipe, *shares, score.metrics["rouge_l"], score.metrics["chrf"], words))

    print(f"\nseed {args.seed}, {len(texts)} validation examples, greedy, fact guard off\n")
    header = ("claims of A", "claims of B", "claims, all", "ROUGE-L", "chrF", "mean words")
    print(f"{'invented_facts':16}" + "".join(f"{column:>14}" for column in header))
    for recipe, share_a, share_b, share_all, rouge, chrf, words in rows:
        cells = [f"{100 * share_a:.1f}%", f"{100 * share_b:.1f}%", f"{100 * share_all:.1f}%"]
        cells += [f"{rouge:.2f}", f"{chrf:.2f}", f"{words:.1f}"]
        print(f"{recipe:16}" + "".join(f"{cell:>14}" for cell in cells))


if __name__ == "__main__":
    main()

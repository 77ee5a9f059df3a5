"""Report v2 (docs/report.py): from the results of a run with several seeds, the report shows
each metric as the mean ± standard deviation over seeds beside the base, the targets on the
mean and per seed, and links figures that exist; the summary that the slides read carries the
same numbers. The training run itself (about 70 minutes) is `make report`, not a test."""

import importlib.util
import json
import statistics
import sys

import pytest

from tests.worker import REPO

SHOES = {"name": "Ultra Runner Shoes", "brand": "adidas", "color": "Black", "category": "Shoes / Men/Shoes"}
TIGHTS = {"name": "Sculpt Tights", "brand": "adidas", "color": "Blue", "category": "Clothing / Women/Clothing"}
REFERENCES = [
    "Run the long way home. These adidas shoes have a soft cushioned midsole and a grippy rubber outsole.",
    "Sometimes confidence comes in a surprising form. These tights hug you as you bend and stretch.",
]
BASE_TEXTS = [
    "Ultra Runner Shoes is a shoe. Ultra Runner Shoes is a shoe that is a shoe that is a shoe for you.",
    "Sculpt Tights are tights. Sculpt Tights are tights that are tights that are tights for women.",
]
SEED_TEXTS = {
    42: ["Ultra Runner Shoes. These adidas shoes have a leather upper and a soft midsole for the long run.",
         "Sculpt Tights. These adidas tights hug you as you stretch, in a soft blue fabric."],
    7: ["Ultra Runner Shoes. Run the long way home in these adidas shoes with a rubber outsole.",
        "Sculpt Tights. These tights are made with Primegreen, 50% of it, and hold you in as you bend."],
}  # fmt: skip
# The same versions with the fact guard on: the invented materials replaced by the next word.
GUARDED = {
    42: [SEED_TEXTS[42][0].replace("a leather upper", "a soft upper"), SEED_TEXTS[42][1]],
    7: [
        SEED_TEXTS[7][0].replace("a rubber outsole", "a grippy outsole"),
        SEED_TEXTS[7][1].replace("made with Primegreen", "made with care"),
    ],
}


def _report_module():
    sys.path.insert(0, str(REPO / "docs"))
    spec = importlib.util.spec_from_file_location("report", REPO / "docs" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scored(texts, loss):
    from finetuning.facts import unsupported
    from finetuning.metrics import text_metrics
    from finetuning.selectors import fact_vocabulary

    attributes = [SHOES, TIGHTS]
    reasons = [
        "length" if text.startswith(("Ultra Runner Shoes is", "Sculpt Tights are")) else "stop" for text in texts
    ]
    metrics = text_metrics(texts, REFERENCES, attributes, reasons, fact_terms=fact_vocabulary())
    metrics |= {"validation_loss": loss, "perplexity": 2.718281828**loss}
    examples = [
        {"attributes": a, "reference": r, "text": t, "finish_reason": f, "unsupported": unsupported(t, a, fact_vocabulary())}
        for a, r, t, f in zip(attributes, REFERENCES, texts, reasons, strict=True)
    ]  # fmt: skip
    return {
        "source": "the validation split of adidas-job1 (snapshot abc)",
        "decoding": {"max_new_tokens": 160, "repetition_penalty": 1.0},
        "metrics": metrics,
        "examples": examples,
    }


def _results():
    runs = []
    for job, (seed, texts) in enumerate(SEED_TEXTS.items(), start=1):
        by_guard = {
            "off": {"evaluation": _scored(texts, 2.48 + job / 100), "base": _scored(BASE_TEXTS, 3.91)},
            "on": {"evaluation": _scored(GUARDED[seed], 2.48 + job / 100), "base": _scored(BASE_TEXTS, 3.91)},
        }
        runs.append(
            {
                "seed": seed,
                "version": f"adidas-job{job}",
                "hyperparameters": {"method": "lora", "seed": seed},
                "job_metrics": {
                    "steps": 164,
                    "train_seconds": 1200,
                    "target_tokens_per_second": 97,
                    "final_train_loss": 2.1 + job / 100,
                },  # fmt: skip
                "loss_history": [[1, 3.9], [80, 2.6], [164, 2.1 + job / 100]],
                "validation_history": [[82, 2.59], [164, 2.48 + job / 1000]],
                "promotion": {"passed": job == 1, "reason": "ROUGE-L F1 better than the base by more than 1"},
                "evaluation": by_guard["off"]["evaluation"],  # as served by default
                "base": by_guard["off"]["base"],
                "by_guard": by_guard,
            }
        )
    return {
        "seeds": list(SEED_TEXTS),
        "runs": runs,
        "base": _scored(BASE_TEXTS, 3.91),
        "data": {
            "csv_rows": 735,
            "csv_descriptions": 486,
            "example_count": 704,
            "train_examples": 649,
            "validation_examples": 2,
            "split_note": "validation: 2 chosen by description hash",
        },  # fmt: skip
        "elapsed_seconds": 4200,
    }


@pytest.mark.django_db
def test_the_report_shows_the_mean_and_spread_over_seeds_with_figures(tmp_path):
    report = _report_module()
    results = _results()
    # The default recipe before invented_facts: both seeds invented leather or Primegreen.
    before = {
        "generated": "2026-12-03 12:06 UTC",
        "seeds": [42, 7],
        "hyperparameters": {"method": "lora", "invented_facts": "learn"},
        "evaluation_source": "the validation split of adidas-job1 (snapshot abc)",
        "metrics": {
            key: {"runs": [run["by_guard"]["off"]["evaluation"]["metrics"][key] for run in results["runs"]]}
            for key in report.GUARD_METRICS
        },
    }
    before["metrics"]["unsupported_claim_share"]["runs"] = [1.0, 1.0]
    before["metrics"]["rouge_l"]["runs"] = [value + 2 for value in before["metrics"]["rouge_l"]["runs"]]
    # Today's training recipe before the repeated n-gram rule: half the outputs had a claim.
    between = {**before, "generated": "2026-12-03 15:11 UTC", "decoding": {"no_repeat_ngram_size": 0}}
    between["metrics"] = {**before["metrics"], "unsupported_claim_share": {"runs": [0.5, 0.5]}}
    del before["metrics"]["invented_number_share"]  # measured since
    text, facts = report.render(results, tmp_path / "report", before=before, between=between)

    rouge = [run["evaluation"]["metrics"]["rouge_l"] for run in results["runs"]]
    mean, sd = statistics.fmean(rouge), statistics.stdev(rouge)
    base = results["base"]["metrics"]["rouge_l"]
    row = next(line for line in text.splitlines() if line.startswith("| ROUGE-L F1"))
    assert f"| {base:.2f} | {mean:.2f} ± {sd:.2f} | {mean - base:+.2f} |" in row, row
    assert "mean ± sd of 2 seeds" in text and "seeds 42, 7" in text.replace("\n", " ")
    assert "all 2 of its" in text.replace("\n", " ")  # the whole split, not a sample
    # The targets are judged on the mean, and each seed is counted on its own.
    target = next(line for line in text.splitlines() if line.startswith("| ROUGE-L at least 5 points"))
    assert f"{mean - base:+.2f} points" in target and "of 2 |" in target
    # One row per seed's training, and the example outputs of the first seed with its invented facts.
    assert "| 42 | adidas-job1 | 164 | 20.0 min |" in text and "| 7 | adidas-job2 |" in text
    assert "*(unsupported: leather)*" in text  # as served by default; with the guard on, it was kept out
    assert "- *Fine-tuned, fact guard on:* Ultra Runner Shoes. These adidas shoes have a soft upper" in text
    # The fact guard: each version with the guard off and on, and issue 20's item 5 judged on them.
    claims = [line for line in text.splitlines() if line.startswith("| outputs with an unsupported claim (")]
    # After the main table: the recipe before and now, then the guard off and on.
    assert claims[1].endswith("| 100.0% ± 0.0 | 50.0% ± 0.0 | 75.0% ± 35.4 | -25.0 pts |"), claims
    numbers = [line for line in text.splitlines() if line.startswith("| outputs with a number the attributes")]
    assert numbers[1].endswith("| – | 25.0% ± 35.4 | 25.0% ± 35.4 | – |"), numbers  # measured since "before"
    assert "| 0.0% | 0.0% | 75.0% ± 35.4 | 0.0% ± 0.0 | -75.0 pts |" in claims[2], claims
    halves = [line for line in text.splitlines() if line.startswith("| outputs with an unsupported claim at most")]
    assert "75.0% -> 0.0% | yes | 2 of 2 |" in halves[1], halves  # the recipe's comes first
    assert facts["fact_guard"]["unsupported_claim_share"]["on"]["runs"] == [0.0, 0.0]
    # Item 5 on the recipe: today's default (these versions) against the one before, guard off.
    assert "before: `invented_facts` learn, repeats allowed (2026-12-03, seeds 42, 7)" in text
    assert "`avoid`, repeats allowed (2026-12-03, seeds 42, 7)" in text and "on the same validation" in text
    assert halves[0] == "| outputs with an unsupported claim at most half | 100.0% -> 75.0% | **no** | 1 of 2 |"
    rouge_target = next(line for line in text.splitlines() if line.startswith("| ROUGE-L at most 1 point lower"))
    assert rouge_target == "| ROUGE-L at most 1 point lower | -2.00 points | **no** | 0 of 2 |"
    assert facts["recipe_change"]["unsupported_claim_share"]["now"]["runs"] == [0.5, 1.0]
    # Every figure the text links was drawn.
    for name in ("loss", "metrics", "lengths", "serving"):
        assert f"](report/{name}.png)" in text
        assert (tmp_path / "report" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert "$" not in text.split("<!-- costs:begin -->")[0].replace("$ /", "")  # no placeholder left unfilled
    # The slides' numbers: the same as the report's, and plain JSON.
    json.dumps(facts)
    assert facts["metrics"]["rouge_l"]["mean"] == pytest.approx(mean)
    assert facts["metrics"]["rouge_l"]["runs"] == rouge and facts["seeds"] == [42, 7]
    assert facts["costs"]["rows"] and facts["serving"]["rows"]


def test_report_refuses_seeds_that_are_not_numbers():
    import subprocess

    result = subprocess.run([sys.executable, "docs/report.py", "--seeds", "42,x"], cwd=REPO, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 2 and "--seeds: comma-separated whole numbers, not '42,x'" in result.stderr

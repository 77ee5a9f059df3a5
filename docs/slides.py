"""The presentation: fill docs/slides/slides.template.md from the report's generated summary
(docs/report/results.json, written by `make report`) into slides.md, then render it to HTML
and PDF with Marp CLI (npm, pinned in docs/slides/package-lock.json) in Debian's chromium.

    make slides                       # or: python docs/slides.py [--out DIR]

No number is typed into the slides: each comes from results.json (the report run and the
serving measurement it quotes). Needs node/npm (Marp is installed into docs/slides/node_modules
on first use, from the npm registry) and chromium (`apt-get install chromium`, or CHROME_PATH).
Exits non-zero with one line saying what is missing.
"""

import argparse
import json
import os
import shutil
import statistics
import string
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
SLIDES = DOCS / "slides"
RESULTS = DOCS / "report" / "results.json"
# The evaluation metrics a slide shows, in order (all are in the report's table).
SHOWN_METRICS = (
    "rouge_l",
    "chrf",
    "attribute_coverage",
    "length_ratio",
    "repeated_4gram_share",
    "unsupported_claim_share",
    "invented_number_share",
    "perplexity",
)
EXAMPLE_WORDS = 60  # longer outputs are cut on the slide (the report has them whole)


class SlidesError(Exception):
    """What is missing or wrong, in one line."""


def _value(row, value):
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if row["percent"] else f"{value:.2f}"


def _spread(row):
    text = _value(row, row["mean"])
    if len(row["runs"]) > 1:
        text += f" ± {_value(row, row['sd']).removesuffix('%')}"
    return text


def _cut(text, words=EXAMPLE_WORDS):
    parts = text.split()
    return text if len(parts) <= words else " ".join(parts[:words]) + " … *(cut on the slide)*"


def _ratio(numerator, denominator):
    return f"{numerator / denominator:.2f}"


def values(facts, out):
    """Every placeholder of the template, from the report's summary."""
    metrics = facts["metrics"]
    example = facts["examples"][0]
    training = facts["training"]
    serving = facts["serving"]
    default = next(iter(serving["rows"].values()))
    baseline = serving["baseline"]["one_stream_tokens_per_second"]
    llama = next((row for name, row in (serving.get("anchors") or {}).items() if name.startswith("llama.cpp")), None)
    rows = []
    for key in SHOWN_METRICS:
        row = metrics[key]
        better = f" ({row['better']} is better)" if row["better"] else ""
        rows.append(f"| {row['label']}{better} | {_value(row, row['base'])} | {_spread(row)} |")
    missed = [target["name"] for target in facts["targets"] if not target["met"]]
    default_label = default["label"].removeprefix("engine, ")
    costs = [
        row
        for row in facts["costs"]["rows"]
        if row["weights"] == default_label or row["basis"] != "measured"  # the default setting, and the GPU guesses
    ]

    def figure(name):
        return os.path.relpath(DOCS / "report" / facts["figures"][name], out)

    return {
        "generated": facts["generated"],
        "machine": facts["machine"],
        "base_model": facts["base_model"],
        **{key: str(value) for key, value in facts["data"].items()},
        "example_facts": example["facts"],
        "example_reference": example["reference"],
        "example_base": _cut(example["base"]),
        "example_tuned": _cut(example["tuned"]),
        "lora_r": str(facts["hyperparameters"].get("lora_r", "–")),
        "seeds": ", ".join(map(str, facts["seeds"])),
        "seed_count": str(len(facts["seeds"])),
        "no_repeat_ngram_size": str(facts["decoding"].get("no_repeat_ngram_size", 0)),
        "first_seed": str(facts["seeds"][0]),
        "steps": str(training[0]["steps"]),
        "train_minutes": f"{statistics.fmean(run['train_minutes'] for run in training):.0f}",
        "evaluation_examples": str(facts["evaluation_examples"]),
        "metrics_rows": "\n".join(rows),
        "targets_met": str(sum(target["met"] for target in facts["targets"])),
        "targets_count": str(len(facts["targets"])),
        "targets_summary": "missed: " + "; ".join(missed) if missed else "every one",
        "base_unsupported": _value(metrics["unsupported_claim_share"], metrics["unsupported_claim_share"]["base"]),
        "tuned_unsupported": _spread(metrics["unsupported_claim_share"]),
        "references_unsupported": _value(
            metrics["unsupported_claim_share"], metrics["unsupported_claim_share"]["references"]
        ),
        "rouge_sd": f"{metrics['rouge_l']['sd']:.2f}",
        **guard_values(facts),
        "engine_one": _ratio(default["one_stream_tokens_per_second"], baseline),
        "engine_eight": _ratio(default["aggregate_8_clients_tokens_per_second"], baseline),
        "llama_sentence": f"**{_ratio(default['one_stream_tokens_per_second'], llama['one_stream_tokens_per_second'])}"
        f" x** llama.cpp on one stream"
        if llama
        else "llama.cpp was not measured in this run",
        "serving_when": f"{serving['when']}, `{serving['command']}`",
        "serving_machine": serving["machine"],
        "cost_rows": "\n".join(
            f"| {row['option']} ({row['kind']}{', assumed speed' if row['basis'] != 'measured' else ''}) "
            f"| ${row['usd_per_1000']:.3f} | {row['alone_seconds']:.1f} s |"
            for row in costs
        ),
        "prices_as_of": facts["costs"]["prices_as_of"],
        **{f"figure_{name}": figure(name) for name in facts["figures"]},
    }


def guard_values(facts):
    """The invented-facts slide: each metric of the default recipe before, with today's training and
    the decoding before the repeated n-gram rule, and now; and an
    example of the fact guard's text."""
    recipe = facts["recipe_change"]

    def then_now(key, which):
        return _spread({**recipe[key][which], "percent": recipe[key]["percent"]})

    missed = [target["name"] for target in facts["recipe_change_targets"] if not target["met"]]
    return {
        "recipe_rows": "\n".join(
            f"| {recipe[key]['label']} | {then_now(key, 'before')} | {then_now(key, 'between')} | {then_now(key, 'now')} |"
            for key in ("unsupported_claim_share", "rouge_l", "chrf", "attribute_coverage", "repeated_4gram_share")
        ),
        "recipe_summary": "every line met by the mean" if not missed else "missed by the mean: " + "; ".join(missed),
        "example_tuned_guarded": _cut(facts["examples"][0]["tuned_guarded"]),
    }


def write_markdown(out):
    if not RESULTS.is_file():
        raise SlidesError(f"no {RESULTS.relative_to(DOCS.parent)}: run `make report` first")
    facts = json.loads(RESULTS.read_text())
    template = string.Template((SLIDES / "slides.template.md").read_text())
    try:
        text = template.substitute(values(facts, out))
    except KeyError as exc:
        raise SlidesError(f"{RESULTS.name} lacks {exc.args[0]}: run `make report` again") from exc
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "slides.md"
    markdown.write_text(text)
    return markdown


def browser():
    path = os.environ.get("CHROME_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise SlidesError("chromium is not installed (apt-get install chromium, or set CHROME_PATH): no PDF without it")
    return path


def marp():
    """Marp CLI from docs/slides/node_modules, installed from the lock file on first use."""
    binary = SLIDES / "node_modules" / ".bin" / "marp"
    if not binary.exists():
        if not shutil.which("npm"):
            raise SlidesError("npm is not installed (apt-get install npm): Marp CLI comes from the npm registry")
        result = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=SLIDES, capture_output=True, text=True)
        if result.returncode != 0:
            raise SlidesError(f"npm ci failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return binary


def render(markdown, chrome):
    env = {**os.environ, "CHROME_PATH": chrome}
    # --html: the template's few HTML tags (small print) are kept; --allow-local-files: the figures.
    command = [str(marp()), "--no-stdin", "--html", "--allow-local-files", str(markdown)]
    for suffix, flags in ((".html", []), (".pdf", ["--pdf"])):
        target = markdown.with_suffix(suffix)
        partial = target.with_name(target.name + ".partial" + suffix)
        result = subprocess.run([*command, *flags, "-o", str(partial)], env=env, capture_output=True, text=True)
        if result.returncode != 0 or not partial.is_file():
            partial.unlink(missing_ok=True)
            lines = (result.stderr or result.stdout).strip().splitlines() or ["?"]
            raise SlidesError(f"marp could not write {target.name}: {lines[-1]}")
        os.replace(partial, target)  # whole or the previous one
        print(f"wrote {target}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SLIDES, help="where slides.md, .html and .pdf go")
    args = parser.parse_args()
    out = args.out.resolve()
    try:
        chrome = browser()  # before anything is written: no slides.md without its PDF
        markdown = write_markdown(out)
        print(f"wrote {markdown}")
        render(markdown, chrome)
    except SlidesError as exc:
        sys.exit(f"slides: {exc}")


if __name__ == "__main__":
    main()

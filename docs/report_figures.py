"""The report's figures, drawn with matplotlib from the report run's results
(docs/report.py) and the serving measurement (docs/measured_serving.json).

Each function takes plain data and a path, writes one PNG there and returns its name;
docs/report.py calls them all through ``draw``. Colours are fixed per side (base,
fine-tuned, references) so that a reader learns them once.
"""

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no screen on a worker or in CI
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

BASE = "#9a9a9a"
TUNED = "#1f6fb4"
REFERENCE = "#e08a1e"
ANCHOR = "#6a9a3a"
SEED_SHADES = ("#1f6fb4", "#5aa0d8", "#0b3d66", "#8fc1ea")
DPI = 110
SMOOTHING = 10  # steps in the training-loss curve's running mean

# The metrics the bars show, by panel: those on a 0-100 scale (shares shown as percentages)
# side by side, perplexity apart because its scale is its own.
SCORE_METRICS = ("rouge_l", "chrf", "bleu", "attribute_coverage", "repeated_4gram_share", "unsupported_claim_share")


def _save(figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(figure)
    return Path(path).name


def loss_curves(runs, path):
    """Training loss by step for each seed (thin), validation loss after each epoch (dots)."""
    figure, axes = plt.subplots(figsize=(7.5, 3.6))
    for shade, run in zip(SEED_SHADES, runs, strict=False):
        if run["loss_history"]:
            steps, losses = zip(*run["loss_history"], strict=True)
            axes.plot(steps, losses, color=shade, linewidth=0.6, alpha=0.25)
            # One batch's loss is noisy (batches differ in length and kind): the trend is the mean.
            window = min(SMOOTHING, len(losses))
            smooth = [statistics.fmean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
            axes.plot(steps, smooth, color=shade, linewidth=1.6,
                      label=f"training loss, seed {run['seed']} ({window}-step mean; faint: each step)")  # fmt: skip
        if run["validation_history"]:
            steps, losses = zip(*run["validation_history"], strict=True)
            axes.plot(steps, losses, color=shade, marker="o", linestyle="--", linewidth=1.2,
                      label=f"validation loss, seed {run['seed']}")  # fmt: skip
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("loss (nats per target token)")
    axes.set_title("Fine-tuning the default recipe (LoRA), one line per seed")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    return _save(figure, path)


def metric_bars(metrics, path):
    """Base against fine-tuned per metric, the fine-tuned bar at the mean over seeds with the
    standard deviation as its error bar; the references' own value as a line where it has one."""
    from finetuning.metrics import METRICS

    keys = [key for key in SCORE_METRICS if key in metrics]
    figure, (scores, perplexity) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [len(keys), 1.4]})
    width = 0.38
    for index, key in enumerate(keys):
        row = metrics[key]
        scale = 100 if METRICS[key].percent else 1
        scores.bar(index - width / 2, row["base"] * scale, width, color=BASE, label="base" if index == 0 else None)
        scores.bar(index + width / 2, row["mean"] * scale, width, yerr=row["sd"] * scale, capsize=3, color=TUNED,
                   label="fine-tuned (mean ± sd over seeds)" if index == 0 else None)  # fmt: skip
        if row.get("references") is not None:
            scores.hlines(row["references"] * scale, index - 0.45, index + 0.45, colors=REFERENCE, linewidth=2,
                          label="the shop's own descriptions" if key == "repeated_4gram_share" else None)  # fmt: skip
    scores.set_xticks(range(len(keys)))
    scores.set_xticklabels([_short_label(METRICS[key]) for key in keys], fontsize=8)
    scores.set_ylabel("score, or % of outputs")
    scores.set_title("Held-out adidas products", fontsize=10)
    scores.grid(axis="y", alpha=0.3)
    scores.legend(fontsize=7)
    row = metrics["perplexity"]
    perplexity.bar(0, row["base"], 0.6, color=BASE)
    perplexity.bar(1, row["mean"], 0.6, yerr=row["sd"], capsize=3, color=TUNED)
    perplexity.set_xticks([0, 1])
    perplexity.set_xticklabels(["base", "fine-tuned"], fontsize=8)
    perplexity.set_title("perplexity of the references\n(lower is better)", fontsize=9)
    perplexity.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def _short_label(metric):
    label = {"outputs with a repeated 4-gram": "outputs with a\nrepeated 4-gram %", "outputs with an unsupported claim":
             "outputs with an\nunsupported claim %", "attribute coverage": "attribute\ncoverage %"}.get(
        metric.label, metric.label)  # fmt: skip
    return f"{label}\n({metric.better} is better)"


def length_histogram(references, base, tuned, max_new_tokens, path):
    """Words per text: the references, the base's outputs and the fine-tuned outputs (every
    seed's, pooled)."""
    figure, axes = plt.subplots(figsize=(7.5, 3.4))
    longest = max(len(text.split()) for text in [*references, *base, *tuned])
    bins = range(0, longest + 10, 10)
    for texts, colour, label in (
        (references, REFERENCE, "references (the shop's copy)"),
        (base, BASE, "base model"),
        (tuned, TUNED, "fine-tuned, all seeds"),
    ):
        words = [len(text.split()) for text in texts]
        axes.hist(words, bins=bins, histtype="step", linewidth=1.8, color=colour, density=True,
                  label=f"{label}: median {statistics.median(words):.0f} words")  # fmt: skip
    axes.set_xlabel(f"words per text (outputs stop at {max_new_tokens} tokens)")
    axes.set_ylabel("share of texts per word")
    axes.set_title("Output length against the references")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def serving_bars(measured, path):
    """Tokens per second, one stream and 8 clients at once, for the engine's settings, the
    HF generate baseline and the anchors, all from one run of bench/serve_bench.py."""
    entries = [(measured["baseline"]["label"], measured["baseline"], BASE)]
    entries += [(row["label"], row, TUNED) for row in measured["rows"].values()]
    entries += [(row["label"], row, ANCHOR) for row in (measured.get("anchors") or {}).values()]
    figure, axes = plt.subplots(figsize=(9.5, 0.5 * len(entries) + 1.6))
    height = 0.38
    for index, (_, row, colour) in enumerate(entries):
        for offset, key, alpha in ((-height / 2, "one_stream_tokens_per_second", 1.0),
                                   (height / 2, "aggregate_8_clients_tokens_per_second", 0.55)):  # fmt: skip
            value = row.get(key)
            if value is None:
                continue
            axes.barh(index + offset, value, height, color=colour, alpha=alpha)
            axes.text(value, index + offset, f" {value:.0f}", va="center", fontsize=7)
    axes.set_yticks(range(len(entries)))
    axes.set_yticklabels([label for label, _, _ in entries], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("generated tokens per second (solid: one stream; light: 8 clients at once)")
    axes.set_title("Serving SmolLM2-135M on 2 CPU cores, one run", fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    return _save(figure, path)

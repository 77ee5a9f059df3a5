"""Evaluation metrics of generated descriptions against references: plain
functions of texts, no Django and no model.

Scales: ROUGE-L, chrF and BLEU are 0-100 (as their packages and papers print
them); shares (coverage, cut off, repetition, format failures) are 0-1.
"""

import math
import re
from dataclasses import dataclass

from finetuning.prompts import IM_END, IM_START, product_lines

# The attributes whose values a description is expected to mention.
COVERAGE_KEYS = ("name", "color", "category", "brand", "features")
# Words too common to show that a value was mentioned.
STOPWORDS = frozenset("a an and at by for from in of on or the to with".split())
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_INSTRUCTION = "write a product description for this product"


@dataclass(frozen=True)
class Metric:
    label: str
    better: str  # "higher", "lower", or "" (no better direction: a description of the outputs)
    percent: bool = False  # a 0-1 share, shown as a percentage
    decimals: int = 2  # shown with at least this many (of the percentage, for a share)


# "(evaluation)": training reports a validation loss too, on the same examples cut at its
# max_seq_length (and without those that do not fit): a different number, never shown
# under the same name (the version page calls that one "validation loss (training)").
METRICS = {
    "validation_loss": Metric("validation loss (evaluation)", "lower", decimals=4),
    "perplexity": Metric("perplexity (evaluation)", "lower"),
    "rouge_l": Metric("ROUGE-L F1", "higher"),
    "chrf": Metric("chrF", "higher"),
    "bleu": Metric("BLEU", "higher"),
    "attribute_coverage": Metric("attribute coverage", "higher", percent=True, decimals=1),
    "mean_words": Metric("mean words", ""),
    "reference_mean_words": Metric("reference mean words", ""),
    "length_ratio": Metric("length ratio to references", ""),
    "cut_off_share": Metric("cut off by the token limit", "lower", percent=True, decimals=1),
    "distinct_2": Metric("distinct-2", "higher", decimals=4),
    "repeated_4gram_share": Metric("outputs with a repeated 4-gram", "lower", percent=True, decimals=1),
    "empty_share": Metric("empty outputs", "lower", percent=True, decimals=1),
    "echo_share": Metric("outputs echoing the prompt", "lower", percent=True, decimals=1),
    "format_failure_share": Metric("format failures (empty or echo)", "lower", percent=True, decimals=1),
    # Outputs asserting a product fact (material, technology, sport, fit, certification: the
    # vocabulary of finetuning/facts.py) that the product's attributes do not state.
    "unsupported_claim_share": Metric("outputs with an unsupported claim", "lower", percent=True, decimals=1),
    # A number written in digits that no attribute value writes ("50% of the upper", "the 1970s"):
    # a fact the vocabulary cannot hold (finetuning/facts.py).
    "invented_number_share": Metric(
        "outputs with a number the attributes do not give", "lower", percent=True, decimals=1
    ),
}


def words(text):
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def fold(word):
    """A crude singular without the possessive, so that 'shoes' mentions 'shoe', 'laces'
    mentions 'lace' and "men's" mentions 'men'."""
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 4 and word.endswith("es") and word[-3] in "sxz":
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def attribute_values_by_key(attributes):
    """[(key, value)] a description should mention: the name whole, each feature, and each
    part of a category or colour path ('Shoes / Women/Shoes' -> Shoes, Women), once each."""
    pairs, seen = [], set()
    for key in COVERAGE_KEYS:
        value = attributes.get(key)
        if value is None:
            continue
        items = value if isinstance(value, list) else [str(value)]
        if key in ("category", "color"):
            items = [part for item in items for part in re.split(r"[/|>]", item)]
        for item in items:
            item = item.strip()
            if item and item.lower() not in seen:
                seen.add(item.lower())
                pairs.append((key, item))
    return pairs


def attribute_values(attributes):
    return [value for _, value in attribute_values_by_key(attributes)]


def mentions(text, value):
    """Whether ``text`` mentions ``value``: every content word of the value appears
    in the text as a word (case and plural aside), in any order."""
    needed = {fold(w) for w in words(value) if w not in STOPWORDS}
    if not needed:
        return False
    return needed <= {fold(w) for w in words(text)}


def attribute_coverage(text, attributes):
    """The share of the product's values the text mentions; None when it has none."""
    values = [value for value in attribute_values(attributes) if any(w not in STOPWORDS for w in words(value))]
    if not values:
        return None
    return sum(mentions(text, value) for value in values) / len(values)


def _ngrams(tokens, n):
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def has_repeated_ngram(text, n=4):
    grams = _ngrams(words(text), n)
    return len(grams) != len(set(grams))


def distinct_n(texts, n=2):
    """Distinct n-grams over all n-grams of all texts (corpus level); None without any."""
    grams = [gram for text in texts for gram in _ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else None


def echoes_prompt(text, attributes):
    """Whether the output repeats the prompt instead of describing: chat markers, the
    instruction, or at least two of the prompt's 'Label: value' lines (the only line
    when there is one)."""
    lowered = " ".join(text.lower().split())
    if IM_START in text or IM_END in text or _INSTRUCTION in lowered:
        return True
    lines = [" ".join(line.lower().split()) for line in product_lines(attributes)]
    echoed = sum(1 for line in lines if line in lowered)
    return echoed >= min(2, len(lines)) if lines else False


def rouge_l(candidates, references):
    """Mean ROUGE-L F1 x 100 (the rouge-score package, Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(reference, candidate)["rougeL"].fmeasure
        for candidate, reference in zip(candidates, references, strict=True)
    ]
    return 100 * sum(scores) / len(scores) if scores else None


def chrf(candidates, references):
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score(list(candidates), [list(references)]).score if candidates else None


def bleu(candidates, references):
    from sacrebleu.metrics import BLEU

    return BLEU().corpus_score(list(candidates), [list(references)]).score if candidates else None


def _mean(values):
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def text_metrics(outputs, references, attributes, finish_reasons, fact_terms=None):
    """Every metric of generated ``outputs`` (one per example) that needs no model. Without
    ``fact_terms`` (the fact vocabulary, finetuning/facts.py) unsupported claims are not measured."""
    from finetuning.facts import invented_numbers, unsupported

    count = len(outputs)
    if not count or not len(references) == len(attributes) == len(finish_reasons) == count:
        raise ValueError("text_metrics needs one reference, attribute set and finish reason per output")
    stripped = [text.strip() for text in outputs]
    mean_words = _mean([len(words(text)) for text in stripped])
    reference_words = _mean([len(words(text)) for text in references])
    empty = [not text for text in stripped]
    echo = [bool(text) and echoes_prompt(text, attrs) for text, attrs in zip(stripped, attributes, strict=True)]
    return {
        "rouge_l": rouge_l(stripped, references),
        "chrf": chrf(stripped, references),
        "bleu": bleu(stripped, references),
        "attribute_coverage": _mean(attribute_coverage(t, a) for t, a in zip(stripped, attributes, strict=True)),
        "mean_words": mean_words,
        "reference_mean_words": reference_words,
        "length_ratio": mean_words / reference_words if reference_words else None,
        "cut_off_share": sum(reason == "length" for reason in finish_reasons) / count,
        "distinct_2": distinct_n(stripped, 2),
        "repeated_4gram_share": sum(has_repeated_ngram(text) for text in stripped) / count,
        "empty_share": sum(empty) / count,
        "echo_share": sum(echo) / count,
        "format_failure_share": sum(e or c for e, c in zip(empty, echo, strict=True)) / count,
        "unsupported_claim_share": None
        if fact_terms is None
        else sum(bool(unsupported(t, a, fact_terms)) for t, a in zip(stripped, attributes, strict=True)) / count,
        "invented_number_share": sum(bool(invented_numbers(t, a)) for t, a in zip(stripped, attributes, strict=True))
        / count,
    }


def loss_metrics(loss):
    return {"validation_loss": loss, "perplexity": math.exp(loss) if loss is not None else None}


_MOST_DECIMALS = 6


def _shown(key, value):
    """``value`` in the unit it is shown in: a share as a percentage."""
    metric = METRICS.get(key)
    return 100 * value if metric and metric.percent else value


def metric_format(key, value, decimals=None):
    """``value`` as shown: a share as a percentage; ``decimals`` (default: the metric's own)."""
    if value is None:
        return "–"
    metric = METRICS.get(key)
    places = decimals if decimals is not None else (metric.decimals if metric else 2)
    return f"{_shown(key, value):.{places}f}{'%' if metric and metric.percent else ''}"


def decimals_to_tell_apart(key, values):
    """The fewest decimals, at least the metric's own, at which values that differ also
    read differently: "14.06" beside "14.06" says nothing about which is better."""
    metric = METRICS.get(key)
    places = metric.decimals if metric else 2
    numbers = sorted({_shown(key, value) for value in values if value is not None})
    while places < _MOST_DECIMALS and len({f"{n:.{places}f}" for n in numbers}) < len(numbers):
        places += 1
    return places


def metric_amount(key, amount):
    """An unsigned amount of metric ``key`` (a margin, a tolerance) in the unit it is shown in."""
    metric = METRICS.get(key)
    return f"{100 * amount:g} pp" if metric and metric.percent else f"{amount:g}"


def metric_delta(key, value, reference, decimals=None):
    """``value - reference`` signed, in the unit shown (percentage points for a share), with
    enough decimals that a difference never reads as zero; None when either is missing."""
    if value is None or reference is None:
        return None
    metric = METRICS.get(key)
    places = decimals if decimals is not None else (metric.decimals if metric else 2)
    delta = _shown(key, value) - _shown(key, reference)
    while places < _MOST_DECIMALS and delta and float(f"{delta:.{places}f}") == 0:
        places += 1
    return f"{delta:+.{places}f}{' pp' if metric and metric.percent else ''}"


def is_worse(key, value, reference, *, tolerance=0.0):
    """Whether ``value`` is worse than ``reference`` on metric ``key`` by more than
    ``tolerance`` (in the metric's own units); metrics with no direction never are."""
    better = METRICS[key].better
    if value is None or reference is None or not better:
        return False
    return value < reference - tolerance if better == "higher" else value > reference + tolerance


def improvement(key, value, reference):
    """How much better ``value`` is than ``reference`` (negative: worse), in the metric's units."""
    return value - reference if METRICS[key].better == "higher" else reference - value


def promotion_settings_problems():
    """What is wrong with the promotion gate's metric settings, one message each."""
    from django.conf import settings

    choices = ", ".join(key for key, metric in METRICS.items() if metric.better)
    return [
        f"{name}: {key!r} is not a metric with a better direction (choose from {choices})"
        for name, keys in (
            ("PROMOTION_PRIMARY_METRIC", [settings.PROMOTION_PRIMARY_METRIC]),
            ("PROMOTION_GUARD_METRICS", list(settings.PROMOTION_GUARD_METRICS)),
        )
        for key in keys
        if key not in METRICS or not METRICS[key].better
    ]

"""Product facts that a description states, and whether the product's attributes say them: the
"unsupported claims" metric (finetuning/metrics.py) and the recipe's fact extraction
(finetuning/recipe.py, ``facts_from_description``). Plain functions, no Django, no model.

A fact term is a word or phrase that asserts something checkable about a product: a material
("leather", "recycled polyester"), a technology ("boost", "primegreen"), a sport ("running"), a
fit ("regular fit") or a certification ("better cotton initiative"). The vocabulary is the
reviewed list in ``fact_terms.json`` beside this module, built from the terms that recur in the
adidas training descriptions (``python manage.py fact_terms suggest`` lists the candidates),
plus what curators add in the admin (``FactTerm``).

A text mentions a term when the term's words appear in it in order, next to each other, with
the normalisation of attribute coverage (lower case, plural and possessive folded: "Shoes"
mentions "shoe", "adidas'" mentions "adidas"). A mention is a mention whatever surrounds it: "no
leather" and "leather-free" assert leather as much as "leather upper" does for this metric,
which counts claims, not their truth. An output makes an unsupported claim when it mentions a
term that none of its product's attribute values mention.

Numbers are facts the vocabulary cannot hold: "50% of the upper is recycled content" claims a
share, "since the 1970s" a history. A number in a text is given when the same number (its
digits and "%", "1,000" read as "1000") appears in an attribute value; otherwise it is invented
(``invented_numbers``, the evaluations' "outputs with a number the attributes do not give").
Only numbers written in digits count: "fifty percent" does not. Training does not mark them:
trained to be unlikely, a number mostly gave way to another, not to none (docs/REPORT.md,
section 5).
"""

import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

from finetuning.metrics import STOPWORDS, fold, words

KINDS = ("material", "technology", "sport", "fit", "certification")
VOCABULARY_PATH = Path(__file__).with_name("fact_terms.json")


@lru_cache(maxsize=1)
def shipped_terms():
    """{term: kind} of the reviewed vocabulary in fact_terms.json."""
    data = {k: v for k, v in json.loads(VOCABULARY_PATH.read_text(encoding="utf-8")).items() if not k.startswith("_")}
    unknown = set(data) - set(KINDS)
    if unknown:
        raise ValueError(f"{VOCABULARY_PATH.name}: unknown kinds {', '.join(sorted(unknown))}")
    return {term.lower(): kind for kind in KINDS for term in data.get(kind, [])}


def _folded(text):
    return [fold(word) for word in words(text)]


def normal_form(text):
    """``text`` as the matching sees it: folded words joined by spaces ("Snug fits" -> "snug fit")."""
    return " ".join(_folded(text))


def _contains(haystack, needle):
    width = len(needle)
    return any(haystack[i : i + width] == needle for i in range(len(haystack) - width + 1))


def mentioned(text, terms):
    """The terms of ``terms`` that ``text`` mentions, in the order given."""
    folded = _folded(text)
    return [term for term in terms if (needle := _folded(term)) and _contains(folded, needle)]


_WORD_SPAN = re.compile(r"[a-z0-9]+(?:['\u2019][a-z]+)?", re.IGNORECASE)


def mention_spans(text, terms):
    """[(start, end)] character spans of ``text`` where a term of ``terms`` is mentioned, with the
    matching of ``mentioned`` (folded words, in order, next to each other), in text order."""
    found = [(match.start(), match.end(), fold(match.group().lower().replace("\u2019", "'")))
             for match in _WORD_SPAN.finditer(text)]  # fmt: skip
    folded = [word for _, _, word in found]
    spans = set()
    for term in terms:
        needle = _folded(term)
        width = len(needle)
        for i in range(len(folded) - width + 1) if needle else ():
            if folded[i : i + width] == needle:
                spans.add((found[i][0], found[i + width - 1][1]))
    return sorted(spans)


# Digits not inside a word, and what follows them up to the end of the word.
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:[.,]\d+)*)(%|[^\W_]*)")


def _numbers(text):
    """The numbers ``text`` writes in digits, as compared: thousands separators dropped, a decimal
    part and a "%" kept ("1,000" -> "1000"; "100%" is not the price "100"). Digits followed by
    letters are a name ("4DFWD", "3D"), except a decade's "s"."""
    return [
        re.sub(r",(?=\d{3}\b)", "", digits) + (after if after == "%" else "")
        for digits, after in _NUMBER.findall(text)
        if after in ("", "%", "s")
    ]


def invented_numbers(text, attributes):
    """The numbers ``text`` writes that no attribute value of the product writes, in text order."""
    given = set(_numbers(attribute_text(attributes)))
    return [number for number in _numbers(text) if number not in given]


def attribute_text(attributes):
    """Every attribute value of a product as one text (lists joined): what supports a claim."""
    parts = []
    for value in attributes.values():
        parts.extend(str(item) for item in (value if isinstance(value, list) else [value]) if item is not None)
    return "\n".join(parts)


def unsupported(text, attributes, terms):
    """The terms ``text`` mentions that no attribute value of the product mentions."""
    supported = set(mentioned(attribute_text(attributes), terms))
    return [term for term in mentioned(text, terms) if term not in supported]


def features_with_facts(attributes, description, terms):
    """The product's features plus the fact terms its description mentions that its attributes
    do not: the training example's attributes when the recipe extracts facts, so that the model
    learns to take facts from the prompt rather than to invent them."""
    features = list(attributes.get("features") or [])
    missing = unsupported(description, attributes, terms)
    return features + [term for term in missing if term not in {f.lower() for f in features}]


def candidates(descriptions, *, min_share=0.01, longest=3):
    """[(phrase, count)] of the word sequences (1 to ``longest`` words, no stopword at either end,
    no number) found in at least ``min_share`` of ``descriptions``, most frequent first, each as
    it is most often written: what a person reviews to pick fact terms from; most of it is not a
    fact ("comfort", "look"). Sequences that differ only by plural or possessive count as one."""
    counts, spellings = Counter(), {}
    for text in descriptions:
        written = words(text)
        folded = [fold(word) for word in written]
        seen = set()
        for width in range(1, longest + 1):
            for i in range(len(folded) - width + 1):
                gram = tuple(folded[i : i + width])
                if gram[0] in STOPWORDS or gram[-1] in STOPWORDS or any(w.isdigit() for w in gram):
                    continue
                if gram not in seen:
                    seen.add(gram)
                    spellings.setdefault(gram, Counter())[" ".join(written[i : i + width])] += 1
        counts.update(seen)
    floor = max(2, int(min_share * len(descriptions)))
    return [(spellings[gram].most_common(1)[0][0], count) for gram, count in counts.most_common() if count >= floor]

"""The fact guard: generated text may not state a product fact that its prompt does not.

The facts are the terms of the fact vocabulary (finetuning/facts.py: materials, technologies,
sports, fits and certifications; the reviewed list shipped with the code plus the curators'
additions), the same terms the unsupported-claims metric counts. For each request with
``fact_guard`` on (GenerationParams; GENERATE_FACT_GUARD when the request does not say), every term
that its prompt does not mention, matched as the metric matches (case, plural and possessive
folded), is banned in each of its written forms: lower case, capitalised, title case and upper
case; singular and plural; with spaces or hyphens between its words. A form is banned as the
tokens of a word that follows a space, anywhere in the text, and as the tokens of a word at the
start of the text or after a token that ends in punctuation or a line break ("(mesh"). The engine
masks a form's last token whenever the text so far ends with its others
(engine/sampling.py: BannedSequences), so the model writes its next most likely word instead
("a breathable upper" where it would have said "a mesh upper"). Banning token sequences alone
leaves the model the next most likely spelling of the same claim: measured on the adidas data,
"Prime green", "AEROREAD Yarn", "moisture-absorbping". So a term of six letters or more is also
banned by its letters, whatever the tokens: as a word, joined with the word before it, or begun
beyond three quarters of its letters (the candidates the model would choose from are checked
against the text they would make).

What it does not do: it knows only the vocabulary's terms, so a fact outside it ("nylon", "eco-
friendly") passes, and it cannot tell a claim from a denial ("no leather" is banned like "leather
upper"). The metric has the same blind spots, so an evaluation with the guard on measures the
claims the guard can see: docs/REPORT.md reports both, with the guard on and off.
"""

import logging
import threading
import weakref

from finetuning.facts import mentioned

logger = logging.getLogger(__name__)
_cache = weakref.WeakKeyDictionary()  # tokenizer -> _TokenizerForms
_cache_lock = threading.Lock()


def written_forms(term):
    """The ways a text may write ``term`` that the metric reads as a mention of it."""
    spellings = {term, term.replace("-", " "), term.replace(" ", "-")}
    forms = set()
    for spelling in spellings:
        plural = spelling + ("es" if spelling.endswith(("s", "x", "z", "ch", "sh")) else "s")
        for written in (spelling, plural):
            forms |= {written.lower(), written[:1].upper() + written[1:], written.title(), written.upper()}
    return sorted(form for form in forms if mentioned(form, [term]))


class _TokenizerForms:
    """One tokenizer's token sequences for each term, and its tokens that end a word."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lock = threading.Lock()
        self.terms = {}  # term -> (after a space, at a word's start)
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        # A token whose text ends in neither a letter nor a digit: what follows it starts a word.
        self.breaks = frozenset(i for i, text in enumerate(texts) if text and not text[-1].isalnum())
        self.texts = texts

    def sequences(self, term):
        with self.lock:
            if term not in self.terms:
                encode = self.tokenizer.encode
                forms = written_forms(term)
                spaced = {tuple(encode(" " + form, add_special_tokens=False)) for form in forms}
                bare = {tuple(encode(form, add_special_tokens=False)) for form in forms}
                self.terms[term] = (tuple(s for s in spaced if s), tuple(s for s in bare if s))
            return self.terms[term]


def tokenizer_forms(tokenizer):
    """The fact guard's tables for ``tokenizer`` (about a second to build, once per tokenizer: the
    loader builds them when it loads a model, not in a request)."""
    with _cache_lock:
        forms = _cache.get(tokenizer)
        if forms is None:
            forms = _cache[tokenizer] = _TokenizerForms(tokenizer)
        return forms


def guard_for(tokenizer, prompt_text, terms):
    """The BannedSequences of a generation from ``prompt_text``: every term of ``terms`` that the
    prompt does not mention."""
    from inference.engine.sampling import BannedSequences, squashed

    forms = tokenizer_forms(tokenizer)
    supported = set(mentioned(prompt_text, terms))
    anywhere, word_start = [], []
    for term in terms:
        if term not in supported:
            spaced, bare = forms.sequences(term)
            anywhere.extend(spaced)
            word_start.extend(bare)
    stems = {stem for term in terms if term not in supported and len(stem := squashed(term)) >= 6}
    return BannedSequences(
        anywhere=anywhere, word_start=word_start, breaks=forms.breaks, stems=sorted(stems), texts=forms.texts
    )


_last_vocabulary = None  # the vocabulary the last request read, for when the database is away


def request_guard(tokenizer, prompt_text):
    """guard_for with the service's fact vocabulary (the database's curators' terms included), read
    per request so that a curator's new term counts at once. While the database is unavailable,
    generation goes on (inference/errors.py) with the vocabulary last read, or the shipped one."""
    global _last_vocabulary
    from django.db import DatabaseError

    from finetuning.facts import shipped_terms
    from finetuning.selectors import fact_vocabulary

    try:
        _last_vocabulary = terms = fact_vocabulary()
    except DatabaseError:
        terms = _last_vocabulary or sorted(shipped_terms())
        logger.warning("The fact guard uses the vocabulary last read: the database is unavailable")
    return guard_for(tokenizer, prompt_text, terms)

"""The fact guard (inference/fact_guard.py): a product fact of the vocabulary that the prompt does
not state is not written, as a client of the API meets it.

The tiny test model writes noise (sampled: its greedy text is empty), so the "fact" here is a word
of its own text that a curator adds to the vocabulary (FactTerm): what the guard keeps out is then
known."""

import json

import pytest

from finetuning.facts import mentioned, unsupported
from finetuning.metrics import words
from finetuning.models import FactTerm
from finetuning.prompts import product_prompt
from finetuning.scoring import Decoding
from finetuning.selectors import fact_vocabulary
from inference.engine.sampling import BannedSequences, squashed
from inference.fact_guard import written_forms

URL = "/api/generate"
PRODUCT = {"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey"}


@pytest.fixture
def post(client, auth):
    def send(body):
        response = client.post(URL, data=json.dumps(body), content_type="application/json", **auth)
        assert response.status_code == 200, response.content
        return response.json()["choices"][0]["text"]

    return send


def test_every_written_form_of_a_term_is_read_by_the_metric_as_that_term():
    forms = written_forms("slim fit")
    assert {"slim fit", "Slim fit", "Slim Fit", "SLIM FIT", "slim-fit", "slim fits", "Slim-Fit"} <= set(forms)
    assert "Leathers" in written_forms("leather") and "Moisture wicking" in written_forms("moisture-wicking")
    for term in ("slim fit", "canvas", "moisture-wicking", "heat.rdy"):
        assert all(mentioned(form, [term]) == [term] for form in written_forms(term)), term


def test_a_banned_sequence_masks_its_last_token_after_the_others_and_a_bare_word_only_where_a_word_starts():
    banned = BannedSequences(anywhere=[(5,), (7, 8)], word_start=[(9, 10)], breaks=frozenset({3}))
    assert banned.blocked([]) == {5}
    assert banned.blocked([1, 7]) == {5, 8}  # a two-token word: its second token after its first
    assert banned.blocked([9]) == {5, 10}  # the bare word opening the text
    assert banned.blocked([1, 3, 9]) == {5, 10}  # after punctuation ("(mesh")
    assert banned.blocked([1, 9]) == {5}  # in the middle of another word ("Ultraboost" is not "boost")
    assert not BannedSequences()


def test_a_long_fact_is_banned_by_its_letters_however_it_is_split_or_cut_short():
    stems = [squashed(term) for term in ("primegreen", "aeroready", "moisture-absorbing", "running")]
    guard = BannedSequences(stems=stems)
    for text in ("made with Primegreen", "made with Prime green", "PRIME-GREEN", "AEROREAD", "moisture-absorb",
                 "Running", "runnin"):  # fmt: skip
        assert guard.writes_stem(text), text
    for text in ("made with Prime", "AERO", "Ultra Runner", "the heat.", "a runner", "moisture"):
        assert not guard.writes_stem(text), text


def _fact_of(version, text, attributes):
    """A word of ``text`` that the prompt of ``attributes`` does not state, one token after a space
    (the tiny model writes most of its words in other splits of tokens than the tokenizer's, which
    the guard, like a real model's text, sees only as the tokenizer writes them); None if none."""
    from inference.loader import model_get

    tokenizer = model_get(version).tokenizer
    stated = set(words(product_prompt(attributes)))
    for word in words(text):
        if len(word) >= 3 and word.isalpha() and word not in stated and f" {word}" in text:
            if len(tokenizer.encode(f" {word}", add_special_tokens=False)) == 1:
                return word
    return None


def test_with_the_guard_on_a_fact_the_product_does_not_state_stays_out_of_the_text(base_version, post):
    for seed in range(1, 30):  # a sampled text with a word to make a fact of
        body = {"product": PRODUCT, "max_new_tokens": 40, "temperature": 1.0, "seed": seed}
        free = post(body)  # off by default (GENERATE_FACT_GUARD)
        fact = _fact_of(base_version, free, PRODUCT)
        if fact:
            break
    assert fact, "no sampled text of the tiny model has a word to make a fact of"
    assert not unsupported(free, PRODUCT, fact_vocabulary())
    assert post({**body, "fact_guard": True}) == free  # nothing in it to keep out: the guard changes nothing

    FactTerm.objects.create(term=fact, kind="material")  # a curator's new term counts at once
    guarded = post({**body, "fact_guard": True})
    assert fact not in words(guarded) and guarded != free
    assert unsupported(guarded, PRODUCT, fact_vocabulary()) == []
    assert post(body) == post({**body, "fact_guard": False}) == free  # off: the model's text as it is

    # A fact the product states is the product's to write: the guard keeps nothing out.
    stating = {**PRODUCT, "features": [fact]}
    assert post({**body, "product": stating, "fact_guard": True}) == post({**body, "product": stating})


def test_an_evaluation_stored_before_the_guard_was_generated_without_it(settings):
    old = {"greedy": True, "max_new_tokens": 40, "repetition_penalty": 1.0}
    assert Decoding.from_dict(old).fact_guard is False
    assert Decoding.from_dict(old).no_repeat_ngram_size == 0  # nor the repeated n-gram rule
    assert Decoding.from_dict(old).min_new_tokens == 0  # nor the length floor
    settings.EVALUATION_FACT_GUARD, settings.EVALUATION_NO_REPEAT_NGRAM_SIZE = True, 5
    settings.EVALUATION_MIN_NEW_TOKENS = 30
    assert Decoding.from_settings().as_dict()["fact_guard"] is True
    kept = Decoding.from_dict(Decoding.from_settings().as_dict())
    assert (kept.no_repeat_ngram_size, kept.min_new_tokens) == (5, 30)

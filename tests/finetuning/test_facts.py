"""The unsupported-claims metric and its fact vocabulary (finetuning/facts.py)."""

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from finetuning.facts import (
    KINDS,
    features_with_facts,
    invented_numbers,
    mention_spans,
    mentioned,
    shipped_terms,
    unsupported,
    words,
)
from finetuning.metrics import text_metrics
from finetuning.models import FactTerm
from finetuning.selectors import fact_vocabulary
from finetuning.services.examples import example_create

TERMS = ["leather", "mesh", "primegreen", "snug fit", "running", "recycled polyester"]
SHOE = {"name": "Ultra Runner", "color": "Black", "category": "Shoes", "features": ["mesh upper"]}


def test_a_claim_the_attributes_state_is_supported_and_one_they_do_not_is_not():
    text = "A running shoe with a mesh upper and a leather heel."
    assert mentioned(text, TERMS) == ["leather", "mesh", "running"]
    assert unsupported(text, SHOE, TERMS) == ["leather", "running"]  # mesh: in the features
    assert unsupported(text, {**SHOE, "category": "Running / Shoes"}, TERMS) == ["leather"]


def test_mentions_ignore_case_plural_and_possessive_but_keep_a_phrase_together():
    assert mentioned("PRIMEGREEN's story", TERMS) == ["primegreen"]
    assert mentioned("Two snug fits", TERMS) == ["snug fit"]
    assert mentioned("Leathers and Meshes", ["leather"]) == ["leather"]
    # The words of a phrase must be next to each other and in order.
    assert mentioned("a fit that is snug", TERMS) == []
    assert mentioned("polyester, recycled", TERMS) == []
    # A word is not a part of a longer one.
    assert mentioned("leatherette", TERMS) == []


def test_mention_spans_are_where_the_matching_finds_each_mention_as_written():
    text = "Leathers, a Snug Fit and PRIMEGREEN\u2019s story; no leatherette, a fit that is snug."
    spans = mention_spans(text, TERMS)
    assert [text[start:end] for start, end in spans] == ["Leathers", "Snug Fit", "PRIMEGREEN\u2019s"]
    assert mention_spans(text, ["mesh"]) == [] and mention_spans(text, []) == []
    # Every mention that ``mentioned`` counts has a span, and a span holds nothing else.
    for term in TERMS:
        assert bool(mention_spans(text, [term])) == (term in mentioned(text, TERMS))
        assert all(mentioned(text[start:end], [term]) for start, end in mention_spans(text, [term]))


def test_a_negated_mention_is_still_a_claim():
    # The metric counts what a text asserts about a fact, not whether it asserts it or denies it
    # (finetuning/facts.py says so): "no leather" on a product whose attributes never mention
    # leather is as unsupported as "leather upper".
    assert unsupported("Made with no leather at all.", SHOE, TERMS) == ["leather"]


def test_the_share_counts_outputs_with_at_least_one_unsupported_claim():
    outputs = ["A mesh shoe.", "Leather and primegreen.", "A shoe."]
    attributes = [SHOE, SHOE, SHOE]
    metrics = text_metrics(outputs, ["ref"] * 3, attributes, ["stop"] * 3, TERMS)
    assert metrics["unsupported_claim_share"] == pytest.approx(1 / 3)
    # Without a vocabulary it is not measured, rather than zero.
    assert text_metrics(outputs, ["ref"] * 3, attributes, ["stop"] * 3)["unsupported_claim_share"] is None


def test_a_number_is_invented_unless_an_attribute_writes_the_same_number():
    tee = {"name": "Trefoil 2000 Tee", "price": "$50", "features": ["100% cotton", "1,500 stitches"]}
    assert invented_numbers("The Trefoil 2000 Tee: 100% cotton, 1500 stitches.", tee) == []
    # A share is not the price, and a price is not a share; a year, a count and a decimal are numbers.
    assert invented_numbers("50% recycled, since the 1970s, 3-Stripes, 2.5 cm, $50.", tee) == [
        "50%",
        "1970",
        "3",
        "2.5",
    ]
    # Only digits count, and digits inside a word are part of a name ("4DFWD", "v2").
    assert invented_numbers("Fifty percent recycled, adidas 4DFWD v2.", tee) == []


def test_the_share_of_outputs_with_an_invented_number_is_measured_with_or_without_a_vocabulary():
    outputs = ["A cotton tee.", "A 100% cotton tee.", "70% recycled since 1972."]
    metrics = text_metrics(outputs, ["ref"] * 3, [{"name": "Tee"}] * 3, ["stop"] * 3)
    assert metrics["invented_number_share"] == pytest.approx(2 / 3)


def test_the_shipped_vocabulary_is_reviewed_product_facts_of_known_kinds():
    shipped = shipped_terms()
    assert len(shipped) > 40
    assert set(shipped.values()) == set(KINDS)
    assert all(words(term) for term in shipped)
    assert {"leather", "primegreen", "running", "slim fit", "vegan"} <= set(shipped)
    assert not {"comfortable", "lightweight", "style"} & set(shipped)


@pytest.mark.django_db
def test_curators_extend_the_vocabulary_and_cannot_add_a_term_twice_or_an_empty_one():
    FactTerm.objects.create(term="gore-tex", kind="technology")
    assert "gore-tex" in fact_vocabulary() and "leather" in fact_vocabulary()
    for term, message in (("  Leather ", "already in the shipped vocabulary"), ("--", "must contain a word")):
        with pytest.raises(ValidationError, match=message):
            FactTerm(term=term, kind="material").full_clean()


@pytest.mark.django_db
def test_the_command_lists_the_vocabulary_and_suggests_recurring_terms_not_in_it(capsys, dataset_factory):
    FactTerm.objects.create(term="gore-tex", kind="technology")
    call_command("fact_terms", "list")
    listed = capsys.readouterr().out.splitlines()
    assert "gore-tex\ttechnology\tadded" in listed and "leather\tmaterial\tshipped" in listed
    dataset = dataset_factory(name="shop", examples=0)
    for index in range(4):
        example_create(
            dataset=dataset,
            attributes={"name": f"Shoe {index}"},
            description=f"Shoe {index} with a waxed canvas upper and leather laces, model {index}.",
            split="train",
        )
    call_command("fact_terms", "suggest", "--dataset", "shop", "--min-share", "0.5")
    suggested = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert "waxed canvas upper" in suggested and "waxed" in suggested
    assert "leather" not in suggested and "canvas" not in suggested  # already in the vocabulary
    with pytest.raises(CommandError, match="no dataset named"):
        call_command("fact_terms", "suggest", "--dataset", "nope")


def test_fact_extraction_adds_the_descriptions_facts_to_the_features_once():
    description = "Leather upper, a mesh lining and primegreen. Leather again."
    assert features_with_facts(SHOE, description, TERMS) == ["mesh upper", "leather", "primegreen"]
    # An example whose description states no fact the attributes lack keeps its features.
    assert features_with_facts(SHOE, "A mesh shoe.", TERMS) == ["mesh upper"]
    assert features_with_facts({"name": "Cap"}, "A cap.", TERMS) == []


def test_a_curator_adds_a_term_in_the_admin_and_is_told_why_one_is_refused(admin_client):
    from django.urls import reverse

    url = reverse("admin:finetuning_factterm_add")
    response = admin_client.post(url, {"term": "  Gore-Tex ", "kind": "technology"})
    assert response.status_code == 302
    assert FactTerm.objects.get().term == "gore-tex"
    page = admin_client.post(url, {"term": "Leather", "kind": "material"}).content.decode()
    assert "already in the shipped vocabulary" in page
    listing = admin_client.get(reverse("admin:finetuning_factterm_changelist")).content.decode()
    assert "gore-tex" in listing and "59 reviewed ones shipped with genapi" in listing and "primegreen" in listing

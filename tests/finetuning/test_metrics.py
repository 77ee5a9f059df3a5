import math

import pytest

from finetuning import metrics

SHOE = {
    "name": "Trail Runner",
    "color": "Core Black / Cloud White",
    "category": "Shoes / Women/Shoes",
    "brand": "adidas",
    "price": 120.0,
    "features": ["Boost midsole", "recycled laces"],
}


def test_rouge_l_of_identical_disjoint_and_partial_texts():
    assert metrics.rouge_l(["the quick brown fox"], ["the quick brown fox"]) == pytest.approx(100)
    assert metrics.rouge_l(["lorem ipsum"], ["the quick brown fox"]) == 0
    # LCS "the fox" (2) of 3 and 4 words: P 2/3, R 2/4, F = 4/7.
    assert metrics.rouge_l(["the red fox"], ["the quick brown fox"]) == pytest.approx(100 * 4 / 7)
    # Stemming: "running shoes" matches "run shoe".
    assert metrics.rouge_l(["running shoes"], ["run shoe"]) == pytest.approx(100)
    # A mean over examples.
    assert metrics.rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(50)


def test_chrf_and_bleu_reward_overlap():
    same = metrics.chrf(["a soft cotton shirt"], ["a soft cotton shirt"])
    assert same == pytest.approx(100)
    assert metrics.chrf(["zzz qqq"], ["a soft cotton shirt"]) < 5
    assert metrics.bleu(["a soft cotton shirt for every day"], ["a soft cotton shirt for every day"]) == pytest.approx(
        100
    )
    assert metrics.bleu(["zzz qqq www eee"], ["a soft cotton shirt"]) == pytest.approx(0, abs=1e-6)


def test_attribute_values_split_paths_and_keep_features_whole():
    assert metrics.attribute_values(SHOE) == [
        "Trail Runner",
        "Core Black",
        "Cloud White",
        "Shoes",
        "Women",
        "adidas",
        "Boost midsole",
        "recycled laces",
    ]


def test_attribute_coverage_counts_values_the_text_mentions():
    text = "The adidas Trail Runner shoe for women comes in core black, with a Boost midsole."
    # Mentioned: Trail Runner, Core Black, Shoes (shoe), Women, adidas, Boost midsole = 6 of 8.
    assert metrics.attribute_coverage(text, SHOE) == pytest.approx(6 / 8)
    assert metrics.attribute_coverage("Nothing relevant here.", SHOE) == 0
    # Every word of a value must be there: "Trail" alone does not mention "Trail Runner".
    assert not metrics.mentions("a trail shoe", "Trail Runner")
    assert metrics.mentions("RECYCLED LACE", "recycled laces")
    # A possessive mentions its word, with either apostrophe: "men's shorts" are for Men.
    assert metrics.mentions("these men's shorts", "Men")
    assert metrics.mentions("women\u2019s tights", "Women")
    assert metrics.mentions("a kid's cap", "Kids")
    assert not metrics.mentions("menswear", "Men")
    assert metrics.attribute_coverage("anything", {"price": 3.0}) is None


def test_repetition_metrics():
    assert metrics.has_repeated_ngram("one two three four and one two three four")
    assert not metrics.has_repeated_ngram("one two three four five six")
    # Bigrams: (a b) (b a) (a b) -> 2 distinct of 3.
    assert metrics.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert metrics.distinct_n(["a"], 2) is None


def test_echo_detection():
    assert metrics.echoes_prompt("Name: Trail Runner\nBrand: adidas\nA great shoe.", SHOE)
    assert metrics.echoes_prompt("Write a product description for this product.", SHOE)
    assert metrics.echoes_prompt("<|im_start|>assistant", SHOE)
    assert not metrics.echoes_prompt("The Trail Runner by adidas is light and fast.", SHOE)
    # One line only counts when the prompt has only one.
    assert not metrics.echoes_prompt("Name: Trail Runner is here", SHOE)
    assert metrics.echoes_prompt("Name: Mug", {"name": "Mug"})


def test_text_metrics_on_a_small_set():
    outputs = ["The adidas Trail Runner in core black.", "", "Name: Trail Runner\nBrand: adidas"]
    references = ["The adidas Trail Runner in core black.", "A shoe.", "A light shoe."]
    result = metrics.text_metrics(outputs, references, [SHOE] * 3, ["stop", "stop", "length"])
    assert result["empty_share"] == pytest.approx(1 / 3)
    assert result["echo_share"] == pytest.approx(1 / 3)
    assert result["format_failure_share"] == pytest.approx(2 / 3)
    assert result["cut_off_share"] == pytest.approx(1 / 3)
    assert result["mean_words"] == pytest.approx((7 + 0 + 5) / 3)
    assert result["reference_mean_words"] == pytest.approx((7 + 2 + 3) / 3)
    assert result["length_ratio"] == pytest.approx(12 / 12)
    assert result["repeated_4gram_share"] == 0
    assert 0 < result["rouge_l"] < 100
    with pytest.raises(ValueError):
        metrics.text_metrics(["a"], [], [SHOE], ["stop"])


def test_directions_and_formatting():
    assert metrics.loss_metrics(math.log(20))["perplexity"] == pytest.approx(20)
    assert metrics.is_worse("rouge_l", 10, 12)
    assert not metrics.is_worse("rouge_l", 12, 10)
    assert metrics.is_worse("repeated_4gram_share", 0.2, 0.1)
    assert not metrics.is_worse("repeated_4gram_share", 0.2, 0.1, tolerance=0.15)
    assert not metrics.is_worse("mean_words", 1, 100)  # no better direction
    assert metrics.improvement("validation_loss", 1.5, 2.0) == pytest.approx(0.5)
    assert metrics.metric_format("attribute_coverage", 0.5) == "50.0%"
    assert metrics.metric_format("rouge_l", None) == "–"

import pytest

from finetuning.attributes import AttributeValueError, attributes_normalize, price_parse


@pytest.mark.parametrize(
    "raw, expected",
    [("$40", 40.0), ("1,299.99", 1299.99), (" 11745 ", 11745.0), (12, 12.0), ("₹ 599", 599.0), ("49.999", 50.0)],
)
def test_price_parse(raw, expected):
    assert price_parse(raw) == expected


@pytest.mark.parametrize("raw", ["abc", "-5", "1.2.3", True])
def test_price_parse_rejects(raw):
    with pytest.raises(ValueError):
        price_parse(raw)


def test_normalize_trims_splits_and_keeps_unknown_keys():
    clean = attributes_normalize(
        {
            " Color ": "  Navy   Blue ",
            "features": "zip pocket | hood;  ",
            "Fit-Type": "slim",
            "empty": "  ",
            "none": None,
        }
    )
    assert clean == {"color": "Navy Blue", "features": ["zip pocket", "hood"], "fit_type": "slim"}


def test_normalize_names_the_bad_attribute():
    with pytest.raises(AttributeValueError) as info:
        attributes_normalize({"name": "x", "price": "cheap"})
    assert info.value.key == "price"
    with pytest.raises(AttributeValueError) as info:
        attributes_normalize({"name": {"nested": 1}})
    assert info.value.key == "name"

import csv
import io
import json

import pytest
from django.core.management import CommandError, call_command

from finetuning.models import Dataset, TrainingExample
from finetuning.services.examples import example_create
from finetuning.services.exporting import dataset_export, list_cell
from finetuning.services.importing import examples_import

TRICKY = [
    (
        {
            "name": "Trail Shoe",
            "brand": "adidas",
            "category": "Shoes / Men/Shoes",
            "price": 1299.99,
            "currency": "USD",
            "features": ["grip; in all weather", "light | fast", "[new] sole"],
            "keywords": ["trail", "running"],
            "wattage": "none, it's a shoe",
        },
        'A "shoe" for trails, with commas, quotes and Ünïcode — all of it.',
        "train",
    ),
    # Attributes named like the example's own fields, and ones that look like JSON.
    ({"name": "Lamp", "description": "warm", "split": "odd", "features": ['["x"]']}, "A warm lamp.", "validation"),
    ({"name": "Gold Bar", "price": 1e20, "keywords": ["[1, 2]"]}, "Heavy.", "unassigned"),
    ({"name": "Mug", "features": ["dishwasher safe", "12 oz"], "price": 0.5}, "A mug.", "unassigned"),
]


@pytest.fixture
def shop(db):
    dataset = Dataset.objects.create(name="shop")
    for attributes, description, split in TRICKY:
        example_create(dataset=dataset, attributes=attributes, description=description, split=split)
    return dataset


def _content(dataset):
    return sorted(
        dataset.examples.values_list("content_hash", "split", "attributes", "description"), key=lambda row: row[0]
    )


@pytest.mark.django_db
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_then_import_gives_the_same_examples(shop, tmp_path, fmt):
    path = tmp_path / f"shop.{fmt}"
    path.write_text("".join(dataset_export(dataset=shop, fmt=fmt)))
    summary = examples_import(path=path, dataset_name="copy")
    assert (summary.created, summary.rejected) == (len(TRICKY), [])
    copy = Dataset.objects.get(name="copy")
    assert _content(copy) == _content(shop)
    assert set(copy.examples.values_list("source", "review")) == {("import", "draft")}


@pytest.mark.django_db
def test_csv_export_reads_like_a_spreadsheet(shop):
    rows = list(csv.DictReader(io.StringIO("".join(dataset_export(dataset=shop, fmt="csv")))))
    assert list(rows[0])[:4] == ["attributes.name", "attributes.brand", "attributes.category", "attributes.price"]
    assert list(rows[0])[-2:] == ["description", "split"]
    shoe, lamp, gold, mug = rows
    assert mug["attributes.features"] == "dishwasher safe; 12 oz"
    assert json.loads(shoe["attributes.features"]) == ["grip; in all weather", "light | fast", "[new] sole"]
    assert gold["attributes.price"] == "100000000000000000000" and mug["attributes.price"] == "0.5"
    assert lamp["attributes.description"] == "warm" and lamp["description"] == "A warm lamp."


def test_list_cells_use_json_only_when_text_would_split_differently():
    assert list_cell(["a", "b"]) == "a; b"
    assert list_cell(["a; b"]) == '["a; b"]'
    assert list_cell(["[x]"]) == '["[x]"]'


@pytest.mark.django_db
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_command_writes_a_file_the_import_command_reads_back(shop, tmp_path, fmt, capsys):
    path = tmp_path / f"out.{fmt}"
    call_command("export_examples", "--dataset", "shop", "--format", fmt, "--output", str(path))
    assert f"wrote 4 examples of shop to {path}" in capsys.readouterr().err
    call_command("import_examples", str(path), "--dataset", "copy")
    assert _content(Dataset.objects.get(name="copy")) == _content(shop)


@pytest.mark.django_db
def test_export_command_prints_jsonl_and_names_the_datasets_when_one_is_missing(shop, capsys):
    call_command("export_examples", "--dataset", "shop")
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["attributes"]["name"] for line in lines] == ["Trail Shoe", "Lamp", "Gold Bar", "Mug"]
    assert set(json.loads(lines[0])) == {"attributes", "description", "split"}
    with pytest.raises(CommandError, match=r"no dataset named 'nope' \(datasets: shop\)"):
        call_command("export_examples", "--dataset", "nope")


@pytest.mark.django_db
def test_the_reference_file_round_trips(shared_data, tmp_path):
    examples_import(path=shared_data / "adidas_usa.csv", dataset_name="adidas")
    adidas = Dataset.objects.get(name="adidas")
    assert adidas.examples.count() > 600
    for fmt in ("jsonl", "csv"):
        path = tmp_path / f"adidas.{fmt}"
        path.write_text("".join(dataset_export(dataset=adidas, fmt=fmt)))
        examples_import(path=path, dataset_name=f"copy-{fmt}")
        assert _content(Dataset.objects.get(name=f"copy-{fmt}")) == _content(adidas)
    assert TrainingExample.objects.filter(dataset__name="copy-csv").count() == adidas.examples.count()

import json

import pytest
from django.core.management import CommandError, call_command

from finetuning.models import Dataset, TrainingExample
from finetuning.services.importing import ImportFileError, examples_import

CSV = """title,colour,cat,path,cost,text,junk
Beach Shorts,Black,Clothing,Women/Clothing,$40,Stretchy shorts for the beach.,x
Trail Shoe,Grey,Shoes,Men/Shoes,120,Grip on every trail.,y
Trail Shoe,Grey,Shoes,Men/Shoes,120,Grip on every trail.,dup in file
No Text,Red,Shoes,Men/Shoes,10,,missing description
Bad Price,Red,Shoes,Men/Shoes,cheap,Costs nothing.,bad price
"""
MAPPING = ["name=title", "color=colour", "category=cat+path", "price=cost", "description=text"]


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "products.csv"
    path.write_text(CSV)
    return path


@pytest.mark.django_db
def test_import_maps_columns_skips_duplicates_and_rejects_bad_rows(csv_file):
    summary = examples_import(path=csv_file, dataset_name="shop", mapping_items=MAPPING)
    assert (summary.rows, summary.created, summary.duplicates) == (5, 2, 1)
    assert [(row, reason.split(":")[0]) for row, reason in summary.rejected] == [
        (5, "description"),
        (6, "attributes.price"),
    ]
    shorts = TrainingExample.objects.get(name="Beach Shorts")
    assert shorts.attributes == {
        "name": "Beach Shorts",
        "color": "Black",
        "category": "Clothing / Women/Clothing",
        "price": 40.0,
    }
    assert shorts.description == "Stretchy shorts for the beach."
    assert shorts.source == "import" and shorts.split == "unassigned"


@pytest.mark.django_db
def test_importing_again_creates_nothing(csv_file):
    examples_import(path=csv_file, dataset_name="shop", mapping_items=MAPPING)
    again = examples_import(path=csv_file, dataset_name="shop", mapping_items=MAPPING)
    assert (again.created, again.duplicates) == (0, 3)
    assert TrainingExample.objects.count() == 2


@pytest.mark.django_db
def test_strict_import_writes_nothing_when_a_row_is_bad(csv_file):
    with pytest.raises(ImportFileError, match="2 rows rejected"):
        examples_import(path=csv_file, dataset_name="shop", mapping_items=MAPPING, strict=True)
    assert not Dataset.objects.exists() and not TrainingExample.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "content, message",
    [
        (b'name,description\n"Mug,"A mug\nPlate,A plate\n', "not valid CSV"),
        (b"name,description\nMug,A mug\nPlate,A plate,extra\n", "more values"),
        (b"name,description\nMug,A \xff mug\n", "not UTF-8"),
    ],
)
def test_a_broken_csv_imports_nothing(tmp_path, content, message):
    path = tmp_path / "broken.csv"
    path.write_bytes(content)
    with pytest.raises(ImportFileError, match=message):
        examples_import(path=path, dataset_name="shop")
    assert not TrainingExample.objects.exists()


@pytest.mark.django_db
def test_a_broken_jsonl_line_imports_nothing_even_after_good_lines(tmp_path, dataset_factory):
    dataset_factory(name="shop", examples=2)
    path = tmp_path / "broken.jsonl"
    good = json.dumps({"attributes": {"name": "Lamp"}, "description": "A warm lamp."})
    path.write_text(good + "\n" + '{"attributes": {"name": "Rug"}, "description": "cut off' + "\n")
    with pytest.raises(ImportFileError, match="line 2 is not JSON"):
        examples_import(path=path, dataset_name="shop")
    assert TrainingExample.objects.count() == 2


@pytest.mark.django_db
def test_mapping_a_missing_column_is_refused(csv_file):
    with pytest.raises(ImportFileError, match="'nope'"):
        examples_import(path=csv_file, dataset_name="shop", mapping_items=["name=title", "description=nope"])


@pytest.mark.django_db
def test_jsonl_native_format_keeps_split_and_unknown_attributes(tmp_path):
    path = tmp_path / "examples.jsonl"
    rows = [
        {"attributes": {"name": "Lamp", "wattage": "8 W"}, "description": "A warm lamp.", "split": "validation"},
        {"attributes": {"name": "Rug"}, "description": "A soft rug.", "split": "sideways"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = examples_import(path=path, dataset_name="home")
    assert summary.created == 1
    assert summary.rejected == [(2, "split: 'sideways' is not one of train, validation, unassigned")]
    lamp = TrainingExample.objects.get()
    assert lamp.split == "validation" and lamp.attributes["wattage"] == "8 W"


@pytest.mark.django_db
def test_import_command_prints_a_summary_and_fails_in_one_line(csv_file, capsys):
    call_command("import_examples", str(csv_file), "--dataset", "shop", *[f"--map={m}" for m in MAPPING])
    out = capsys.readouterr().out
    assert "5 rows read, 2 created, 1 duplicates skipped, 2 rejected" in out
    assert "row 6: attributes.price" in out
    with pytest.raises(CommandError, match="nothing imported"):
        call_command("import_examples", str(csv_file), "--dataset", "shop", "--map=name=nope", "--map=description=text")


@pytest.mark.django_db
def test_seed_data_loads(capsys):
    call_command("load_examples")
    dataset = Dataset.objects.get(name="seed")
    assert dataset.examples.count() >= 150
    assert dataset.examples.values("category").distinct().count() >= 8


@pytest.mark.django_db
def test_imports_the_adidas_reference_file(shared_data):
    summary = examples_import(
        path=shared_data / "adidas_usa.csv",
        dataset_name="adidas",
        mapping_items=[
            "name=name",
            "color=color",
            "category=category+breadcrumbs",
            "price=selling_price",
            "brand=brand",
            "description=description",
        ],
    )
    assert summary.created > 600
    assert summary.created + summary.duplicates + len(summary.rejected) == summary.rows == 735


@pytest.mark.django_db
def test_imports_the_myntra_reference_file(shared_data):
    summary = examples_import(
        path=shared_data / "myntra_products_catalog.csv",
        dataset_name="myntra",
        mapping_items=[
            "name=ProductName",
            "brand=ProductBrand",
            "audience=Gender",
            "color=PrimaryColor",
            "price=Price (INR)",
            "description=Description",
        ],
        constant_items=["currency=INR"],
    )
    assert summary.rows == 12491
    assert summary.created > 12000
    example = TrainingExample.objects.filter(dataset__name="myntra").exclude(attributes__color=None).first()
    assert example.attributes["currency"] == "INR"
    assert example.attributes["color"] == example.attributes["color"].strip()

import json

import pytest
from django.core.management import CommandError, call_command

from finetuning.models import Dataset, TrainingExample
from finetuning.services.importing import (
    ImportFileError,
    examples_dry_run,
    examples_import,
    file_read,
    mapping_parse,
    mapping_suggest,
    rejected_rows_csv,
    upload_get,
    upload_save,
)

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
    assert (
        "5 rows read, 2 created, 1 duplicates skipped (1 within the file, 0 already in the dataset), 2 rejected" in out
    )
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


# --- the suggested mapping -------------------------------------------------------------


def _suggest(tmp_path, header):
    path = tmp_path / "header.csv"
    path.write_text(header + "\n" + ",".join("x" for _ in header.split(",")) + "\n")
    return mapping_suggest(file_read(path))


def test_suggested_mapping_reads_common_header_names(tmp_path):
    mapping, constants = _suggest(
        tmp_path, "URL,SKU,Product Name,Brand,Colour,Category,Breadcrumbs,Selling Price,Original Price,Text"
    )
    assert mapping == [
        "name=Product Name",
        "brand=Brand",
        "category=Category+Breadcrumbs",
        "color=Colour",
        "price=Selling Price",
        "description=Text",
    ]
    assert constants == []


def test_suggested_mapping_takes_the_currency_from_a_price_header(tmp_path):
    mapping, constants = _suggest(tmp_path, "ProductID,ProductName,ProductBrand,Gender,Price (INR),Description")
    assert mapping == [
        "name=ProductName",
        "brand=ProductBrand",
        "audience=Gender",
        "price=Price (INR)",
        "description=Description",
    ]
    assert constants == ["currency=INR"]


def test_suggested_mapping_for_the_adidas_file(shared_data):
    mapping, constants = mapping_suggest(file_read(shared_data / "adidas_usa.csv"))
    assert mapping == [
        "name=name",
        "brand=brand",
        "category=category+breadcrumbs",
        "color=color",
        "price=selling_price",
        "currency=currency",
        "description=description",
    ]
    assert constants == []


@pytest.mark.django_db
def test_the_command_without_a_mapping_uses_and_prints_the_suggestion(tmp_path, capsys):
    path = tmp_path / "shop.csv"
    path.write_text("title,colour,Price (EUR),text\nMug,Blue,12.50,A mug for tea.\n")
    call_command("import_examples", str(path), "--dataset", "shop")
    out = capsys.readouterr().out
    assert (
        "--map name=title --map color=colour --map price=Price (EUR) --map description=text --set currency=EUR" in out
    )
    assert TrainingExample.objects.get().attributes == {
        "name": "Mug",
        "color": "Blue",
        "price": 12.5,
        "currency": "EUR",
    }


# --- dry run, preview, all or nothing ------------------------------------------------------


@pytest.mark.django_db
def test_dry_run_counts_and_previews_without_writing(csv_file, dataset_factory):
    from finetuning.prompts import training_pair

    summary = examples_dry_run(path=csv_file, dataset_name="shop", mapping_items=MAPPING)
    assert summary.counts() == {
        "rows": 5,
        "created": 2,
        "duplicates_in_file": 1,
        "duplicates_in_dataset": 0,
        "rejected": 2,
    }
    assert summary.duplicates_in_file == [(4, 3)]
    assert [(p.row, p.status) for p in summary.preview] == [
        (2, "new"),
        (3, "new"),
        (4, "duplicate"),
        (5, "rejected"),
        (6, "rejected"),
    ]
    first = summary.preview[0]
    assert first.prompt == training_pair(first.fields["attributes"], first.fields["description"])[0]
    assert "Name: Beach Shorts\nCategory: Clothing / Women/Clothing\nColor: Black\nPrice: 40.00" in first.prompt
    assert summary.preview[3].reason == "description: is empty"
    assert not Dataset.objects.exists() and not TrainingExample.objects.exists()


@pytest.mark.django_db
def test_dry_run_counts_what_the_dataset_already_holds(csv_file):
    examples_import(path=csv_file, dataset_name="shop", mapping_items=["name=title", "description=text"])
    TrainingExample.objects.filter(name="Trail Shoe").delete()
    before = list(TrainingExample.objects.values_list("pk", "content_hash"))
    summary = examples_dry_run(path=csv_file, dataset_name="shop", mapping_items=["name=title", "description=text"])
    assert summary.created == 1
    ids = dict(TrainingExample.objects.values_list("name", "pk"))
    assert summary.duplicates_in_dataset == [(2, ids["Beach Shorts"]), (6, ids["Bad Price"])]
    assert summary.preview[0].status == "existing"
    assert list(TrainingExample.objects.values_list("pk", "content_hash")) == before


@pytest.mark.django_db
def test_the_command_dry_run_writes_nothing(csv_file, capsys):
    call_command("import_examples", str(csv_file), "--dataset", "shop", "--dry-run", *[f"--map={m}" for m in MAPPING])
    out = capsys.readouterr().out
    assert "dry run, nothing written" in out and "2 created" in out
    assert not Dataset.objects.exists() and not TrainingExample.objects.exists()


@pytest.mark.django_db
def test_a_failure_mid_import_leaves_the_dataset_as_it_was(csv_file, dataset_factory, monkeypatch):
    from finetuning.services import importing

    dataset_factory(name="shop", examples=3)
    before = sorted(TrainingExample.objects.values_list("content_hash", flat=True))
    monkeypatch.setattr(importing, "BATCH_SIZE", 1)
    real_bulk_create = TrainingExample.objects.bulk_create
    calls = []

    def fail_on_the_second_batch(objs, **kwargs):
        calls.append(len(objs))
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real_bulk_create(objs, **kwargs)

    monkeypatch.setattr(TrainingExample.objects, "bulk_create", fail_on_the_second_batch)
    with pytest.raises(RuntimeError, match="disk full"):
        examples_import(path=csv_file, dataset_name="shop", mapping_items=MAPPING)
    assert calls == [1, 1]  # the first batch was written, then rolled back
    assert sorted(TrainingExample.objects.values_list("content_hash", flat=True)) == before


@pytest.mark.django_db
def test_a_failed_import_into_a_new_dataset_leaves_no_dataset(csv_file, monkeypatch):
    def fail(objs, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(TrainingExample.objects, "bulk_create", fail)
    with pytest.raises(RuntimeError):
        examples_import(path=csv_file, dataset_name="fresh", mapping_items=MAPPING)
    assert not Dataset.objects.filter(name="fresh").exists()


@pytest.mark.django_db
def test_rejected_rows_come_back_as_csv_with_their_values(csv_file):
    import csv
    import io

    summary = examples_dry_run(path=csv_file, dataset_name="shop", mapping_items=MAPPING)
    rows = list(csv.reader(io.StringIO(rejected_rows_csv(summary=summary, columns=file_read(csv_file).columns))))
    assert rows == [
        ["row", "reason", "title", "colour", "cat", "path", "cost", "text", "junk"],
        ["5", "description: is empty", "No Text", "Red", "Shoes", "Men/Shoes", "10", "", "missing description"],
        ["6", "attributes.price: 'cheap' is not a number", "Bad Price", "Red", "Shoes", "Men/Shoes", "cheap"]
        + ["Costs nothing.", "bad price"],
    ]


# --- reading ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_list_attributes_from_json_arrays_and_from_several_columns(tmp_path):
    path = tmp_path / "lists.csv"
    path.write_text(
        "name,text,features,extra,tags\n"
        'Mug,A mug.,"[""dishwasher; safe"", ""12 oz""]",,\n'
        "Cup,A cup.,light | stackable,handle,tea; coffee\n"
    )
    examples_import(
        path=path,
        dataset_name="shop",
        mapping_items=["name=name", "description=text", "features=features+extra", "keywords=tags"],
    )
    mug, cup = TrainingExample.objects.order_by("id")
    assert mug.attributes["features"] == ["dishwasher; safe", "12 oz"]
    assert cup.attributes["features"] == ["light", "stackable", "handle"]
    assert cup.attributes["keywords"] == ["tea", "coffee"]


@pytest.mark.django_db
def test_semicolon_separated_csv_reads_as_columns(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("name;description;price\nMug;A mug, for tea.;4,50\n".replace("4,50", "4.50"))
    summary = examples_import(path=path, dataset_name="shop")
    assert summary.created == 1
    assert TrainingExample.objects.get().description == "A mug, for tea."


@pytest.mark.parametrize(
    "content, message",
    [
        ("name,name,description\nA,B,C\n", "'name' appear twice"),
        ("name,description\n", "header but no rows"),
        ("", "is empty"),
    ],
)
def test_files_that_cannot_be_read_say_why(tmp_path, content, message):
    path = tmp_path / "odd.csv"
    path.write_text(content)
    with pytest.raises(ImportFileError, match=message):
        file_read(path)


def test_a_mapping_line_that_is_not_a_mapping_says_so():
    with pytest.raises(ImportFileError, match="expected TARGET=COLUMN"):
        mapping_parse("name=title\ndescription")
    with pytest.raises(ImportFileError, match="name is mapped twice"):
        mapping_parse(["name=title", "name=other"])


# --- uploads kept between the admin's steps ---------------------------------------------------


class _Upload:
    def __init__(self, name, content):
        self.name, self._content, self.size = name, content, len(content)

    def chunks(self):
        yield self._content


@pytest.fixture
def var_dir(settings, tmp_path):
    settings.VAR_DIR = tmp_path / "var"
    return settings.VAR_DIR


@pytest.mark.django_db
def test_an_upload_is_kept_for_its_user_only(var_dir, django_user_model):
    alice = django_user_model.objects.create(username="alice")
    bob = django_user_model.objects.create(username="bob")
    upload = upload_save(user=alice, uploaded_file=_Upload("shop.csv", CSV.encode()), dataset_name="shop")
    assert upload.path.read_text() == CSV
    assert upload.meta["mapping"] == ["name=title", "color=colour", "description=text"]
    assert upload_get(user=alice, token=upload.token).meta["dataset"] == "shop"
    with pytest.raises(LookupError):
        upload_get(user=bob, token=upload.token)
    with pytest.raises(LookupError):
        upload_get(user=alice, token="../../etc")


@pytest.mark.django_db
def test_an_oversized_or_unreadable_upload_keeps_nothing(var_dir, settings, django_user_model):
    user = django_user_model.objects.create(username="alice")
    settings.IMPORT_MAX_UPLOAD_BYTES = 100
    with pytest.raises(ImportFileError, match="shop.csv is 200 bytes; the largest file you can import here is 100"):
        upload_save(user=user, uploaded_file=_Upload("shop.csv", b"x" * 200), dataset_name="shop")
    settings.IMPORT_MAX_UPLOAD_BYTES = 10_000
    with pytest.raises(ImportFileError, match="not UTF-8"):
        upload_save(user=user, uploaded_file=_Upload("shop.csv", b"name,description\nMug,\xff\n"), dataset_name="shop")
    with pytest.raises(ImportFileError, match="expected .csv or .jsonl"):
        upload_save(user=user, uploaded_file=_Upload("shop.xlsx", b"PK"), dataset_name="shop")
    assert not any(path.is_file() for path in (var_dir / "imports").rglob("*"))


@pytest.mark.django_db
def test_old_uploads_are_cleaned_up(var_dir, django_user_model):
    import os
    import time

    user = django_user_model.objects.create(username="alice")
    old = upload_save(user=user, uploaded_file=_Upload("old.csv", CSV.encode()), dataset_name="shop")
    day_ago = time.time() - 25 * 3600
    os.utime(old.directory, (day_ago, day_ago))
    new = upload_save(user=user, uploaded_file=_Upload("new.csv", CSV.encode()), dataset_name="shop")
    assert not old.directory.exists() and new.directory.exists()

"""Importing and exporting examples in the admin, as a curator clicks through it."""

import csv
import html
import io
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from finetuning.models import Dataset, TrainingExample
from finetuning.prompts import training_pair
from finetuning.services.examples import example_create

CSV = """Product Name,Colour,Category,Breadcrumbs,Selling Price,Text,SKU
Beach Shorts,Black,Clothing,Women/Clothing,$40,Stretchy shorts for the beach.,A1
Trail Shoe,Grey,Shoes,Men/Shoes,120,Grip on every trail.,A2
Trail Shoe,Grey,Shoes,Men/Shoes,120,Grip on every trail.,A3
No Text,Red,Shoes,Men/Shoes,10,,A4
Bad Price,Red,Shoes,Men/Shoes,cheap,Costs nothing.,A5
"""


@pytest.fixture(autouse=True)
def var_dir(settings, tmp_path):
    settings.VAR_DIR = tmp_path / "var"
    return settings.VAR_DIR


def _upload(client, content=CSV, name="products.csv", **data):
    file = SimpleUploadedFile(name, content.encode() if isinstance(content, str) else content)
    return client.post(reverse("admin:finetuning_dataset_import"), {"file": file, **data})


def _text(response):
    return html.unescape(response.content.decode())


def _review_url(response):
    assert response.status_code == 302, response.content.decode()[:2000]
    return response["Location"]


@pytest.mark.django_db
def test_a_curator_imports_a_csv_into_a_new_dataset(admin_client):
    listing = admin_client.get(reverse("admin:finetuning_dataset_changelist"))
    assert reverse("admin:finetuning_dataset_import") in listing.content.decode()

    review = _review_url(_upload(admin_client, new_dataset="shop"))
    page = admin_client.get(review)
    text = _text(page)
    # The suggested mapping, in the command's language, next to the file's columns.
    assert (
        "name=Product Name\ncategory=Category+Breadcrumbs\ncolor=Colour\nprice=Selling Price\ndescription=Text" in text
    )
    assert "<code>SKU</code>" in page.content.decode()
    assert "python manage.py import_examples products.csv --dataset shop --map 'name=Product Name'" in text
    # The first rows as stored, with the prompt training builds for them.
    prompt = training_pair(
        {"name": "Beach Shorts", "category": "Clothing / Women/Clothing", "color": "Black", "price": 40.0},
        "Stretchy shorts for the beach.",
    )[0]
    assert prompt in text
    assert "the same example as row 3" in text and "attributes.price: 'cheap' is not a number" in text
    counts = page.context["summary"].counts()
    assert counts == {"rows": 5, "created": 2, "duplicates_in_file": 1, "duplicates_in_dataset": 0, "rejected": 2}
    assert "Import 2 examples into shop" in text
    # Nothing is written before the curator confirms.
    assert not Dataset.objects.exists() and not TrainingExample.objects.exists()

    # The curator edits the mapping: the brand for every row, and no category.
    edited = admin_client.post(
        review,
        {
            "mapping": "name=Product Name\ncolor=Colour\nprice=Selling Price\ndescription=Text",
            "constants": "brand=Acme",
        },
    )
    assert edited.status_code == 302
    text = _text(admin_client.get(review))
    assert "Name: Beach Shorts\nBrand: Acme\nColor: Black\nPrice: 40.00" in text
    assert "--set brand=Acme" in text

    rejected = admin_client.get(reverse("admin:finetuning_dataset_import_rejected", args=[review.split("/")[-2]]))
    assert rejected["Content-Disposition"] == 'attachment; filename="products-rejected.csv"'
    rows = list(csv.reader(io.StringIO(rejected.content.decode())))
    assert rows[0] == [
        "row",
        "reason",
        "Product Name",
        "Colour",
        "Category",
        "Breadcrumbs",
        "Selling Price",
        "Text",
    ] + ["SKU"]
    assert [row[:3] for row in rows[1:]] == [
        ["5", "description: is empty", "No Text"],
        ["6", "attributes.price: 'cheap' is not a number", "Bad Price"],
    ]

    confirm = admin_client.get(review).context
    done = admin_client.post(
        review,
        {"confirm": "1", "mapping": confirm["mapping_json"], "constants": confirm["constants_json"]}
        | {"expected": confirm["expected"]},
        follow=True,
    )
    shop = Dataset.objects.get(name="shop")
    assert done.redirect_chain[-1][0] == reverse("admin:finetuning_dataset_change", args=[shop.pk])
    message = _text(done)
    assert (
        "2 examples imported into shop from products.csv. Skipped 1 row repeated within the file and 0 already in shop; rejected 2 rows."
        in message
    )
    assert "changed since the dry run" not in message
    assert "Download the rejected rows" in message
    examples = shop.examples.order_by("id")
    assert [e.name for e in examples] == ["Beach Shorts", "Trail Shoe"]
    assert {(e.source, e.review, e.attributes["brand"]) for e in examples} == {("import", "draft", "Acme")}

    # The upload is spent: confirming again imports nothing twice.
    again = admin_client.post(review, {"confirm": "1", "mapping": confirm["mapping_json"]}, follow=True)
    assert "was imported already" in _text(again)
    assert shop.examples.count() == 2


@pytest.mark.django_db
def test_counts_are_recomputed_when_the_dataset_changed_since_the_dry_run(admin_client):
    shop = Dataset.objects.create(name="shop")
    page = admin_client.get(
        _review_url(
            admin_client.post(
                reverse("admin:finetuning_dataset_import_into", args=[shop.pk]),
                {"file": SimpleUploadedFile("p.csv", CSV.encode())},
            )
        )
    )
    assert page.context["summary"].created == 2
    example_create(
        dataset=shop,
        attributes={"name": "Trail Shoe", "category": "Shoes / Men/Shoes", "color": "Grey", "price": 120},
        description="Grip on every trail.",
    )
    done = admin_client.post(
        page.wsgi_request.path,
        {"confirm": "1", "mapping": page.context["mapping_json"], "constants": page.context["constants_json"]}
        | {"expected": page.context["expected"]},
        follow=True,
    )
    message = _text(done)
    assert "1 example imported into shop" in message and "and 1 already in shop" in message
    assert "shop changed since the dry run, which counted 2 to create and 0 already there" in message
    assert shop.examples.count() == 2


@pytest.mark.django_db
def test_a_failure_while_importing_writes_nothing_and_says_so(admin_client, monkeypatch):
    from django.db import IntegrityError

    review = _review_url(_upload(admin_client, new_dataset="shop"))
    context = admin_client.get(review).context

    def collide(objs, **kwargs):
        raise IntegrityError("duplicate key value violates unique constraint")

    monkeypatch.setattr(TrainingExample.objects, "bulk_create", collide)
    done = admin_client.post(
        review,
        {"confirm": "1", "mapping": context["mapping_json"], "constants": context["constants_json"]},
        follow=True,
    )
    assert "Nothing was imported: shop changed during the import (an example was added meanwhile)" in _text(done)
    assert not Dataset.objects.exists() and not TrainingExample.objects.exists()


@pytest.mark.django_db
def test_a_mapping_naming_a_missing_column_is_refused_on_the_form(admin_client):
    review = _review_url(_upload(admin_client, new_dataset="shop"))
    page = admin_client.post(review, {"mapping": "name=Product Name\ndescription=Blurb", "constants": ""})
    assert page.status_code == 200
    assert "column(s) 'Blurb' named in the mapping are not in the file" in _text(page)
    # The mapping kept is still the last good one.
    assert "description=Text" in _text(admin_client.get(review))


@pytest.mark.django_db
def test_an_oversized_upload_is_refused_with_the_limit(admin_client, settings, var_dir):
    settings.IMPORT_MAX_UPLOAD_BYTES = 100
    page = _upload(admin_client, new_dataset="shop")
    assert page.status_code == 200
    assert f"products.csv is {len(CSV)} bytes; the largest file you can import here is 100 bytes" in _text(page)
    assert not Dataset.objects.exists()
    assert not any(path.is_file() for path in var_dir.rglob("*"))


@pytest.mark.django_db
@pytest.mark.parametrize(
    "content, name, reason",
    [
        (b"name,description\nMug,A \xff mug\n", "bad.csv", "bad.csv is not UTF-8 text"),
        (b'name,description\n"Mug,"A mug\n', "bad.csv", "bad.csv is not valid CSV"),
        (b'{"attributes": {"name": "Mug"}}\nnot json\n', "bad.jsonl", "bad.jsonl line 2 is not JSON"),
    ],
)
def test_an_unreadable_upload_says_why_and_keeps_nothing(admin_client, var_dir, content, name, reason):
    page = _upload(admin_client, content, name=name, new_dataset="shop")
    assert page.status_code == 200
    assert reason in _text(page) and "Nothing was imported." in _text(page)
    assert not any(path.is_file() for path in var_dir.rglob("*"))


@pytest.mark.django_db
def test_the_upload_form_asks_for_one_dataset(admin_client, dataset_factory):
    dataset_factory(name="shop", examples=1)
    assert "Pick a dataset above, or name a new one here." in _text(_upload(admin_client))
    assert "A dataset named shop already exists" in _text(_upload(admin_client, new_dataset="shop"))


@pytest.mark.django_db
def test_another_user_cannot_open_someone_elses_upload(admin_client, client, django_user_model):
    review = _review_url(_upload(admin_client, new_dataset="shop"))
    other = django_user_model.objects.create_superuser("other", "other@example.com", "pw")
    client.force_login(other)
    assert client.get(review).status_code == 404


@pytest.mark.django_db
def test_a_dataset_exported_from_its_page_imports_back_identically(admin_client, dataset_factory):
    shop = dataset_factory(name="shop", examples=6)
    page = admin_client.get(reverse("admin:finetuning_dataset_change", args=[shop.pk])).content.decode()
    for label in ("Start fine-tuning", "Examples", "Import examples", "Export JSONL", "Export CSV"):
        assert f">{label}</a>" in page
    for fmt in ("jsonl", "csv"):
        response = admin_client.get(reverse("admin:finetuning_dataset_export", args=[shop.pk, fmt]))
        assert response["Content-Disposition"] == f'attachment; filename="shop.{fmt}"'
        content = b"".join(response.streaming_content)
        page = admin_client.get(_review_url(_upload(admin_client, content, name=f"shop.{fmt}", new_dataset=fmt)))
        assert page.context["summary"].created == 6
        admin_client.post(
            page.wsgi_request.path,
            {"confirm": "1", "mapping": page.context["mapping_json"], "constants": page.context["constants_json"]},
        )
        copy = Dataset.objects.get(name=fmt)
        assert sorted(copy.examples.values_list("content_hash", "split")) == sorted(
            shop.examples.values_list("content_hash", "split")
        )
    jsonl = admin_client.get(reverse("admin:finetuning_dataset_export", args=[shop.pk, "jsonl"]))
    first = json.loads(b"".join(jsonl.streaming_content).splitlines()[0])
    assert set(first) == {"attributes", "description", "split"}


@pytest.mark.django_db
def test_the_reference_csv_gets_a_sensible_mapping_and_imports(admin_client, shared_data):
    content = (shared_data / "adidas_usa.csv").read_bytes()
    page = admin_client.get(_review_url(_upload(admin_client, content, name="adidas_usa.csv", new_dataset="adidas")))
    assert page.context["form"].initial["mapping"] == (
        "name=name\nbrand=brand\ncategory=category+breadcrumbs\ncolor=color\nprice=selling_price\n"
        "currency=currency\ndescription=description"
    )
    summary = page.context["summary"]
    assert summary.rows == 735 and summary.created > 600
    admin_client.post(
        page.wsgi_request.path,
        {"confirm": "1", "mapping": page.context["mapping_json"], "constants": page.context["constants_json"]},
    )
    assert Dataset.objects.get(name="adidas").examples.count() == summary.created


@pytest.mark.django_db
def test_importing_needs_the_permission_to_add_examples(client, django_user_model, dataset_factory):
    from django.contrib.auth.models import Permission

    shop = dataset_factory(name="shop", examples=1)
    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(codename__in=["view_dataset", "view_trainingexample"]))
    client.force_login(viewer)
    page = client.get(reverse("admin:finetuning_dataset_change", args=[shop.pk])).content.decode()
    assert "Import examples" not in page and ">Export CSV</a>" in page
    assert client.get(reverse("admin:finetuning_dataset_import")).status_code == 403
    assert client.get(reverse("admin:finetuning_dataset_export", args=[shop.pk, "csv"])).status_code == 200

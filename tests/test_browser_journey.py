"""A curator's journey through the admin in a real browser, one function per step, a full-page
screenshot after each (var/screenshots/test_a_curators_journey/NN-step.png) for a person to look at.

Each step does what a curator does (reads labels, clicks buttons), checks what the curator would
see, and leaves what later steps need in ``journey.state``. To extend the journey, write the next
step below the others and call it from the test, in the order a curator works.
"""

import re
from dataclasses import dataclass, field

from finetuning.models import Dataset, TrainingExample

pytest_plugins = ["tests.browser"]

DATASET = "spring-shoes"
PRODUCT = {
    "name": "adidas Ultraboost 22 Running Shoes",
    "category": "Shoes",
    "color": "Core Black",
    "price": "190",
    "features": "Primeknit upper\nBoost midsole",
    "description": "The Ultraboost 22 pairs a snug Primeknit upper with a Boost midsole that gives back "
    "energy on every stride, in Core Black for runs that start before sunrise.",
}


@dataclass
class Journey:
    page: object  # Playwright's Page
    screenshot: object  # the `screenshots` fixture
    expect: object  # the `expect` fixture
    state: dict = field(default_factory=dict)

    def shot(self, step):
        self.screenshot(self.page, step)

    def success_message(self):
        return self.page.locator(".messagelist .success").inner_text()


def log_in(journey, *, username, password):
    page = journey.page
    page.goto("/admin/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    journey.shot("login")
    page.get_by_role("button", name="Log in").click()
    journey.expect(page.get_by_role("heading", name="Training data, fine-tuning and model versions")).to_be_visible()
    journey.shot("admin home")


def create_dataset(journey, *, name):
    page = journey.page
    page.get_by_role("link", name="Datasets", exact=True).click()
    page.get_by_role("link", name="Add dataset").click()
    page.get_by_label("Name:").fill(name)
    page.get_by_label("Description:").fill("Running shoes of the spring catalogue, written by hand to start with.")
    journey.shot("new dataset")
    page.get_by_role("button", name="Save", exact=True).click()
    assert name in journey.success_message()
    journey.state["dataset"] = Dataset.objects.get(name=name)
    journey.shot("dataset saved")


def add_example_by_hand(journey, *, product):
    page = journey.page
    page.goto("/admin/finetuning/trainingexample/add/")
    page.get_by_label("Dataset:").select_option(label=journey.state["dataset"].name)
    for name in ("name", "category", "color", "price", "features", "description"):
        page.get_by_label(f"{name.capitalize()}:").fill(product[name])
    journey.shot("new example")
    page.get_by_role("button", name="Save", exact=True).click()
    assert "was added successfully" in journey.success_message()
    example = TrainingExample.objects.get(dataset=journey.state["dataset"])
    assert example.attributes["name"] == product["name"]
    assert example.attributes["features"] == product["features"].splitlines()
    assert example.description == product["description"]
    # The list shows it, in the dataset it was added to.
    row = page.locator("#result_list tbody tr", has_text=product["name"])
    assert journey.state["dataset"].name in row.inner_text()
    journey.state["example"] = example
    journey.shot("example saved")


def open_versions(journey, *, active):
    page = journey.page
    page.goto("/admin/")
    page.get_by_role("link", name="Model versions").click()
    row = page.locator("#result_list tbody tr", has_text=active.name)
    journey.expect(row).to_have_count(1)
    journey.shot("versions")
    row.get_by_role("link", name=active.name).click()
    journey.expect(page.get_by_role("heading", name=active.name).first).to_be_visible()
    journey.shot("version page")


def open_jobs(journey):
    page = journey.page
    page.goto("/admin/")
    page.get_by_role("link", name="Fine tuning jobs").click()
    journey.expect(page).to_have_url(re.compile(r"/admin/finetuning/finetuningjob/$"))
    journey.expect(page.locator("#changelist")).to_be_visible()
    journey.shot("jobs")


def test_a_curators_journey(page, admin_user, base_version, screenshots, expect):
    journey = Journey(page=page, screenshot=screenshots, expect=expect)
    log_in(journey, username="admin", password="password")
    create_dataset(journey, name=DATASET)
    add_example_by_hand(journey, product=PRODUCT)
    open_versions(journey, active=base_version)
    open_jobs(journey)
    assert page.js_errors == []

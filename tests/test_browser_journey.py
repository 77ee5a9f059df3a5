"""A curator's journey through the admin in a real browser, one function per step, a full-page
screenshot after each (var/screenshots/test_a_curators_journey/NN-step.png) for a person to look at.

The journey: log in, create a dataset, import a CSV (adjust the suggested mapping, read the preview
and the dry run, confirm), see the pre-flight refuse a max_seq_length that skips examples, start a
quick job on the tiny test model and watch a real Celery worker finish it, try the new version in
the playground, rate its output and add the corrected text to the dataset, activate the version
with a reason, and roll back with a reason.

Each step does what a curator does (reads labels, clicks buttons), checks what the curator would
see, and leaves what later steps need in ``journey.state``. To extend the journey, write the next
step below the others and call it from the test, in the order a curator works.
"""

import csv
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from finetuning.models import Activation, Dataset, FineTuningJob, ModelVersion, TrainingExample
from inference.models import Generation

pytest_plugins = ["tests.browser"]

DATASET = "spring-outdoor"
PRODUCT = {
    "name": "adidas Ultraboost 22 Running Shoes",
    "category": "Shoes",
    "color": "Core Black",
    "price": "190",
    "features": "Primeknit upper\nBoost midsole",
    "description": "The Ultraboost 22 pairs a snug Primeknit upper with a Boost midsole that gives back "
    "energy on every stride, in Core Black for runs that start before sunrise.",
}

# The file a curator exports from a shop system: its own column names (SKU and Material are not in
# the suggested mapping, "Highlights" are the features), prices without a currency.
CSV_COLUMNS = ("SKU", "Product Name", "Category", "Colour", "Price", "Material", "Highlights", "Description")
# (name, category, colour, price, material, highlights, description). The highlights make prompts of
# different lengths, so that a short max_seq_length skips some examples and not others.
CATALOGUE = [
    ("Trailblazer GTX Hiking Boots", "Footwear", "Slate Grey", "149.00", "Nubuck leather",
     "Waterproof membrane; Vibram outsole; Padded collar",
     "Built for wet switchbacks and long days, the Trailblazer GTX keeps feet dry with a waterproof membrane "
     "while the Vibram outsole bites into loose rock."),
    ("Cloudstep Road Running Shoes", "Footwear", "Ice Blue", "119.95", "Engineered mesh",
     "Foam midsole; Reflective heel tab",
     "Cloudstep pairs a breathable mesh upper with a soft foam midsole, so easy miles feel easier and "
     "early-morning runs stay visible."),
    ("Summit Down Jacket", "Jackets", "Forest Green", "229.00", "Recycled nylon",
     "700-fill down; Packs into its own pocket; Two-way zip; Adjustable hood; Elastic cuffs; Hem drawcord",
     "Warm without the bulk, the Summit Down Jacket packs 700-fill down into a light recycled shell that folds "
     "into its own pocket for the trip home."),
    ("Ridge Softshell Pants", "Pants", "Charcoal", "89.00", "Stretch softshell", "Articulated knees; Zip pockets",
     "Ridge Softshell Pants move with every scramble thanks to stretch fabric and articulated knees, and zip "
     "pockets keep keys safe on the trail."),
    ("Basecamp 2 Tent", "Camping", "Orange", "319.00", "Ripstop polyester",
     "Two doors; Two vestibules; Freestanding frame; Colour-coded poles; Taped seams; Gear loft; 2.4 kg packed",
     "Basecamp 2 sets up in minutes with colour-coded poles and gives two hikers a door and a vestibule each, "
     "with taped seams for stormy nights."),
    ("Lumen 400 Headlamp", "Accessories", "Black", "39.99", "Aluminium",
     "400 lumens; USB-C charging; Red night mode",
     "Lumen 400 throws a bright beam down the trail and recharges over USB-C, with a red mode that keeps your "
     "night vision at camp."),
    ("Merino Crew Base Layer", "Base layers", "Heather Grey", "74.00", "Merino wool",
     "Odour resistant; Flatlock seams",
     "Soft merino wool regulates temperature and resists odour, so this crew base layer stays comfortable from "
     "the first climb to the last descent."),
    ("Alpine 35 Backpack", "Backpacks", "Navy", "159.00", "Cordura nylon",
     "35 litres; Hip belt pockets; Hydration sleeve; Ice axe loop; Rain cover; Ventilated back panel",
     "Alpine 35 carries a full day's kit on a ventilated back panel, with a hip belt you can reach into on the "
     "move and a rain cover tucked below."),
    ("Tempo Running Shorts", "Shorts", "Coral", "45.00", "Recycled polyester", "Built-in brief; Back zip pocket",
     "Light and quick-drying, Tempo Running Shorts have a built-in brief and a back zip pocket sized for keys "
     "and a gel."),
    ("Glacier Insulated Bottle", "Accessories", "White", "34.50", "Stainless steel",
     "Keeps drinks cold 24 hours; Leakproof lid",
     "The Glacier bottle keeps water cold for a full day on the mountain and seals tight enough to ride upside "
     "down in a pack."),
    ("Storm Shell Rain Jacket", "Jackets", "Red", "179.00", "3-layer nylon",
     "Fully taped seams; Pit zips; Helmet-compatible hood",
     "Storm Shell stands up to sideways rain with a three-layer fabric and taped seams, while pit zips let out "
     "heat on the climb."),
    ("Trail Runner Socks 3-Pack", "Socks", "Mixed", "24.00", "Merino blend", "Cushioned heel; Seamless toe",
     "These merino blend socks cushion the heel and smooth the toe seam, three pairs ready for a week of trail "
     "miles."),
    ("Granite Chalk Bag", "Climbing", "Grey", "22.00", "Cordura", "Brush holder; Belt loop", ""),  # no copy yet
    ("Pathfinder Trekking Poles", "Accessories", "Titanium", "99.00", "Carbon fibre",
     "Cork grips; Flick locks; Tungsten tips",
     "Pathfinder poles take weight off your knees on steep descents, with cork grips that stay comfortable in "
     "sweaty hands."),
    ("Ember Fleece Hoodie", "Fleece", "Rust", "69.00", "Polartec fleece", "Thumb loops; Chest pocket",
     "Ember is the fleece you reach for at camp: warm Polartec, thumb loops for cold hands and a hood that stays "
     "put in the wind."),
    ("Nimbus Sleeping Bag", "Camping", "Teal", "189.00", "Synthetic fill",
     "Rated to -5 C; Draft collar; Compression sack; Two-way zip; Hood cinch",
     "Nimbus keeps you warm down to minus five with a draft collar and synthetic fill that insulates even when "
     "damp, then squeezes into its sack."),
    ("Sprint Racing Flats", "Footwear", "Volt Yellow", "129.00", "Monomesh", "Carbon plate; 6 mm drop",
     "Sprint Racing Flats put a carbon plate under a featherweight monomesh upper for race days when every "
     "second counts."),
    ("Canyon Sun Hat", "Accessories", "Khaki", "32.00", "Cotton canvas", "UPF 50; Chin cord",
     "A wide brim and UPF 50 canvas make the Canyon Sun Hat a simple answer to long exposed ridges, with a chin "
     "cord for gusts."),
    ("Vista Compact Binoculars", "Accessories", "Olive", "139.00", "Rubber armour",
     "8x25 magnification; Fog proof",
     "Vista binoculars fold small enough for a hip pocket and bring distant summits and wildlife into crisp 8x "
     "focus."),
    ("Harbor Waterproof Duffel", "Bags", "Yellow", "109.00", "TPU-coated nylon", "60 litres; Backpack straps",
     "Harbor swallows a weekend of gear in sixty waterproof litres and converts to a backpack when the car park "
     "is a long walk away."),
    ("Pulse GPS Running Watch", "Electronics", "Black", "249.00", "Fibre-reinforced polymer",
     "Heart rate sensor; 14-day battery; Route navigation",
     "Pulse tracks pace, heart rate and route with two weeks of battery, so long training blocks never wait on "
     "a charger."),
    ("Drift Camp Chair", "Camping", "Sand", "59.00", "Aluminium frame", "Packs to 1 kg; Cup holder",
     "Drift packs down to a kilo yet gives tired legs a proper seat at camp, cup holder included."),
    ("Quest Approach Shoes", "Footwear", "Brown", "139.00", "Suede", "Sticky rubber toe; Climbing zone lacing",
     "Quest Approach Shoes grip rock with sticky rubber and lace down to the toe, ready for the scramble to the "
     "crag."),
    ("Aurora Women's Running Tights", "Pants", "Plum", "79.00", "Recycled nylon elastane",
     "High waist; Side phone pockets; Reflective details",
     "Aurora tights hold a high waist through every stride and carry your phone in side pockets, with "
     "reflective details for dusk runs."),
    ("Kids' Puddle Rain Boots", "Footwear", "Bright Blue", "35.00", "Natural rubber",
     "Easy pull handles; Non-slip sole",
     "Puddle boots keep small feet dry through every splash, with pull handles little hands can manage alone."),
    ("Cascade Water Filter", "Camping", "Blue", "44.95", "Hollow fibre",
     "Filters 1,000 litres; Fits standard bottles",
     "Cascade turns stream water into drinking water through a hollow-fibre filter that screws onto standard "
     "bottles."),
    ("Tundra Insulated Gloves", "Accessories", "Black", "54.00", "Softshell and leather",
     "Touchscreen fingertips; Waterproof insert",
     "Tundra gloves keep hands warm and dry on winter trails, and touchscreen fingertips mean you never take "
     "them off for a photo."),
    ("Pioneer Camp Stove", "Camping", "Silver", "64.00", "Stainless steel",
     "Boils a litre in 3 minutes; Piezo igniter",
     "Pioneer boils a litre in three minutes and lights with a click, so morning coffee never keeps the group "
     "waiting."),
    ("Echo Packable Windbreaker", "Jackets", "Lime", "64.00", "Ripstop nylon", "Weighs 95 g; Stuff pocket",
     "At 95 grams the Echo windbreaker lives in your pack for the gusty summit and stuffs into its own pocket "
     "afterwards."),
    ("Terra Hiking Shorts", "Shorts", "Stone", "55.00", "Stretch nylon", "Belt included; Six pockets",
     "Terra shorts stretch where you need it and carry trail snacks in six pockets, with a belt that never "
     "needs adjusting."),
    ("Beacon Solar Lantern", "Camping", "Green", "29.00", "ABS plastic", "Solar charging; Collapsible",
     "Beacon charges in the sun during the day and lights the whole tent at night, then collapses flat for the "
     "pack."),
]  # fmt: skip
GOOD_ROWS = [row for row in CATALOGUE if row[-1]]
BAD_ROW = next(index for index, row in enumerate(CATALOGUE) if not row[-1]) + 2  # the file's line: header first
# Long enough for the shortest prompts of the tiny model's tokenizer (113 tokens), too short for the
# longest (175): the pre-flight skips some examples, too many to start without a confirmation.
SHORT_MAX_SEQ_LENGTH = 128
# A product that is not in the file, tried in the playground; its corrected description is added as
# a training example.
NEW_PRODUCT = {
    "name": "Horizon Ultralight Rain Pants",
    "category": "Pants",
    "color": "Black",
    "price": "95.00",
    "features": "Full-length side zips\nPacks into a pocket",
}
CORRECTED = (
    "Horizon Ultralight Rain Pants pull on over boots with full-length side zips and pack into their own "
    "pocket, so a sudden shower never ends the hike."
)
JOB_TIMEOUT_S = 180


@dataclass
class Journey:
    page: object  # Playwright's Page
    screenshot: object  # the `screenshots` fixture
    expect: object  # the `expect` fixture
    worker_log: Path | None = None
    state: dict = field(default_factory=dict)

    def shot(self, step):
        # A script error breaks a page without showing it: fail at the step that had it.
        assert self.page.js_errors == [], f"JavaScript errors on the page at step {step!r}: {self.page.js_errors}"
        self.screenshot(self.page, step)

    def success_message(self):
        return self.page.locator(".messagelist .success").inner_text()


def catalogue_csv_write(path):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for number, (name, category, colour, price, material, highlights, description) in enumerate(CATALOGUE):
            writer.writerow([f"SO-{1001 + number}", name, category, colour, price, material, highlights, description])
    return path


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
    page.get_by_label("Description:").fill("The spring outdoor catalogue: the shop's copy, then corrections.")
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


def open_dataset(journey):
    page = journey.page
    dataset = journey.state["dataset"]
    page.goto("/admin/")
    page.get_by_role("link", name="Datasets", exact=True).click()
    page.locator("#result_list").get_by_role("link", name=dataset.name, exact=True).click()
    journey.expect(page.get_by_label("Name:")).to_have_value(dataset.name)


def import_csv(journey, *, path):
    """Upload, adjust the suggested mapping, read the preview and the dry run, confirm."""
    page, expect = journey.page, journey.expect
    dataset = journey.state["dataset"]
    open_dataset(journey)
    page.get_by_role("link", name="Import examples").click()
    expect(page.get_by_role("heading", name=f"Import examples into {dataset.name}")).to_be_visible()
    page.get_by_label("CSV or JSONL file").set_input_files(path)
    journey.shot("import upload")
    page.get_by_role("button", name="Upload and review").click()

    # The suggested mapping: the shop's column names matched, SKU and Material left out.
    mapping = page.get_by_label("Columns", exact=True)
    expect(mapping).to_be_visible()
    suggested = mapping.input_value().splitlines()
    for line in ("name=Product Name", "color=Colour", "price=Price", "features=Highlights", "description=Description"):
        assert line in suggested, f"suggested mapping {suggested} lacks {line}"
    assert not any("Material" in line for line in suggested)
    material_row = page.locator(".import-file-columns tbody tr", has_text="Material")
    expect(material_row.locator("td").last).to_have_text("–")
    expect(page.locator("#dry-run")).to_contain_text(str(len(GOOD_ROWS)))
    journey.shot("import suggested mapping")

    # The curator keeps the material and says which currency the prices are in.
    mapping.fill("\n".join([*suggested, "material=Material"]))
    page.get_by_label("Every row gets").fill("currency=USD")
    page.get_by_role("button", name="Update preview and dry run").click()
    expect(mapping).to_have_value(re.compile(r"^material=Material$", re.M))
    expect(material_row.locator("td").last).to_have_text("material")

    # The preview: the first rows as they will be stored, with the exact prompt the model sees.
    preview = page.locator("#preview")
    first = CATALOGUE[0]
    first_row = preview.locator("table.import-preview > tbody > tr").first
    expect(first_row.locator("td").nth(1)).to_have_text("will be created")
    expect(first_row.locator("table.import-attributes")).to_contain_text(first[4])  # material, stored
    prompt = first_row.locator("pre.import-prompt")
    expect(prompt).to_contain_text(f"Name: {first[0]}")
    expect(prompt).to_contain_text(f"Price: {first[3]} USD")
    expect(prompt).to_contain_text(f"Material: {first[4]}")
    expect(prompt).to_contain_text("Write a product description for this product.")

    # The dry run: what would be created and rejected, with the bad row's number and reason; nothing written.
    counts = page.locator("#dry-run table.import-counts")
    expect(counts.locator("tr", has_text="rows read").locator("td.number")).to_have_text(str(len(CATALOGUE)))
    expect(counts.locator("tr", has_text="examples to create").locator("td.number")).to_have_text(str(len(GOOD_ROWS)))
    expect(counts.locator("tr", has_text="rejected").locator("td.number")).to_have_text("1")
    rejected = page.locator("#rejected tbody tr")
    expect(rejected).to_have_count(1)
    expect(rejected.locator("td").first).to_have_text(str(BAD_ROW))
    expect(rejected.locator("td").last).to_contain_text("description")
    expect(page.get_by_role("link", name="Download the 1 rejected row (CSV)")).to_be_visible()
    assert dataset.examples.count() == 1, "the dry run wrote examples"
    journey.shot("import preview and dry run")

    page.get_by_role("button", name=f"Import {len(GOOD_ROWS)} examples into {dataset.name}").click()
    message = journey.success_message()
    assert f"{len(GOOD_ROWS)} examples imported into {dataset.name}" in message, message
    assert "Rejected 1 row" in message, message
    expect(page.locator(".messagelist .success").get_by_role("link", name="Download the rejected rows")).to_be_visible()
    imported = dataset.examples.filter(source=TrainingExample.Source.IMPORT)
    assert imported.count() == len(GOOD_ROWS)
    assert imported.get(name=first[0]).attributes["material"] == first[4]
    journey.shot("import done")

    # The message's link lists what came in: drafts, to review.
    page.locator(".messagelist .success").get_by_role("link", name="review them").click()
    expect(page.locator("#result_list tbody tr")).to_have_count(len(GOOD_ROWS))
    expect(page.locator("#result_list tbody tr", has_text=first[0])).to_contain_text("Draft")
    journey.shot("imported examples")


def start_finetuning(journey):
    """A short max_seq_length is refused with the examples it would skip; a quick recipe starts."""
    page, expect = journey.page, journey.expect
    dataset = journey.state["dataset"]
    examples = dataset.examples.count()
    open_dataset(journey)
    page.get_by_role("link", name="Start fine-tuning").click()
    heading = page.locator("#preflight h2")
    expect(heading).to_have_text("Pre-flight at max_seq_length 256")

    # The pre-flight follows the field as it is typed, before anything is submitted.
    page.get_by_label("Max seq length:").fill(str(SHORT_MAX_SEQ_LENGTH))
    expect(heading).to_have_text(f"Pre-flight at max_seq_length {SHORT_MAX_SEQ_LENGTH}")
    warning = page.locator("#preflight .messagelist .error")
    expect(warning).to_contain_text(re.compile(rf"\d+ of {examples} examples \(\d+%\)\s+would be skipped"))
    skipped = int(re.search(rf"(\d+) of {examples} examples", warning.inner_text()).group(1))
    assert 0 < skipped < examples, warning.inner_text()
    skipped_row = page.locator("#preflight tr", has_text="Skipped")
    expect(skipped_row.locator("td.number").last).to_have_text(str(skipped))
    expect(page.locator("#id_confirm_examples")).not_to_be_checked()
    journey.shot("preflight warns")

    # Starting anyway, unconfirmed, is refused with the reason, and no job is queued.
    page.locator("input[name=_start]").click()
    expect(page.locator(".errornote")).to_be_visible()
    refusal = page.locator(".field-max_seq_length .errorlist")
    expect(refusal).to_contain_text(f"{skipped} of {examples} examples")
    expect(refusal).to_contain_text("Train anyway on")
    assert not FineTuningJob.objects.filter(dataset=dataset).exists()
    journey.shot("preflight refuses")

    # The "Quick check" preset fills a recipe whose length fits; shortened further for the test.
    page.get_by_label("Preset:").select_option("quick_check")
    expect(heading).to_have_text("Pre-flight at max_seq_length 256")
    expect(page.get_by_label("Max steps:")).to_have_value("20")
    page.get_by_label("Max steps:").fill("2")
    page.get_by_label("Batch size:").fill("4")
    expect(page.locator("#preflight .preflight-facts")).to_contain_text("2 optimiser steps")
    expect(page.locator("#preflight .messagelist .error")).to_have_count(0)
    expect(page.locator(".field-max_seq_length .errorlist")).to_have_count(0)
    expect(page.locator("#preflight tr", has_text="Skipped").locator("td.number").last).to_have_text("0")
    journey.shot("preflight passes")

    page.locator("input[name=_start]").click()
    message = journey.success_message()
    job = FineTuningJob.objects.get(dataset=dataset)
    assert f"Fine-tuning job {job.pk} queued on {dataset.name}" in message, message
    assert job.hyperparameters["max_steps"] == 2 and job.hyperparameters["batch_size"] == 4
    assert job.hyperparameters["max_seq_length"] == 256
    journey.state["job"] = job


def watch_job(journey, *, timeout=JOB_TIMEOUT_S):
    """Reload the job's page until it says how the job ended; the real worker trains it."""
    page, expect = journey.page, journey.expect
    job = journey.state["job"]
    status = page.locator(".field-status .readonly")
    started = time.monotonic()
    seen = []
    while True:
        text = status.inner_text().strip()
        if text in ("Succeeded", "Failed", "Cancelled") or time.monotonic() - started > timeout:
            break
        if not seen or seen[-1] != text:
            seen.append(text)
            journey.shot(f"job {text.lower()}")  # queued, running: once each
        page.wait_for_timeout(1000)  # bounded: the loop ends at `timeout`
        page.reload()
    if text != "Succeeded":
        job.refresh_from_db()
        log = journey.worker_log.read_text()[-3000:] if journey.worker_log and journey.worker_log.exists() else ""
        pytest.fail(
            f"job {job.pk} was {job.status!r} after {time.monotonic() - started:.0f} s (the page showed "
            f"{' -> '.join([*seen, text])}); error: {job.error or 'none'}\nworker log (end):\n{log}"
        )
    job.refresh_from_db()
    version = job.model_version
    expect(page.locator(".field-examples_display .readonly")).to_contain_text("0 skipped")
    expect(page.locator(".field-examples_display .readonly")).to_contain_text("trained on")
    expect(page.locator(".field-loss_chart svg")).to_be_visible()
    journey.shot("job succeeded")
    page.locator(".field-version_link").get_by_role("link", name=version.name).click()
    expect(page.locator("#decision")).to_be_visible()
    journey.state["version"] = version


def try_in_playground(journey, *, product):
    """Generate with the new version beside the active (base) one; every column finishes."""
    page, expect = journey.page, journey.expect
    version = journey.state["version"]
    panel = page.locator("#playground")
    expect(panel.get_by_role("heading", name="Try it")).to_be_visible()
    columns = panel.locator("#pg-results thead th[scope=col]:not(.pg-rowhead):not(.pg-reference)")
    expect(columns.first).to_contain_text(version.name)
    expect(columns.first).to_contain_text("this version")
    count = columns.count()
    assert count == 2, f"expected this version and the active base side by side, got {count} columns"
    for key in ("name", "category", "color", "price"):
        panel.get_by_label(f"{key.capitalize()}:", exact=True).fill(product[key])
    panel.get_by_label("Features:").fill(product["features"])
    # Sampled, with a seed: greedy decoding of the tiny random model repeats a special token, which
    # prints as nothing.
    panel.get_by_label("Max new tokens:").fill("24")
    panel.get_by_label("Temperature:").fill("1")
    panel.get_by_label("Seed:").fill("7")
    panel.get_by_role("button", name="Generate").click()
    expect(panel.locator("#pg-status")).to_have_text(f"{count} of {count} answered.", timeout=60_000)
    for column in range(count):
        finish = panel.locator(f'[data-pg-column="{column}"][data-pg-cell="finish"]')
        expect(finish).to_have_text(re.compile(r"^(stop|length)"))
        expect(panel.locator(f'[data-pg-column="{column}"][data-pg-cell="tokens"]')).to_contain_text("new")
        expect(panel.locator(f'[data-pg-column="{column}"] .pg-progress')).to_have_count(0)
    panel.scroll_into_view_if_needed()
    journey.shot("playground generated")
    # What the page shows is what the generation log recorded.
    output = panel.locator('[data-pg-column="0"][data-pg-cell="output"]').inner_text().strip()
    generation = Generation.objects.filter(version=version, route=Generation.Route.PLAYGROUND).get()
    assert (generation.output.strip() or "(empty)") == output, (generation.output, output)
    journey.state["generation"] = generation
    panel.locator('[data-pg-column="0"][data-pg-cell="log"]').get_by_role("link", name=re.compile("^Rate it")).click()
    expect(page.get_by_role("heading", name=f"Generation {generation.pk}", exact=True)).to_be_visible()


def rate_and_add_example(journey, *, corrected):
    """Rate the output with a note, correct it, add it to the dataset; the example links back."""
    page, expect = journey.page, journey.expect
    dataset, generation = journey.state["dataset"], journey.state["generation"]
    expect(page.locator(".field-output_display")).to_contain_text(generation.output.strip()[:40])
    page.get_by_label("Bad", exact=True).check()
    page.get_by_label("Rating note:").fill("Random words: the tiny model has not learnt the shop's voice yet.")
    page.get_by_label("Corrected text:").fill(corrected)
    page.get_by_label("Dataset:").select_option(label=dataset.name)
    journey.shot("generation rated")
    page.get_by_role("button", name="Add to dataset as training example").click()
    message = journey.success_message()
    example = TrainingExample.objects.get(dataset=dataset, source=TrainingExample.Source.FEEDBACK)
    assert f"Added to {dataset.name} as training example #{example.pk}" in message, message
    generation.refresh_from_db()
    assert generation.rating == Generation.Rating.BAD and generation.rated_by is not None
    assert generation.corrected_output == corrected and generation.example_id == example.pk
    expect(page.locator(".field-rated_display")).to_contain_text("Bad by admin")
    expect(page.locator(".field-example_display")).to_contain_text(f"#{example.pk}")
    journey.shot("added as example")

    page.locator(".messagelist .success").get_by_role("link", name=f"#{example.pk}").click()
    expect(page.get_by_label("Source:")).to_have_value("feedback")
    expect(page.get_by_label("Description:")).to_have_value(corrected)
    expect(page.get_by_label("Name:")).to_have_value(NEW_PRODUCT["name"])
    back = page.locator(".field-from_generation").get_by_role("link", name=f"generation {generation.pk}")
    expect(back).to_be_visible()
    journey.shot("feedback example")
    assert example.name == NEW_PRODUCT["name"] and example.description == corrected

    # The datasets list counts it as feedback.
    page.locator("#nav-sidebar").get_by_role("link", name="Datasets", exact=True).click()
    row = page.locator("#result_list tbody tr", has_text=dataset.name)
    expect(row.locator(".field-feedback_count")).to_have_text("1")
    journey.shot("datasets with feedback")

    # And back, by the example's link, to the generation it came from.
    page.go_back()
    back.click()
    expect(page.get_by_role("heading", name=f"Generation {generation.pk}", exact=True)).to_be_visible()
    expect(
        page.locator(".field-example_display").get_by_role("link", name=re.compile(f"^#{example.pk} "))
    ).to_be_visible()


def activate(journey, *, reason):
    """From the version page: the reason box and the Activate button at the top."""
    page, expect = journey.page, journey.expect
    version = journey.state["version"]
    page.locator(".field-summary").get_by_role("link", name=version.name).click()
    decision = page.locator("#decision")
    expect(decision).to_contain_text("The active version is")
    decision.get_by_label(f"Why activate {version.name}?").fill(reason)
    journey.shot("activate with reason")
    decision.get_by_role("button", name=f"Activate {version.name}").click()
    assert f"{version.name} is now the active version." in journey.success_message()
    expect(page.locator("#decision")).to_contain_text(f"{version.name} is the active version")
    version.refresh_from_db()
    assert version.is_active
    activation = Activation.objects.filter(version=version).latest("created_at")
    assert activation.reason == reason and activation.kind == Activation.Kind.MANUAL
    journey.shot("activated")


def roll_back(journey, *, previous, reason):
    """Undo the activation, named for what it does, with a reason; the previous version serves again."""
    page, expect = journey.page, journey.expect
    version = journey.state["version"]
    page.locator("#decision").get_by_role("link", name=f"Roll back to {previous.name}…").click()
    form = page.locator("form#decision")
    expect(form.get_by_role("heading", name=f"Roll back to {previous.name}")).to_be_visible()
    expect(form).to_contain_text("this rolls back to the older version")
    # Without a reason the form does not go.
    why = form.get_by_label("Why? (required)")
    form.get_by_role("button", name=f"Roll back to {previous.name}").click()
    assert why.evaluate("box => box.validity.valueMissing"), "the roll back went without a reason"
    assert ModelVersion.objects.get(is_active=True).pk == version.pk
    why.fill(reason)
    journey.shot("roll back with reason")
    form.get_by_role("button", name=f"Roll back to {previous.name}").click()
    message = journey.success_message()
    assert f"Rolled back from {version.name}: {previous.name} is the active version again." in message, message
    expect(page.locator("#decision")).to_contain_text(f"{previous.name} is the active version")
    # Undoing the roll back is offered as what it is: a roll forward to the newer version.
    expect(page.locator("#decision").get_by_role("link", name=f"Roll forward to {version.name}…")).to_be_visible()
    assert ModelVersion.objects.get(is_active=True).pk == previous.pk
    journey.shot("rolled back")

    page.goto("/admin/")
    page.get_by_role("link", name="Model versions", exact=True).click()
    active_row = page.locator("#result_list tbody tr", has_text=previous.name)
    expect(active_row.locator(".field-is_active img")).to_have_attribute("alt", "True")
    latest = page.locator("#activations tbody tr").first
    expect(latest.locator("td").nth(1)).to_have_text(version.name)
    expect(latest.locator("td").nth(2)).to_have_text(previous.name)
    expect(latest.locator("td").nth(3)).to_have_text("Roll back")
    expect(latest.locator("td").nth(5)).to_have_text(reason)
    journey.shot("versions after roll back")


def test_a_curators_journey(page, admin_user, base_version, job_worker, tmp_path, screenshots, expect):
    journey = Journey(page=page, screenshot=screenshots, expect=expect, worker_log=tmp_path / "worker.log")
    log_in(journey, username="admin", password="password")
    create_dataset(journey, name=DATASET)
    add_example_by_hand(journey, product=PRODUCT)
    import_csv(journey, path=catalogue_csv_write(tmp_path / "spring-catalogue.csv"))
    start_finetuning(journey)
    watch_job(journey)
    try_in_playground(journey, product=NEW_PRODUCT)
    rate_and_add_example(journey, corrected=CORRECTED)
    activate(journey, reason="Quick check passed the preview on the spring catalogue.")
    roll_back(journey, previous=base_version, reason="Outputs are not shop-ready yet: back to the base model.")
    assert page.js_errors == []

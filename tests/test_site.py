"""The site as a visitor meets it in a browser: the landing page, the favicon, the API docs (which
load nothing from the internet) and admin lists that fit a 1366 px screen."""

from urllib.parse import urlsplit

import pytest
from django.utils import timezone

from finetuning.models import Activation, FineTuningJob, ModelVersion
from finetuning.services.versions import version_activate, version_register

pytest_plugins = ["tests.browser"]

LONG_REASON = (
    "Rolled forward after the curators compared forty generations side by side: the new version names the "
    "material and the fit far more often, keeps the brand's tone and no longer repeats the product name twice "
    "in the first sentence, which the previous one did on roughly a third of the shoes in the catalogue."
)


def test_the_landing_page_says_what_genapi_is_and_links_everywhere(page, base_version, screenshots, expect):
    response = page.goto("/")
    assert response.status == 200
    assert page.get_by_role("heading", name="genapi", exact=True).is_visible()
    assert "fine-tuned small language model" in page.locator(".landing-lede").inner_text()
    assert base_version.name in page.locator("#landing-version").inner_text()
    screenshots(page, "landing")

    links = {
        "Admin": "/admin/",
        "API docs (Swagger UI)": "/api/docs/",
        "API docs (ReDoc)": "/api/redoc/",
        "OpenAPI schema": "/api/schema/",
        "/api/health": "/api/health",
        "/api/ready": "/api/ready",
    }
    for name, path in links.items():
        link = page.get_by_role("link", name=name, exact=True)
        assert urlsplit(link.get_attribute("href")).path == path
        # Each answers (the admin with its login page); /api/ready may say 503 while the model loads.
        answer = page.request.get(link.get_attribute("href"))
        assert answer.status in ((200, 503) if path == "/api/ready" else (200,)), (name, answer.status)

    page.get_by_role("link", name="Admin", exact=True).click()
    expect(page.get_by_label("Username")).to_be_visible()


def test_the_landing_page_without_an_active_version_says_how_to_get_one(page, db):
    page.goto("/")
    assert "No active version yet" in page.locator("#landing-version").inner_text()


def test_view_site_in_the_admin_leads_to_the_landing_page(curator_page, base_version, expect):
    curator_page.get_by_role("link", name="View site").click()
    expect(curator_page.locator("#landing-version")).to_contain_text(base_version.name)
    assert urlsplit(curator_page.url).path == "/"


def test_favicon_answers_and_admin_pages_link_it(curator_page):
    page = curator_page
    answer = page.request.get("/favicon.ico")
    assert answer.status == 200 and answer.headers["content-type"] in ("image/x-icon", "image/vnd.microsoft.icon")
    assert answer.body()[:4] == b"\x00\x00\x01\x00"  # an ICO file's header

    icons = page.locator("link[rel=icon]")
    assert icons.count() >= 1
    for i in range(icons.count()):
        answer = page.request.get(icons.nth(i).get_attribute("href"))
        assert answer.status == 200 and answer.headers["content-type"].startswith("image/")


# What the docs pages' Content-Security-Policy stops before it is asked for: ReDoc's bundle draws
# Redocly's logo from their CDN under its menu, with no option to turn it off.
REFUSED_BY_POLICY = {"https://cdn.redoc.ly/redoc/logo-mini.svg"}


@pytest.mark.parametrize("path", ["/api/docs/", "/api/redoc/"])
def test_the_api_docs_load_nothing_from_the_internet(page, public_origin, path, screenshots):
    # Under a real host name, not localhost, as a deployment serves them.
    origin = public_origin
    asked, sent = [], []
    page.on("request", lambda request: asked.append(request.url))

    def network(route):
        # Every request that reaches the network passes here; anything for elsewhere is recorded and
        # refused at once (this machine has no internet to wait on).
        sent.append(route.request.url)
        route.continue_() if route.request.url.startswith(origin + "/") else route.abort()

    page.route("**/*", network)
    page.goto(origin + path)
    # Both have drawn the schema's operations.
    page.locator("text=Write a product description >> visible=true").first.wait_for()
    page.wait_for_load_state("networkidle")
    screenshots(page, path.strip("/").replace("/", "-"))

    assert [url for url in sent if not url.startswith(origin + "/")] == [], f"{path} asked the internet"
    assert origin + "/api/schema/" in sent
    refused = {url for url in asked if url not in sent and not url.startswith(("data:", "blob:"))}
    assert refused <= REFUSED_BY_POLICY, f"{path}: the browser refused {refused - REFUSED_BY_POLICY}"
    assert page.js_errors == []


@pytest.fixture
def full_lists(base_version, dataset_factory, admin_user):
    """A row or more in every list, with the long texts that overflowed at 1366 px."""
    dataset = dataset_factory(name="adidas-usa-2024-spring-catalogue-with-a-long-name", examples=12)
    long_description = " ".join(["A breathable knit upper and a cushioned midsole carry you from run to run."] * 6)
    example = dataset.examples.first()
    example.description = long_description
    example.save(update_fields=["description"])
    now = timezone.now()
    job = FineTuningJob.objects.create(
        dataset=dataset,
        base_model=base_version.base_model,
        hyperparameters={"max_steps": 8},
        status=FineTuningJob.Status.SUCCEEDED,
        progress=1.0,
        step=8,
        total_steps=8,
        started_at=now,
        finished_at=now,
        worker="training@a-rather-long-worker-host-name.internal:12345",
    )
    FineTuningJob.objects.create(
        dataset=dataset,
        base_model=base_version.base_model,
        hyperparameters={},
        status=FineTuningJob.Status.FAILED,
        error="worker lost: no heartbeat for 120 s " * 4,
        finished_at=now,
    )
    version = version_register(
        name="adidas-usa-2024-spring-catalogue-with-a-long-name-job1",
        kind=ModelVersion.Kind.FULL,
        base_model=base_version.base_model,
        relpath=base_version.artifact_path,
        sha256=base_version.sha256,
        hyperparameters={},
        metrics={"validation_loss": 3.1551, "train_loss": 2.5},
        job=job,
    )
    version_activate(version=version, user=admin_user, reason=LONG_REASON)
    Activation.objects.create(version=base_version, previous=version, kind=Activation.Kind.ROLLBACK, reason=LONG_REASON)
    return dataset


ADMIN_LISTS = [
    "/admin/",
    "/admin/finetuning/dataset/",
    "/admin/finetuning/trainingexample/",
    "/admin/finetuning/finetuningjob/",
    "/admin/finetuning/modelversion/",
    "/admin/finetuning/activation/",
    "/admin/finetuning/evaluation/",
    "/admin/inference/apikey/",
    "/admin/inference/generation/",
]


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_admin_lists_fit_a_1366_px_screen(curator_page, full_lists, theme, screenshots):
    page = curator_page
    page.evaluate(f"localStorage.setItem('theme', '{theme}')")  # the admin's own theme switch
    for path in ADMIN_LISTS:
        assert page.goto(path).status == 200, path
        screenshots(page, path.strip("/").replace("/", "-"))
        overflow = page.evaluate(
            """() => [document.documentElement, ...document.querySelectorAll('#changelist .results, .module')]
                .filter(box => box.scrollWidth > box.clientWidth + 1)
                .map(box => {
                    // Name what sticks out, for the failure message.
                    const right = box.getBoundingClientRect().right;
                    const out = [...box.querySelectorAll('*')].find(e => e.getBoundingClientRect().right > right + 1);
                    const name = (e) => e ? `${e.tagName.toLowerCase()}#${e.id}.${e.className}` : '?';
                    return `${name(box)} ${box.scrollWidth} > ${box.clientWidth} px (${name(out)})`;
                })"""
        )
        assert overflow == [], f"{path} is wider than the screen: {overflow}"


def _contrast(page, selector):
    """WCAG contrast ratio between an element's text colour and the background it is drawn on."""
    return page.evaluate(
        """(selector) => {
            const el = document.querySelector(selector);
            const rgb = (c) => c.match(/[\\d.]+/g).slice(0, 4).map(Number);
            let bg = el, color;
            while (bg) {
                const c = rgb(getComputedStyle(bg).backgroundColor);
                if (c.length < 4 || c[3] > 0) { color = c; break; }
                bg = bg.parentElement;
            }
            const lum = ([r, g, b]) => [r, g, b].map(v => v / 255)
                .map(v => v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4)
                .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
            const [a, b] = [lum(rgb(getComputedStyle(el).color)), lum(color)].sort((x, y) => y - x);
            return (a + 0.05) / (b + 0.05);
        }""",
        selector,
    )


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_links_on_a_module_header_bar_are_readable(curator_page, full_lists, theme):
    # The versions list's "Recent activations (all)": a link drawn in the link colour on the header
    # bar, which is nearly the same colour.
    page = curator_page
    page.evaluate(f"localStorage.setItem('theme', '{theme}')")
    page.goto("/admin/finetuning/modelversion/")
    link = page.locator(".module h2 a", has_text="all")
    assert link.is_visible()
    assert _contrast(page, ".module h2 a") >= 4.5


def test_name_fields_are_wide_enough_for_a_product_name(curator_page, full_lists, screenshots):
    page = curator_page
    for path in ["/admin/finetuning/trainingexample/add/", "/admin/finetuning/dataset/add/"]:
        page.goto(path)
        field = page.get_by_label("Name:")
        field.fill("adidas Ultraboost 22 Running Shoes, Core Black")
        # The whole name shows, at the admin's font size, and the field stays within the form.
        assert field.evaluate("el => el.scrollWidth <= el.clientWidth"), f"{path}: the name does not fit its field"
        form = page.locator("#content-main form").bounding_box()
        box = field.bounding_box()
        assert box["x"] + box["width"] <= form["x"] + form["width"]
        screenshots(page, path.strip("/").replace("/", "-"))

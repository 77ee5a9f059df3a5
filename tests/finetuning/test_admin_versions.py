"""The version pages as a curator decides on them: the comparison with the active version,
the promotion gate's checks, one validation loss, activating, rolling back and forward."""

import re

import pytest
from django.urls import reverse

from finetuning.models import Activation, Evaluation, EvaluationScore, ModelVersion
from finetuning.services.jobs import job_execute, job_start
from finetuning.services.promotion import promotion_consider

pytest_plugins = ["tests.browser"]

METRICS = {
    "validation_loss": 3.15512, "perplexity": 23.46, "rouge_l": 14.0649, "chrf": 31.2, "bleu": 4.1,
    "attribute_coverage": 0.5, "mean_words": 38.0, "reference_mean_words": 41.0, "length_ratio": 0.93,
    "cut_off_share": 0.1, "distinct_2": 0.61, "repeated_4gram_share": 0.1, "empty_share": 0.0, "echo_share": 0.0,
    "format_failure_share": 0.0,
}  # fmt: skip


@pytest.fixture
def curator(admin_client):
    return admin_client


@pytest.fixture
def trained(base_version, dataset_factory):
    """A version trained by a job (on the tiny model), with validation examples held out."""

    def make(name="seed", hyperparameters=None):
        dataset = dataset_factory(name=name)
        held = list(dataset.examples.order_by("id").values_list("id", flat=True)[:6])
        dataset.examples.filter(id__in=held).update(split="validation")
        job = job_start(dataset=dataset, hyperparameters={"max_steps": 2, "batch_size": 4, **(hyperparameters or {})})
        version = job_execute(job_id=job.pk)
        assert version is not None, job.error
        return version

    return make


def fabricated_evaluation(version, scores, *, samples=1, decoding=None):
    """A succeeded evaluation of ``version`` with hand-made scores: ``scores`` is
    [(role, version, metrics)]; every version's output for sample i is "<name> says i";
    ``decoding``: the stored settings (default: one from before the rules existed)."""
    evaluation = Evaluation.objects.create(
        version=version,
        snapshot=version.snapshot,
        status="succeeded",
        example_ids=list(range(1, samples + 1)),
        samples=[
            {"id": i, "attributes": {"name": f"Kettle {i}", "color": "Blue"}, "reference": f"Reference text {i}."}
            for i in range(1, samples + 1)
        ],
        decoding=decoding or {"greedy": True, "max_new_tokens": 64, "repetition_penalty": 1.0},
    )
    for role, owner, metrics in scores:
        EvaluationScore.objects.create(
            evaluation=evaluation,
            version=owner,
            role=role,
            metrics=metrics,
            outputs=[{"text": f"{owner.name} says {i}", "finish_reason": "stop"} for i in range(1, samples + 1)],
        )
    return evaluation


def _page(client, url):
    response = client.get(url)
    assert response.status_code == 200, url
    return response.content.decode()


def _row(html, label):
    """The comparison table's row of the metric labelled ``label``, as HTML."""
    start = html.index(f"<td>{label}")
    return html[start : html.index("</tr>", start)]


def test_a_change_too_small_for_two_decimals_is_shown_with_its_delta_and_direction(curator, trained, base_version):
    version = trained()
    fabricated_evaluation(
        version,
        [
            ("candidate", version, {**METRICS, "rouge_l": 14.0649, "attribute_coverage": 0.45}),
            ("active", base_version, {**METRICS, "rouge_l": 14.0601, "attribute_coverage": 0.5}),
            ("base", base_version, {**METRICS, "rouge_l": 14.0601, "attribute_coverage": 0.5}),
        ],
    )
    for url in (
        reverse("admin:finetuning_modelversion_change", args=[version.pk]),
        reverse("admin:finetuning_modelversion_activate", args=[version.pk]),
    ):
        html = _page(curator, url)
        rouge = _row(html, "ROUGE-L F1")
        # Not "14.06" beside "14.06": enough decimals to tell them apart, and the change itself.
        assert "14.065" in rouge and "14.060" in rouge and "14.06<" not in rouge
        assert "▲ +0.005</b> better" in rouge and 'class="delta better"' in rouge
        coverage = _row(html, "attribute coverage")
        assert "45.0%" in coverage and "50.0%" in coverage
        assert "▼ -5.0 pp</b> worse" in coverage and 'class="delta worse"' in coverage
        # The active version is the base model: one column, named for both roles.
        header = html[html.index('id="comparison"') : html.index("</thead>", html.index('id="comparison"'))]
        assert "active = base" in header and header.count(base_version.name) == 1
        assert "change against active" in header


def test_the_active_versions_own_evaluation_merges_its_columns_and_compares_with_the_base(
    curator, trained, base_version
):
    version = trained()
    Activation.objects.all().delete()  # no history needed for this page
    ModelVersion.objects.update(is_active=False)
    ModelVersion.objects.filter(pk=version.pk).update(is_active=True)
    fabricated_evaluation(
        version,
        [
            ("candidate", version, {**METRICS, "rouge_l": 20.0}),
            ("active", version, {**METRICS, "rouge_l": 20.0}),
            ("base", base_version, {**METRICS, "rouge_l": 12.5}),
        ],
    )
    html = _page(curator, reverse("admin:finetuning_modelversion_change", args=[version.pk]))
    header = html[html.index('id="comparison"') : html.index("</thead>", html.index('id="comparison"'))]
    assert "this version = active" in header and "change against base" in header
    assert header.count(f">{version.name}</a>") == 1
    assert "▲ +7.50</b> better" in _row(html, "ROUGE-L F1")


def test_the_comparison_header_says_how_the_text_was_decoded(curator, trained, base_version):
    version = trained()
    scores = [("candidate", version, METRICS), ("active", base_version, METRICS), ("base", base_version, METRICS)]

    def header(decoding):  # the page shows the latest evaluation
        fabricated_evaluation(version, scores, decoding=decoding)
        html = _page(curator, reverse("admin:finetuning_modelversion_change", args=[version.pk]))
        return " ".join(
            html[html.index('id="comparison"') : html.index("</h2>", html.index('id="comparison"'))].split()
        )

    # Stored before the repeated n-gram rule, the length floor and the fact guard existed.
    assert "at most 64 new tokens, repeats allowed, fact guard off" in header(None)
    ruled = header(
        {"greedy": True, "max_new_tokens": 160, "repetition_penalty": 1.0, "fact_guard": True,
         "no_repeat_ngram_size": 4, "min_new_tokens": 73}
    )  # fmt: skip
    assert "at most 160 new tokens, no 4-token run twice, no end before 73 tokens, fact guard on" in ruled


def test_the_gates_check_of_each_metric_is_shown_beside_it(curator, trained, base_version, settings):
    settings.PROMOTION_AUTO_ACTIVATE = False
    settings.PROMOTION_PRIMARY_METRIC = "rouge_l"
    settings.PROMOTION_MARGIN = 1.0
    settings.PROMOTION_GUARD_METRICS = ["attribute_coverage", "repeated_4gram_share", "format_failure_share"]
    version = trained()
    evaluation = fabricated_evaluation(
        version,
        [
            ("candidate", version, {**METRICS, "rouge_l": 18.0, "attribute_coverage": 0.4}),
            ("active", base_version, {**METRICS, "rouge_l": 14.0}),
        ],
    )
    promotion_consider(evaluation=evaluation)
    html = _page(curator, reverse("admin:finetuning_modelversion_change", args=[version.pk]))
    assert "✘ Does not pass the promotion gate" in html
    coverage = _row(html, "attribute coverage")
    assert "✘ fail" in coverage and "worse than the active version: 40.0% against 50.0%" in coverage
    rouge = _row(html, "ROUGE-L F1")
    assert "✔ pass" in rouge and "+4.00, at least the required margin of 1" in rouge
    assert "✔ pass" in _row(html, "outputs with a repeated 4-gram")
    assert "✘" not in _row(html, "chrF")  # not a metric the gate checks
    # The line above the table names the guard that failed, not only the margin.
    assert re.search(r"worse on attribute coverage \(40\.0% against 50\.0%\)", html)


def test_the_activate_form_comes_before_the_numbers_and_samples_are_paged(curator, trained, base_version):
    version = trained()
    fabricated_evaluation(
        version,
        [("candidate", version, METRICS), ("active", base_version, METRICS), ("base", base_version, METRICS)],
        samples=12,
    )
    for url in (
        reverse("admin:finetuning_modelversion_change", args=[version.pk]),
        reverse("admin:finetuning_modelversion_activate", args=[version.pk]),
    ):
        html = _page(curator, url)
        button = html.index(f'value="Activate {version.name}"')
        assert html.index('name="reason"') < button < html.index('id="comparison"') < html.index('id="samples"')
        assert html.count('<details class="sample-page"') == 3  # 12 samples, five to a page
        assert "Samples 1–5 of 12" in html and "Samples 11–12 of 12" in html
        assert html.count('<details class="sample-page" open>') == 1  # only the first page open
        assert f"{version.name} says 12" in html  # every sample is there, in its page


def test_activating_from_the_version_page_records_the_reason(curator, trained, base_version):
    version = trained()
    html = _page(curator, reverse("admin:finetuning_modelversion_change", args=[version.pk]))
    assert "has no finished evaluation" in html
    response = curator.post(
        reverse("admin:finetuning_modelversion_activate", args=[version.pk]),
        {"confirm": "yes", "reason": "reads better"},
        follow=True,
    )
    activation = Activation.objects.first()
    assert (activation.version, activation.reason, activation.kind) == (version, "reads better", "manual")
    # The message keeps the version's name as it is spelled.
    assert f'<li class="success">{version.name} is now the active version.</li>' in response.content.decode()
    assert version.name[0].upper() + version.name[1:] not in response.content.decode()


def test_validation_loss_is_one_number_on_the_list_the_version_page_and_the_evaluation(curator, trained):
    from finetuning.services.evaluations import evaluation_execute, evaluation_start

    # Cut short at training (max_seq_length 100 holds the tiny model's ~90-token prompts and a few
    # description tokens), so the training loop's validation loss and the evaluation's differ.
    version = trained(hyperparameters={"max_seq_length": 100})
    evaluation = evaluation_execute(evaluation_id=evaluation_start(version=version).pk)
    assert evaluation.status == "succeeded", evaluation.error
    scored = f"{evaluation.score('candidate').metrics['validation_loss']:.4f}"
    trained_loss = f"{version.metrics['validation_loss']:.4f}"
    assert scored != trained_loss

    listing = _page(curator, reverse("admin:finetuning_modelversion_changelist"))
    row = listing[listing.index(f">{version.name}</a>") :]
    row = row[: row.index("</tr>")]
    assert f'<td class="field-validation_loss">{scored}</td>' in row
    assert "Validation loss (evaluation)" in listing and trained_loss not in row

    html = _page(curator, reverse("admin:finetuning_modelversion_change", args=[version.pk]))
    assert scored in _row(html, "validation loss (evaluation)")
    training = html[html.index('id="training"') :]
    assert re.search(rf"validation loss \(training\)</dt>\s*<dd>{trained_loss}", training)
    assert '"validation_loss"' not in html  # not again, unnamed, in the raw metrics

    evaluation_page = _page(curator, reverse("admin:finetuning_evaluation_change", args=[evaluation.pk]))
    assert scored in _row(evaluation_page, "validation loss (evaluation)")


def test_the_version_page_shows_skipped_and_truncated_examples_with_a_warning(curator, trained):
    version = trained()
    metrics = {**version.metrics, "train_examples": 8, "skipped_examples": 171, "truncated_examples": 3}
    ModelVersion.objects.filter(pk=version.pk).update(metrics=metrics, hyperparameters={"max_seq_length": 96})
    html = _page(curator, reverse("admin:finetuning_modelversion_change", args=[version.pk]))
    training = html[html.index('id="training"') : html.index("</dl>", html.index('id="training"'))]
    assert 'class="warning"' in training and "171 examples skipped" in training
    assert "max_seq_length 96" in training
    assert re.search(r"training examples</dt>\s*<dd>8 of \d+ trained on", training)
    assert re.search(r"truncated</dt>\s*<dd>3: description cut at 96 tokens", training)

    ModelVersion.objects.filter(pk=version.pk).update(metrics={**metrics, "skipped_examples": 0})
    html = _page(curator, reverse("admin:finetuning_modelversion_change", args=[version.pk]))
    assert 'class="warning"' not in html[html.index('id="training"') : html.index("</dl>", html.index('id="training"'))]


def test_a_version_page_is_read_only_without_save_buttons(curator, base_version):
    url = reverse("admin:finetuning_modelversion_change", args=[base_version.pk])
    html = _page(curator, url)
    assert 'name="_save"' not in html and 'name="_continue"' not in html and 'class="submit-row"' not in html
    assert curator.post(url, {"name": "renamed"}).status_code == 403
    assert ModelVersion.objects.get(pk=base_version.pk).name == base_version.name


def test_rolling_back_asks_why_and_rolling_forward_is_named_for_what_it_does(curator, trained, base_version):
    version = trained()
    changelist = reverse("admin:finetuning_modelversion_changelist")
    rollback = reverse("admin:finetuning_modelversion_rollback")
    curator.post(reverse("admin:finetuning_modelversion_activate", args=[version.pk]), {"confirm": "yes"})

    html = _page(curator, rollback)
    assert f"Roll back to {base_version.name}" in html and "rolls back to the older version" in html
    refused = curator.post(rollback, {"version": base_version.pk, "reason": "  "})
    assert refused.status_code == 200 and "Say why" in refused.content.decode()
    assert ModelVersion.objects.get(is_active=True) == version  # nothing changed

    done = curator.post(rollback, {"version": base_version.pk, "reason": "descriptions got worse"}, follow=True)
    assert ModelVersion.objects.get(is_active=True) == base_version
    latest = Activation.objects.first()
    assert (latest.kind, latest.reason, latest.user.username) == ("rollback", "descriptions got worse", "admin")
    assert f"Rolled back from {version.name}: {base_version.name} is the active version again." in (
        done.content.decode()
    )

    # Undoing that goes to the newer version: a roll forward, not a "roll back".
    for url in (changelist, reverse("admin:finetuning_modelversion_change", args=[base_version.pk])):
        html = _page(curator, url)
        assert f"Roll forward to {version.name}" in html and "Roll back to" not in html, url
    curator.post(rollback, {"version": version.pk, "reason": "fixed upstream"})
    assert ModelVersion.objects.get(is_active=True) == version
    latest = Activation.objects.first()
    assert (latest.version, latest.previous, latest.reason) == (version, base_version, "fixed upstream")
    assert latest.kind != "rollback"
    assert f"Roll back to {base_version.name}" in _page(curator, changelist)


def test_a_roll_back_confirmed_for_one_version_never_activates_another(curator, trained, base_version):
    first, second = trained("one"), trained("two")
    activate = "admin:finetuning_modelversion_activate"
    curator.post(reverse(activate, args=[first.pk]), {"confirm": "yes"})
    curator.post(reverse(activate, args=[second.pk]), {"confirm": "yes"})
    # The page named base-...; meanwhile the history moved on, and undoing now means `first`.
    response = curator.post(
        reverse("admin:finetuning_modelversion_rollback"), {"version": base_version.pk, "reason": "old page"}
    )
    assert response.status_code == 200 and f"would now activate {first.name}" in response.content.decode()
    assert ModelVersion.objects.get(is_active=True) == second


def test_the_activations_list_and_its_link_from_the_versions_list(curator, trained, base_version):
    version = trained()
    reason = "a long reason " * 20
    curator.post(
        reverse("admin:finetuning_modelversion_activate", args=[version.pk]), {"confirm": "yes", "reason": reason}
    )
    listing = _page(curator, reverse("admin:finetuning_modelversion_changelist"))
    assert reverse("admin:finetuning_activation_changelist") in listing and reason.strip() in listing
    html = _page(curator, reverse("admin:finetuning_activation_changelist"))
    assert reason.strip() in html


# --- In a browser -------------------------------------------------------------------------


@pytest.fixture
def decided(trained, base_version, settings):
    """A version with a 12-sample evaluation that the gate refused on a guard metric."""
    settings.PROMOTION_AUTO_ACTIVATE = False
    version = trained()
    evaluation = fabricated_evaluation(
        version,
        [
            ("candidate", version, {**METRICS, "rouge_l": 14.0649, "attribute_coverage": 0.45, "bleu": 5.3}),
            ("active", base_version, {**METRICS, "rouge_l": 12.9, "validation_loss": 4.2}),
            ("base", base_version, {**METRICS, "rouge_l": 12.9, "validation_loss": 4.2}),
        ],
        samples=12,
    )
    promotion_consider(evaluation=evaluation)
    return version


def test_the_decision_pages_in_a_browser(decided, base_version, curator_page, screenshots):
    version = decided
    curator_page.goto(reverse("admin:finetuning_modelversion_change", args=[version.pk]))
    screenshots(curator_page, "version page")
    button = curator_page.get_by_role("button", name=f"Activate {version.name}")
    assert (
        button.bounding_box()["y"] + button.bounding_box()["height"] < curator_page.viewport_size["height"]
    )  # no scrolling to decide
    assert curator_page.get_by_role("button", name="Save").count() == 0
    assert curator_page.locator("#samples details[open]").count() == 1

    evaluation = version.evaluations.filter(status="succeeded").get()
    curator_page.goto(reverse("admin:finetuning_evaluation_change", args=[evaluation.pk]))
    screenshots(curator_page, "evaluation page")
    assert curator_page.locator("#comparison .gate.fail").first.is_visible()

    curator_page.goto(reverse("admin:finetuning_modelversion_activate", args=[version.pk]))
    screenshots(curator_page, "activate confirmation")
    button = curator_page.get_by_role("button", name=f"Activate {version.name}")
    assert button.bounding_box()["y"] < curator_page.viewport_size["height"]
    curator_page.get_by_label(f"Why activate {version.name}?").fill("better ROUGE-L, coverage checked by hand")
    button.click()
    assert curator_page.locator("ul.messagelist").inner_text().startswith(f"{version.name} is now the active version")

    curator_page.goto(reverse("admin:finetuning_modelversion_changelist"))
    screenshots(curator_page, "versions list")
    link = curator_page.locator("#activations h2 a")
    colour, bar = link.evaluate("a => [getComputedStyle(a).color, getComputedStyle(a.parentElement).backgroundColor]")
    assert colour != bar  # the "all" link reads on its bar

    curator_page.get_by_role("link", name=f"Roll back to {base_version.name}…").click()
    screenshots(curator_page, "roll back")
    curator_page.get_by_label("Why? (required)").fill("customers preferred the old texts")
    curator_page.get_by_role("button", name=f"Roll back to {base_version.name}").click()
    assert f"Rolled back from {version.name}" in curator_page.locator("ul.messagelist").inner_text()
    screenshots(curator_page, "base page after the roll back")
    assert curator_page.get_by_role("link", name=f"Roll forward to {version.name}…").count() == 1

    curator_page.goto(reverse("admin:finetuning_activation_changelist"))
    screenshots(curator_page, "activations")
    results = curator_page.locator("#changelist .results")
    assert results.evaluate("r => r.scrollWidth <= r.clientWidth")  # nothing hidden off to the right

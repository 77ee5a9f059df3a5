import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from finetuning.models import FineTuningJob


@pytest.mark.django_db
def test_ensure_admin_generates_a_password_once(capsys, monkeypatch):
    monkeypatch.delenv("GENAPI_ADMIN_PASSWORD", raising=False)
    call_command("ensure_admin")
    out = capsys.readouterr().out
    password = out.split("password: ")[1].split()[0]
    user = get_user_model().objects.get(username="admin")
    assert user.is_superuser and user.check_password(password)
    call_command("ensure_admin")
    assert "already exists" in capsys.readouterr().out


@pytest.mark.django_db
def test_ensure_admin_takes_the_password_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("GENAPI_ADMIN_PASSWORD", "from-the-env-123")
    call_command("ensure_admin", "--username", "curator")
    assert "from-the-env-123" not in capsys.readouterr().out
    assert get_user_model().objects.get(username="curator").check_password("from-the-env-123")


@pytest.fixture
def worker_inline(monkeypatch):
    """Stands in for the broker and a worker: a queued job runs as soon as it is committed."""
    from finetuning import tasks
    from finetuning.services.jobs import job_execute

    monkeypatch.setattr(tasks.job_run, "apply_async", lambda args, **kwargs: job_execute(job_id=args[0]))


@pytest.mark.django_db(transaction=True)  # the job is queued on commit, as in production
def test_finetune_waits_with_a_progress_bar_and_names_the_new_version(
    base_version, dataset_factory, worker_inline, capsys
):
    dataset_factory()
    call_command(
        "finetune",
        "--dataset",
        "shop",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--max-seq-length",
        "128",
        "--wait",
    )
    out, err = capsys.readouterr()
    assert "queued on shop: snapshot" in out and "train / " in out
    assert "succeeded" in out and "version shop-job" in out and "validation loss" in out
    assert "2/2" in err  # tqdm's bar
    assert FineTuningJob.objects.get().status == "succeeded"


def test_finetune_refuses_bad_input_with_one_line_and_queues_nothing(base_version, dataset_factory):
    dataset_factory()
    with pytest.raises(CommandError, match=r"bad hyperparameters: --learning-rate: must be between .*--lora-r"):
        call_command("finetune", "--dataset", "shop", "--learning-rate", "5", "--lora-r", "0")
    with pytest.raises(CommandError, match="no dataset named 'nope'"):
        call_command("finetune", "--dataset", "nope")
    assert not FineTuningJob.objects.exists()


def test_finetune_cancels_a_job(base_version, dataset_factory, capsys):
    dataset_factory()
    call_command("finetune", "--dataset", "shop")
    job = FineTuningJob.objects.get()
    call_command("finetune", "--cancel", str(job.pk))
    assert f"Job {job.pk} cancelled." in capsys.readouterr().out
    with pytest.raises(CommandError, match="already cancelled"):
        call_command("finetune", "--cancel", str(job.pk))


@pytest.mark.django_db(transaction=True)
def test_finetune_wait_fails_with_the_jobs_error(base_version, dataset_factory, model_store, worker_inline):
    dataset_factory()
    for path in (model_store / "base" / "tiny-llama").glob("*.safetensors"):
        path.unlink()  # the base weights vanish after the start
    with pytest.raises(CommandError, match=r"job \d+ failed: "):
        call_command("finetune", "--dataset", "shop", "--max-steps", "2", "--wait")


HELD_OUT = """product,colour,text
Trail Runner,Black,The Trail Runner is a light shoe for long runs.
Desk Lamp,White,A white desk lamp with a soft warm light.
Wool Scarf,Grey,A grey wool scarf that keeps you warm.
,Red,A row without a name is skipped.
"""


@pytest.fixture
def held_out_csv(tmp_path):
    path = tmp_path / "held_out.csv"
    path.write_text(HELD_OUT)
    return path


def test_evaluate_scores_a_version_on_a_file_without_importing_it(base_version, held_out_csv, tmp_path, capsys):
    import json

    from finetuning.models import TrainingExample

    out = tmp_path / "scores.json"
    call_command(
        "evaluate", "--version", "active", "--file", str(held_out_csv), "--map", "name=product",
        "--map", "color=colour", "--map", "description=text", "--limit", "2", "--json", str(out),
    )  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert f"{base_version.name} on {held_out_csv}" in stdout and "2 examples" in stdout
    for label in ("validation loss", "perplexity", "ROUGE-L F1", "chrF", "BLEU", "attribute coverage",
                  "distinct-2", "outputs with a repeated 4-gram", "format failures"):  # fmt: skip
        assert label in stdout
    payload = json.loads(out.read_text())
    assert payload["version"]["name"] == base_version.name
    assert [e["reference"] for e in payload["examples"]] == [
        "The Trail Runner is a light shoe for long runs.",
        "A white desk lamp with a soft warm light.",
    ]
    assert all("text" in e and e["finish_reason"] in ("stop", "length") for e in payload["examples"])
    assert payload["metrics"]["perplexity"] > 1
    assert "skipped row 5" in stderr
    assert not TrainingExample.objects.exists()  # scored, not imported


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--version", "nope"], "no such model version"),
        (["--version", "base"], "has no validation split"),
        (["--version", "base", "--file", "missing.csv"], "no such file"),
        (["--version", "base", "--file", "{csv}", "--map", "name=nope"], "'nope'"),
        (["--version", "base", "--limit", "0"], "--limit must be at least 1"),
        (["--version", "base", "--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size must be 0"),
        (["--version", "base", "--min-new-tokens", "-1"], "--min-new-tokens must be 0"),
    ],
)
def test_evaluate_refuses_bad_input_in_one_line(base_version, held_out_csv, arguments, message):
    arguments = [a.replace("{csv}", str(held_out_csv)) for a in arguments]
    with pytest.raises(CommandError, match=message) as info:
        call_command("evaluate", *arguments)
    assert "\n" not in str(info.value)

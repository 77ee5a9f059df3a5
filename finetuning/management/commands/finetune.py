import time
from dataclasses import fields

from django.core.management.base import BaseCommand, CommandError

from finetuning.hyperparameters import HyperparameterError, Hyperparameters
from finetuning.models import FineTuningJob
from finetuning.selectors import dataset_get, job_get, version_get
from finetuning.services.jobs import JobError, job_cancel, job_retrain, job_start

POLL_SECONDS = 1.0
# How long a job may sit queued before the command says no worker seems to be listening.
NO_WORKER_HINT_SECONDS = 30


class Command(BaseCommand):
    help = (
        "Start a fine-tuning job on a dataset (or retrain a version exactly), optionally wait for it with a "
        "progress bar; or cancel a job. A worker on queue `training` runs it. Ctrl-C while waiting cancels the job. "
        "Example: finetune --dataset seed --epochs 3 --wait"
    )

    def add_arguments(self, parser):
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument("--dataset", help="Dataset to train on.")
        target.add_argument("--retrain", metavar="VERSION", help="Retrain a version on its own snapshot and recipe.")
        target.add_argument("--cancel", type=int, metavar="JOB_ID", help="Cancel a queued or running job.")
        target.add_argument("--watch", type=int, metavar="JOB_ID", help="Wait for an existing job.")
        parser.add_argument("--wait", action="store_true", help="Wait for the job to finish, with a progress bar.")
        group = parser.add_argument_group("hyperparameters (defaults in brackets)")
        for spec in fields(Hyperparameters):
            default = spec.default if spec.name != "lora_target_modules" else ",".join(spec.default)
            group.add_argument(
                f"--{spec.name.replace('_', '-')}", dest=f"hp_{spec.name}", metavar="VALUE", help=f"[{default}]"
            )

    def handle(self, *args, **options):
        if options["cancel"] is not None:
            job = self._job(options["cancel"])
            try:
                job = job_cancel(job=job)
            except JobError as exc:
                raise CommandError(str(exc)) from exc
            state = "cancelled" if job.status == "cancelled" else "will stop at its next step"
            self.stdout.write(f"Job {job.pk} {state}.")
            return
        if options["watch"] is not None:
            self._wait(self._job(options["watch"]))
            return
        hyperparameters = {
            spec.name: options[f"hp_{spec.name}"]
            for spec in fields(Hyperparameters)
            if options[f"hp_{spec.name}"] is not None
        }
        try:
            if options["retrain"]:
                if hyperparameters:
                    raise CommandError("--retrain uses the version's own hyperparameters; give none")
                version = version_get(reference=options["retrain"])
                if version is None:
                    raise CommandError(f"no model version named {options['retrain']!r}")
                job = job_retrain(version=version)
            else:
                dataset = dataset_get(name=options["dataset"])
                if dataset is None:
                    raise CommandError(f"no dataset named {options['dataset']!r}")
                job = job_start(dataset=dataset, hyperparameters=hyperparameters)
        except HyperparameterError as exc:
            raise CommandError(
                "bad hyperparameters: "
                + "; ".join(f"--{key.replace('_', '-')}: {message}" for key, message in exc.errors.items())
            ) from exc
        except JobError as exc:
            raise CommandError(str(exc)) from exc
        snapshot = job.snapshot
        self.stdout.write(
            f"Job {job.pk} queued on {job.dataset.name}: snapshot {snapshot.sha256[:12]} with "
            f"{snapshot.train_examples} train / {snapshot.validation_examples} validation examples "
            f"({snapshot.note}); time limit {job.time_limit_seconds} s."
        )
        if options["wait"]:
            self._wait(job)

    def _job(self, pk):
        job = job_get(pk=pk)
        if job is None:
            raise CommandError(f"no job with id {pk}")
        return job

    def _wait(self, job):
        from tqdm import tqdm

        started = time.monotonic()
        bar = tqdm(total=None, desc=f"job {job.pk} {job.status}", unit="step", dynamic_ncols=True)
        try:
            while job.status not in FineTuningJob.FINISHED:
                time.sleep(POLL_SECONDS)
                job.refresh_from_db()
                if job.total_steps and bar.total != job.total_steps:
                    bar.total = job.total_steps
                bar.n = job.step
                bar.set_description(f"job {job.pk} {job.status}")
                postfix = {}
                if job.loss_history:
                    postfix["loss"] = f"{job.loss_history[-1][1]:.4f}"
                if job.validation_history:
                    postfix["val_loss"] = f"{job.validation_history[-1][1]:.4f}"
                if job.status == "queued" and time.monotonic() - started > NO_WORKER_HINT_SECONDS:
                    postfix["waiting"] = "no worker on queue 'training' yet?"
                bar.set_postfix(postfix, refresh=False)
                bar.refresh()
        except KeyboardInterrupt:
            bar.close()
            try:
                job_cancel(job=job)
                self.stderr.write(f"Cancel requested for job {job.pk}; it stops at its next step.")
            except JobError:
                pass
            raise CommandError(f"interrupted; job {job.pk} cancelled") from None
        bar.close()
        if job.status != FineTuningJob.Status.SUCCEEDED:
            raise CommandError(f"job {job.pk} {job.status}: {job.error or 'no error recorded'}")
        version = job.model_version
        metrics = job.metrics
        validation = metrics.get("validation_loss")
        self.stdout.write(
            f"Job {job.pk} succeeded in {job.wall_seconds:.0f} s: version {version.name}, final train loss "
            f"{metrics.get('final_train_loss'):.4f}"
            + (f", validation loss (training) {validation:.4f}" if validation is not None else ", no validation split")
            + ". Activate it in the admin or with the API."
        )

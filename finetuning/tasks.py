"""Celery entry points: ids in, a service call, nothing else."""

import logging

from celery import shared_task
from celery.signals import worker_ready

from finetuning.services.evaluations import evaluation_execute, evaluations_reap_stale
from finetuning.services.jobs import job_execute, jobs_reap_stale

logger = logging.getLogger(__name__)


@shared_task(name="finetuning.tasks.job_run")
def job_run(job_id):
    # Time limits come with each call, derived from the job (see job_start).
    job_execute(job_id=job_id)


@shared_task(name="finetuning.tasks.evaluation_run")
def evaluation_run(evaluation_id):
    evaluation_execute(evaluation_id=evaluation_id)


@shared_task(name="finetuning.tasks.jobs_reap_stale")
def jobs_reap_stale_run():
    return jobs_reap_stale() + evaluations_reap_stale()


@worker_ready.connect
def _reap_when_a_worker_starts(**kwargs):
    """A restarted worker is the usual sign that the previous one died mid-job."""
    try:
        reaped = jobs_reap_stale() + evaluations_reap_stale()
    except Exception:  # the database is not reachable yet: the periodic check will do it
        logger.exception("Stale-job check at worker start failed")
        return
    if reaped:
        logger.warning("Failed %d job(s) or evaluation(s) whose worker was lost: %s", len(reaped), reaped)

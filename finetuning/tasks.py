"""Celery entry points: ids in, a service call, nothing else."""

import logging

from celery import shared_task
from celery.signals import worker_ready
from django.db import connections

from finetuning.services.evaluations import evaluation_execute, evaluations_reap_stale, evaluations_recheck_queued
from finetuning.services.jobs import job_execute, jobs_reap_stale, jobs_recheck_queued

logger = logging.getLogger(__name__)


def _soft_time_limit(request):
    """The soft time limit the delivered message carries (None when run in-process)."""
    return (request.timelimit or (None, None))[1]


@shared_task(name="finetuning.tasks.job_run", bind=True)
def job_run(self, job_id):
    # Time limits come with each call, derived from the job (see job_start).
    job_execute(job_id=job_id, message_time_limit=_soft_time_limit(self.request))


@shared_task(name="finetuning.tasks.evaluation_run", bind=True)
def evaluation_run(self, evaluation_id):
    # A message sent before the evaluation was sized larger is skipped: see evaluation_resize.
    evaluation_execute(evaluation_id=evaluation_id, message_time_limit=_soft_time_limit(self.request))


def _check(*, worker_start=False):
    """Fail running work whose worker died, then send queued work again or fail it (see
    jobs_recheck_queued): stale rows first, so that a dead worker's job frees its dataset."""
    stale = jobs_reap_stale() + evaluations_reap_stale()
    jobs_resent, jobs_failed = jobs_recheck_queued(worker_start=worker_start)
    evaluations_resent, evaluations_failed = evaluations_recheck_queued(worker_start=worker_start)
    return {
        "stale": stale,
        "jobs_resent": jobs_resent,
        "jobs_failed": jobs_failed,
        "evaluations_resent": evaluations_resent,
        "evaluations_failed": evaluations_failed,
    }


# The name the beat schedule (CELERY_BEAT_SCHEDULE) calls.
@shared_task(name="finetuning.tasks.jobs_reap_stale")
def jobs_check_run():
    return _check()


@worker_ready.connect
def _check_when_a_worker_starts(**kwargs):
    """A restarted worker is the usual sign that the previous one died mid-job, or that
    the broker restarted and lost what was queued."""
    try:
        outcome = _check(worker_start=True)
    except Exception:  # the database is not reachable yet: the periodic check will do it
        logger.exception("Job check at worker start failed")
        return
    finally:
        # Pool processes forked later must not share this process's database connection.
        connections.close_all()
    if any(outcome.values()):
        logger.warning("Job check at worker start: %s", outcome)

"""Celery entry points: ids in, a service call, nothing else."""

import logging

from celery import shared_task

from inference.services.generation_log import generations_purge

logger = logging.getLogger(__name__)


@shared_task(name="inference.tasks.generations_purge")
def generations_purge_task():
    """Hourly (CELERY_BEAT_SCHEDULE): drop the generation log's expired records."""
    deleted = generations_purge()
    if deleted:
        logger.info("Generation log: %d record(s) past GENERATION_LOG_RETENTION_DAYS deleted", deleted)
    return deleted

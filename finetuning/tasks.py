from celery import shared_task

from finetuning.services.jobs import job_execute


@shared_task(name="finetuning.tasks.job_run")
def job_run(job_id):
    job_execute(job_id=job_id)

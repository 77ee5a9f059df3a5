import os

from celery import Celery
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "genapi.settings.dev")

app = Celery("genapi")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_ready.connect
def _worker_heartbeat_start(sender, **kwargs):
    """A worker stamps its queues as seen, now and every WORKER_HEARTBEAT_SECONDS, from its main
    process: /api/ready reports whether a training (and an evaluation) worker is alive."""
    from genapi.health import worker_heartbeat_start

    worker_heartbeat_start(sender.app.amqp.queues.consume_from or sender.app.amqp.queues)

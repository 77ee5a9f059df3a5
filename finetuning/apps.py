from django.apps import AppConfig


class FinetuningConfig(AppConfig):
    name = "finetuning"
    verbose_name = "Fine-tuning"

    def ready(self):
        from finetuning import (
            checks,  # noqa: F401  (registers the start-up checks)
            signals,  # noqa: F401  (answers the serving side's requests: a generation made an example)
        )

from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "Inference and clients"
    # Nothing is loaded here: models load lazily on first use (see loader.py).

    def ready(self):
        from django.contrib.auth import get_user_model
        from django.db.models.signals import post_save

        from inference import checks, schema  # noqa: F401  (registers start-up checks and schema extensions)
        from inference.services.keys import owner_saved

        # Cached keys follow their owner: a deactivated owner's keys stop at the next request.
        post_save.connect(owner_saved, sender=get_user_model(), dispatch_uid="genapi-key-owner")

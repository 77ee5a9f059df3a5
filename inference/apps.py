from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "Inference"
    # Nothing is loaded here: models load lazily on first use (see loader.py).

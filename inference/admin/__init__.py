"""Admin screens of the inference app, one module per screen: API keys and their usage
(keys.py), the generation log and its feedback (generations.py)."""

from inference.admin import generations, keys  # noqa: F401 (registers)

"""The playground: generate with a version, the active version and the base side by side."""


class PlaygroundMixin:
    """The version admin's playground."""

"""GenerationParams: what a generation is asked for, the one shape it has from the request
serializers (inference/serializers.py: generation_params) through the views, the playground and
evaluations to the engine, whose sampler (inference/engine/sampling.py) reads it as it is.

No Django and no torch at import: the engine imports this module. The default length is the
GENERATE_DEFAULT_MAX_NEW_TOKENS setting, which the code takes from here and nowhere else
(max_new_tokens_default; the fact guard's, GENERATE_FACT_GUARD, the repeated n-gram rule's,
GENERATE_NO_REPEAT_NGRAM_SIZE, and the length floor's, GENERATE_MIN_NEW_TOKENS, likewise; inference/checks.py only checks it against the cap), when a
GenerationParams is made without one; the request serializers' defaults, and so the OpenAPI
schema's, are the type's (param_default)."""

from dataclasses import MISSING, dataclass, field, fields


def max_new_tokens_default():
    """New tokens when nobody says how many: the GENERATE_DEFAULT_MAX_NEW_TOKENS setting."""
    from django.conf import settings

    return settings.GENERATE_DEFAULT_MAX_NEW_TOKENS


def fact_guard_default():
    """The fact guard when nobody says: the GENERATE_FACT_GUARD setting."""
    from django.conf import settings

    return settings.GENERATE_FACT_GUARD


def no_repeat_default():
    """The repeated n-gram rule when nobody says: the GENERATE_NO_REPEAT_NGRAM_SIZE setting."""
    from django.conf import settings

    return settings.GENERATE_NO_REPEAT_NGRAM_SIZE


def min_new_tokens_default():
    """The least new tokens when nobody says: the GENERATE_MIN_NEW_TOKENS setting."""
    from django.conf import settings

    return settings.GENERATE_MIN_NEW_TOKENS


@dataclass(frozen=True)
class GenerationParams:
    # The names are those of a generation log record's parameters (dataclasses.asdict): renaming one changes the log.
    max_new_tokens: int = field(default_factory=max_new_tokens_default)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    repetition_penalty: float = 1.0  # 1: none
    # No token n-gram written twice in one text (the prompt not counted); 0: no such rule.
    no_repeat_ngram_size: int = field(default_factory=no_repeat_default)
    # No end of text before this many new tokens (the model's end-of-text tokens masked); 0: none.
    min_new_tokens: int = field(default_factory=min_new_tokens_default)
    seed: int | None = None  # sampled without one: the engine draws one
    num_return_sequences: int = 1
    stop: tuple = ()  # stop sequences: the text ends before the first one
    # No product fact that the prompt does not state (inference/fact_guard.py).
    fact_guard: bool = field(default_factory=fact_guard_default)

    def __post_init__(self):
        # A serializer's list of stop sequences: a tuple, so that the parameters stay hashable and unchanged.
        object.__setattr__(self, "stop", tuple(self.stop))
        problems = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, "0 (greedy) or more"),
            ("top_p", 0 < self.top_p <= 1, "above 0 and at most 1"),
            ("top_k", self.top_k >= 0, "0 (off) or more"),
            ("repetition_penalty", self.repetition_penalty > 0, "above 0"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, "0 (off) or more"),
            ("min_new_tokens", self.min_new_tokens >= 0, "0 (off) or more"),
            ("num_return_sequences", self.num_return_sequences >= 1, "at least 1"),
        ]
        for name, ok, wanted in problems:
            if not ok:
                raise ValueError(f"{name} must be {wanted}, not {getattr(self, name)!r}")


def param_default(name):
    """GenerationParams' default for the field ``name``: the request serializers' defaults (and so
    the OpenAPI schema's) are the type's, not copies of them."""
    [found] = [f for f in fields(GenerationParams) if f.name == name]
    return found.default_factory() if found.default is MISSING else found.default

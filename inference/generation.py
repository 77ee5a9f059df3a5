"""Generation from a loaded model version, through its serving engine, with the GenerationParams
(inference/engine/params.py) the request serializers made."""

from dataclasses import dataclass

from django.conf import settings

from inference.engine import EngineClosed


class GenerationTimeout(Exception):
    pass


class QueueTimeout(GenerationTimeout):
    """The time limit passed before the generation left the queue: the server is overloaded
    (a 503 to come back later), not slow at generating (a 504)."""

    def __init__(self, message, *, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class GenerationResult:
    completions: list  # engine.Completion, by index
    prompt_tokens: int
    seed: int | None
    generate_seconds: float


def generation_submit(loaded, prompt_text, params, *, timeout=None):
    """Queue a generation of ``params`` (a GenerationParams) with ``loaded``'s engine, with the fact
    guard (inference/fact_guard.py) when the params ask for it; returns (Generation, prompt tokens).
    Raises engine.PromptTooLong (the engine checks the context), or engine.QueueFull when the
    queue is full."""
    from inference.fact_guard import request_guard
    from inference.loader import model_get

    prompt_ids = loaded.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    banned = request_guard(loaded.tokenizer, prompt_text) if params.fact_guard else None
    while True:
        try:
            generation = loaded.engine.submit(
                prompt_ids=prompt_ids,
                sampling=params,
                n=params.num_return_sequences,
                max_new_tokens=params.max_new_tokens,
                stops=params.stop,
                adapter=loaded.adapter,
                timeout=settings.GENERATE_TIMEOUT_SECONDS if timeout is None else timeout,
                banned=banned,
            )
            return generation, len(prompt_ids)
        except EngineClosed:
            # The cache unloaded these weights between model_get() and here: load them again.
            loaded = model_get(loaded.version)


def generation_collect(generation, prompt_tokens):
    """Wait for every sequence of ``generation``."""
    completions = {}
    for event in generation:
        if event[0] == "done":
            completions[event[1]] = event[2]
    done = max(c.finished_at for c in completions.values())
    return GenerationResult(
        completions=[completions[i] for i in sorted(completions)],
        prompt_tokens=prompt_tokens,
        seed=generation.seed,
        generate_seconds=done - generation.submitted_at,
    )


def generate(loaded, prompt_text, params, *, timeout=None):
    """Generate and wait: the whole result at once."""
    generation, prompt_tokens = generation_submit(loaded, prompt_text, params, timeout=timeout)
    return generation_collect(generation, prompt_tokens)

import logging
import threading
import time
from dataclasses import dataclass

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection

from finetuning import prompts
from finetuning.selectors import active_version_get
from inference.generation import GenerationTimeout, QueueTimeout, generation_collect, generation_submit
from inference.loader import ModelUnavailable, model_get, model_loaded

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """A generation queued for a client: what answers it, the exact prompt and parameters
    (the generation log records them), and how long loading took."""

    version: object
    generation: object
    prompt_tokens: int
    started: float
    load_seconds: float
    prompt: str = ""
    params: object = None


# What a client whose request timed out in the queue is told to wait.
QUEUE_TIMEOUT_RETRY_AFTER_SECONDS = 10

_last_active = None  # the active version as this process last read it
_warming = threading.Lock()
_warm_failures = {}  # (version pk, sha256) -> why the last warm-up could not load it


def active_version_current():
    """The active version, read per request (every web process follows an activation at its
    next request). While the database is unreachable, the version this process last read,
    if it is loaded: generation goes on through a short outage. Raises DatabaseError
    otherwise."""
    global _last_active
    try:
        version = active_version_get()
    except DatabaseError:
        version = _last_active
        if version is None or not model_loaded(version):
            raise
        logger.warning("The database is unreachable: serving the last active version read, %s", version.name)
        return version
    _last_active = version
    return version


def generation_begin(*, params, product=None, prompt=None, messages=None, version=None):
    """Queue a generation for a product (normalised attributes), a free prompt or
    chat messages, with ``version`` (the active one when None, read per request:
    every web process follows an activation at its next request, while requests in
    flight finish on the version they started with). Raises ModelUnavailable,
    PromptTooLong or engine.QueueFull before anything is generated."""
    started = time.monotonic()
    if version is None:
        version = active_version_current()
        if version is None:
            raise ModelUnavailable("no model version is active; run `python manage.py prepare_base_model`")
    loaded = model_get(version)
    load_seconds = time.monotonic() - started
    if product is not None:
        prompt_text = prompts.product_prompt(product)
    elif messages is not None:
        prompt_text = prompts.chat_prompt(messages)
    else:
        prompt_text = prompts.free_prompt(prompt)
    generation, prompt_tokens = generation_submit(loaded, prompt_text, params)
    return Run(
        version=version,
        generation=generation,
        prompt_tokens=prompt_tokens,
        started=started,
        load_seconds=load_seconds,
        prompt=prompt_text,
        params=params,
    )


def _timeout_message():
    return f"the generation did not finish within GENERATE_TIMEOUT_SECONDS ({settings.GENERATE_TIMEOUT_SECONDS:g} s)"


def _summary(run, completions, *, first_token_at, finished_at):
    completion_tokens = sum(c.tokens for c in completions)
    generate_seconds = finished_at - run.generation.submitted_at
    return {
        "model_version": {"id": run.version.pk, "name": run.version.name},
        "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason} for c in completions],
        "usage": {
            "prompt_tokens": run.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": run.prompt_tokens + completion_tokens,
        },
        "seed": run.generation.seed,
        "timings": {
            "load_ms": round(run.load_seconds * 1000, 1),
            "first_token_ms": None if first_token_at is None else round((first_token_at - run.started) * 1000, 1),
            "generate_ms": round(generate_seconds * 1000, 1),
            "total_ms": round((time.monotonic() - run.started) * 1000, 1),
            "tokens_per_second": round(completion_tokens / generate_seconds, 2) if generate_seconds else None,
        },
    }


def run_result(run):
    """Wait for the whole answer; the API's response dict. Raises GenerationTimeout."""
    result = generation_collect(run.generation, run.prompt_tokens)
    if any(c.finish_reason == "timeout" for c in result.completions):
        if not any(c.tokens for c in result.completions):  # never left the queue
            raise QueueTimeout(
                f"the server is overloaded: this request waited GENERATE_TIMEOUT_SECONDS "
                f"({settings.GENERATE_TIMEOUT_SECONDS:g} s) without starting",
                retry_after=QUEUE_TIMEOUT_RETRY_AFTER_SECONDS,
            )
        raise GenerationTimeout(_timeout_message())
    return _summary(
        run,
        result.completions,
        first_token_at=run.generation.first_token_at,
        finished_at=run.generation.submitted_at + result.generate_seconds,
    )


def run_stream(run):
    """A generation's events as they happen: ("chunk", index, text) for each piece
    of text as it becomes final, then ("done", the whole answer as run_result
    gives it) or ("error", GenerationTimeout). Closing the iterator (the client
    went away) cancels the generation, which leaves the batch at its next step."""
    completions = {}
    try:
        for event in run.generation:
            if event[0] == "chunk":
                yield event
                continue
            completion = event[2]
            if completion.finish_reason == "timeout":
                run.generation.cancel()
                yield ("error", GenerationTimeout(_timeout_message()))
                return
            completions[event[1]] = completion
        ordered = [completions[i] for i in sorted(completions)]
        yield (
            "done",
            _summary(
                run,
                ordered,
                first_token_at=run.generation.first_token_at,
                finished_at=max(c.finished_at for c in ordered),
            ),
        )
    finally:
        run.generation.cancel()  # a no-op once every sequence is done


def active_version_warm(*, retry_seconds=None):
    """Load the active version now (a web process starting), so that its first request does
    not wait for the weights. Failures are logged, not raised: the process still serves
    health checks and says why in /api/ready. ``retry_seconds``: while the database is
    unreachable, try again that often (the web starts before its database)."""
    while True:
        try:
            version = active_version_current()
        except DatabaseError:
            logger.warning("The database is unreachable: the active version will load when it is back")
            if retry_seconds is None:
                return None
            close_old_connections()
            time.sleep(retry_seconds)
            continue
        break
    if version is None:
        return None
    key = (version.pk, version.sha256)
    try:
        loaded = model_get(version)
    except ModelUnavailable as exc:
        logger.exception("The active version %s cannot be loaded", version.name)
        _warm_failures[key] = str(exc)
        return None
    _warm_failures.pop(key, None)
    return loaded


def warm_failure(version):
    """Why the last warm-up could not load ``version`` (None: it did not fail)."""
    return _warm_failures.get((version.pk, version.sha256))


def active_version_warm_start(*, retry_seconds=5.0):
    """Warm in a thread: the process answers /api/health (and /api/ready: "loading") meanwhile.
    Returns False when a warm-up is already running."""
    if not _warming.acquire(blocking=False):
        return False

    def warm():
        try:
            active_version_warm(retry_seconds=retry_seconds)
        finally:
            connection.close()  # this thread's own connection
            _warming.release()

    threading.Thread(target=warm, name="genapi-warm", daemon=True).start()
    return True

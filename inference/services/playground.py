"""The admin playground: a version's answer to product attributes, served by the API's own path
(generation_begin, run_stream: the web process's engine) and recorded in the generation log
(route playground, with the curator who asked).

The page sends one request per column, so that a slow or cold model never holds the others;
each answers as a stream of JSON events (the text as it is made, then the whole answer), which
is the page's progress. Requests are checked by the API's GenerateRequestSerializer: the same
limits, defaults and messages as POST /api/generate."""

import dataclasses
import time
from dataclasses import dataclass, field

from rest_framework import serializers

from finetuning import prompts
from finetuning.models import ModelVersion, TrainingExample
from finetuning.selectors import SnapshotError, active_version_get, base_version_get, snapshot_read
from inference.engine import PromptTooLong, QueueFull
from inference.engine.params import GenerationParams
from inference.loader import ModelUnavailable
from inference.models import Generation
from inference.serializers import GenerateRequestSerializer
from inference.services.generation import generation_begin, run_stream
from inference.services.generation_log import generation_record, run_records

# The decoding controls the page shows; the API's other parameters keep their defaults.
DECODING_FIELDS = (
    "max_new_tokens",
    "min_new_tokens",
    "temperature",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "seed",
    "fact_guard",
)
REQUEST_FIELDS = ("product", *DECODING_FIELDS)
# Validation examples offered in the page's list (a snapshot may hold thousands).
EXAMPLES_SHOWN = 200


class PlaygroundInvalid(Exception):
    """The request's fields, each with its messages ({"product.name": [...], "temperature": [...]})."""

    def __init__(self, errors):
        super().__init__("; ".join(f"{name}: {' '.join(messages)}" for name, messages in errors.items()))
        self.errors = errors


class PlaygroundUnavailable(Exception):
    """Nothing was generated: the model cannot load, or the queue is full."""

    def __init__(self, message, *, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Column:
    """One version of the side-by-side view, with every role it plays ("this version", "active", "base")."""

    version: ModelVersion
    roles: list = field(default_factory=list)


@dataclass(frozen=True)
class PlaygroundRequest:
    product: dict  # normalised attributes, as the API's ProductSerializer leaves them
    params: GenerationParams


# --- Reads -----------------------------------------------------------------------------------


def playground_columns(*, version):
    """This version, the active one and the base model ``version`` was made from, in that order;
    a version playing two roles is one column naming both."""
    base = base_version_get(base_model=version.base_model)
    columns = []
    for role, candidate in (("this version", version), ("active", active_version_get()), ("base", base)):
        if candidate is None:
            continue
        same = next((column for column in columns if column.version.pk == candidate.pk), None)
        if same is None:
            columns.append(Column(version=candidate, roles=[role]))
        else:
            same.roles.append(role)
    return columns


def playground_examples(*, version, limit=EXAMPLES_SHOWN):
    """(examples, note): the validation examples of the snapshot ``version`` was trained on
    ([{id, name, attributes, description}], at most ``limit``), and why there are none or
    not all of them (blank when the list is whole)."""
    if version.snapshot is None:
        return [], f"{version.name} was not trained here, so it has no validation examples"
    try:
        _, validation = snapshot_read(version.snapshot)
    except SnapshotError as exc:
        return [], str(exc)
    examples = [
        {
            "id": row["id"],
            "name": row["attributes"].get("name") or f"example {row['id']}",
            "attributes": row["attributes"],
            "description": row["description"],
        }
        for row in validation[:limit]
    ]
    if not validation:
        return [], f"its data snapshot has no validation examples ({version.snapshot.note})"
    if len(validation) > limit:
        return examples, f"the first {limit} of {len(validation)} validation examples"
    return examples, ""


def playground_example_get(*, pk):
    """A training example as the page fills its form with it; None if absent."""
    example = TrainingExample.objects.select_related("dataset").filter(pk=pk).first()
    if example is None:
        return None
    return {
        "id": example.pk,
        "name": example.name or f"example {example.pk}",
        "dataset": example.dataset.name,
        "attributes": example.attributes,
        "description": example.description,
    }


def decoding_controls():
    """The decoding fields of the API's request serializer, with their defaults and bounds,
    for the page's inputs: one source for the API and the playground."""
    fields = GenerateRequestSerializer().fields
    controls = []
    for name in DECODING_FIELDS:
        serializer_field = fields[name]
        boolean = isinstance(serializer_field, serializers.BooleanField)  # a checkbox; the others are numbers
        integer = isinstance(serializer_field, serializers.IntegerField)
        controls.append(
            {
                "name": name,
                "label": name.replace("_", " "),
                "default": serializer_field.default,
                "min": None if boolean else serializer_field.min_value,
                "max": None if boolean else serializer_field.max_value,
                "step": 1 if integer else 0.01,
                "integer": integer,
                "boolean": boolean,
                "help": str(serializer_field.help_text or ""),
            }
        )
    return controls


# --- Generating ---------------------------------------------------------------------------


def _flatten(detail, prefix=""):
    """DRF's nested errors as {"product.name": ["..."], "temperature": ["..."]}."""
    if isinstance(detail, dict):
        flat = {}
        for key, value in detail.items():
            name = prefix if key == "non_field_errors" and prefix else f"{prefix}.{key}".lstrip(".")
            for inner, messages in _flatten(value, name).items():
                flat.setdefault(inner, []).extend(messages)
        return flat
    if isinstance(detail, list) and detail and all(isinstance(item, dict | list) for item in detail):
        flat = {}
        for index, item in enumerate(detail):
            flat.update(_flatten(item, f"{prefix}.{index}"))
        return flat
    return {prefix or "request": [str(item) for item in (detail if isinstance(detail, list) else [detail])]}


def playground_request_parse(*, data):
    """A PlaygroundRequest from the page's JSON body ({product, max_new_tokens, temperature,
    top_p, repetition_penalty, seed}), validated by the API's serializer. Raises
    PlaygroundInvalid naming each field."""
    if not isinstance(data, dict):
        raise PlaygroundInvalid({"request": ["must be a JSON object"]})
    errors = {name: ["not a playground field"] for name in data if name not in REQUEST_FIELDS}
    serializer = GenerateRequestSerializer(data={"product": {}, **{k: v for k, v in data.items() if k not in errors}})
    if not serializer.is_valid():
        errors.update(_flatten(serializer.errors))
    if errors:
        raise PlaygroundInvalid(errors)
    values = serializer.validated_data
    # One sequence, no stop sequences: the page sends neither (REQUEST_FIELDS), so the API's defaults.
    return PlaygroundRequest(product=values["product"], params=values["params"])


def _failure_record(*, version, request, user, error, started):
    """A playground request that generated nothing is in the log too: a curator sees why."""
    generation_record(
        route=Generation.Route.PLAYGROUND,
        version=version,
        input={"product": request.product},
        prompt=prompts.product_prompt(request.product),
        output="",
        parameters={**dataclasses.asdict(request.params), "stop": list(request.params.stop)},
        finish_reason="error",
        prompt_tokens=0,
        completion_tokens=0,
        timings={"total_ms": round((time.monotonic() - started) * 1000, 1)},
        user=user,
        error=error,
    )


def playground_begin(*, version, request, user):
    """Queue ``request`` on ``version``'s engine (loading it first if need be). Raises
    PlaygroundInvalid (a prompt over the context), PlaygroundUnavailable (cannot load, queue
    full), each recorded in the generation log."""
    started = time.monotonic()
    try:
        return generation_begin(params=request.params, product=request.product, version=version)
    except PromptTooLong as exc:
        _failure_record(version=version, request=request, user=user, error=str(exc), started=started)
        raise PlaygroundInvalid({"max_new_tokens": [str(exc)]}) from exc
    except ModelUnavailable as exc:
        _failure_record(version=version, request=request, user=user, error=str(exc), started=started)
        raise PlaygroundUnavailable(str(exc)) from exc
    except QueueFull as exc:
        message = f"the server is busy: {exc}"
        _failure_record(version=version, request=request, user=user, error=message, started=started)
        raise PlaygroundUnavailable(message, retry_after=exc.retry_after) from exc


def _record(*, run, request, user, result=None, error=""):
    [record] = run_records(
        route=Generation.Route.PLAYGROUND,
        run=run,
        input={"product": request.product},
        result=result,
        error=error,
        user=user,
    )
    return generation_record(**record)


STOPPED = "stopped: the page left before the end"


class PlaygroundEvents:
    """The events of a queued run, as the page reads them: {"started": {prompt_tokens, load_ms}}
    at once, {"chunk": text, "tokens": made so far} as text becomes final, then {"done": answer} (text, finish reason, usage, timings, the
    log row's id) or {"error": why, "generation_id"} (the time limit passed). Recorded in the
    generation log when it ends; ``close()`` before then (the page left, or its Stop button)
    stops the generation and records what was made, also when no event was read yet (a
    generator closed before its start would run no cleanup)."""

    def __init__(self, *, run, request, user):
        self.run, self.request, self.user = run, request, user
        self.recorded = False
        self._events = self._iterate()

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._events)

    def close(self):
        self._events.close()
        self._stop()

    def _stop(self):
        if not self.recorded:
            self.recorded = True
            self.run.generation.cancel()
            _record(run=self.run, request=self.request, user=self.user, error=STOPPED)

    def _iterate(self):
        run = self.run
        try:
            # At once: the page learns that the model is loaded and the request queued (the
            # first text may take a while on a busy engine).
            yield {"started": {"prompt_tokens": run.prompt_tokens, "load_ms": round(run.load_seconds * 1000, 1)}}
            for event in run_stream(run):
                if event[0] == "chunk":
                    yield {"chunk": event[2], "tokens": run.generation.completion_tokens()}
                    continue
                if event[0] == "done":
                    answer = event[1]
                    row = _record(run=run, request=self.request, user=self.user, result=answer)
                    self.recorded = True
                    [choice] = answer["choices"]
                    yield {
                        "done": {
                            "text": choice["text"],
                            "finish_reason": choice["finish_reason"],
                            "usage": answer["usage"],
                            "seed": answer["seed"],
                            "timings": answer["timings"],
                            "generation_id": row.pk if row else None,
                        }
                    }
                    continue
                if run.generation.completion_tokens():
                    error = str(event[1])
                else:  # never left the queue: the server is busy, not this model slow
                    waited = time.monotonic() - run.started
                    error = f"the server is busy: this request waited {waited:.0f} s in the queue without starting"
                row = _record(run=run, request=self.request, user=self.user, error=error)
                self.recorded = True
                yield {"error": error, "generation_id": row.pk if row else None}
        finally:
            self._stop()  # a no-op once recorded


def playground_events(*, run, request, user):
    return PlaygroundEvents(run=run, request=request, user=user)

"""The pre-flight of a fine-tuning job: what it would train on, and for how long,
before it is queued.

The examples are split as a snapshot would split them and tokenized by the
training code's own ``encode`` with the base model's tokenizer, so the skipped and
truncated counts shown are the ones the job will record. Nothing is written.
"""

import functools
import math
import statistics
from dataclasses import dataclass, replace

from django.conf import settings

from finetuning import store
from finetuning.models import FineTuningJob
from finetuning.selectors import trainable_examples
from finetuning.services.jobs import training_pairs
from finetuning.services.snapshots import split_examples
from finetuning.training import encode, planned_steps

# Jobs whose measured speed the estimate uses: the newest few, so that a change of
# worker or of library versions shows within a few jobs.
SPEED_JOBS = 5
# A job's speed, best measure first: every token its steps processed; else, for jobs trained
# before that was recorded, description tokens only, which overstates the speed of a run whose
# descriptions are cut short (its prompts still cost the same).
SPEED_MEASURES = {"tokens_per_second": "tokens", "target_tokens_per_second": "description tokens"}
# The share of examples the "fit at" length is given for, next to "all".
MOST_SHARE = 0.95


@dataclass(frozen=True)
class Estimate:
    seconds: float | None  # None: nothing measured yet
    basis: str  # what it was measured on, or why there is no estimate


@dataclass(frozen=True)
class Preflight:
    dataset_name: str
    method: str
    max_seq_length: int
    train_examples: int
    validation_examples: int
    # Token counts need the base model's tokenizer; problem says why they are missing.
    problem: str = ""
    prompt_tokens: int = 0
    description_tokens: int = 0
    trained_description_tokens: int = 0  # per pass, after truncation
    skipped_train: int = 0
    skipped_validation: int = 0
    truncated_train: int = 0
    truncated_validation: int = 0
    longest: int = 0  # the max_seq_length at which every example fits whole
    most: int = 0  # ... at which MOST_SHARE of them do
    longest_prompt: int = 0
    steps: int = 0
    estimate: Estimate | None = None
    max_skipped_share: float = 0.0

    @property
    def examples(self):
        return self.train_examples + self.validation_examples

    @property
    def tokenized(self):
        return not self.problem

    @property
    def skipped(self):
        return self.skipped_train + self.skipped_validation

    @property
    def truncated(self):
        return self.truncated_train + self.truncated_validation

    @property
    def kept(self):
        return self.examples - self.skipped

    @property
    def skipped_share(self):
        return self.skipped / self.examples if self.examples else 0.0

    @property
    def trains_nothing(self):
        return self.tokenized and self.train_examples - self.skipped_train == 0

    @property
    def needs_confirmation(self):
        """Too many examples would be skipped to start without the curator saying so."""
        return self.tokenized and not self.trains_nothing and self.skipped_share > self.max_skipped_share

    @property
    def skipped_percent(self):
        return _percent(self.skipped_share)

    @property
    def max_skipped_percent(self):
        return _percent(self.max_skipped_share)

    @property
    def most_percent(self):
        return round(MOST_SHARE * 100)


def _percent(share):
    """A share as a percentage a reader can compare: "12%", "0.6%" (never "0%" for some)."""
    percent = share * 100
    if 0 < percent < 0.1:
        return "under 0.1%"
    return f"{percent:.0f}%" if percent >= 10 or percent == 0 else f"{percent:.1f}%".replace(".0%", "%")


@functools.lru_cache(maxsize=4)
def _tokenizer(directory, sha256):
    """The prepared base model's tokenizer, loaded once per process (and again only when
    the base model is prepared anew: ``sha256`` is part of the key). Never the weights."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def base_tokenizer_get(*, base_model):
    """The tokenizer training will use for ``base_model``, or None when it is not prepared."""
    directory = store.local(store.base_relpath(base_model))
    if not (directory / store.MANIFEST).is_file():
        return None
    return _tokenizer(str(directory), store.manifest_read(directory)["sha256"])


def _fit_length(needed, share):
    """The smallest max_seq_length at which ``share`` of the examples fit whole."""
    ordered = sorted(needed)
    return ordered[max(math.ceil(share * len(ordered)) - 1, 0)]


def preflight_check(*, dataset, hp):
    """What a job on ``dataset`` with ``hp`` would train on, as the job would see it."""
    rows = list(trainable_examples(dataset=dataset))
    train_rows, validation_rows = split_examples(rows)
    common = {
        "dataset_name": dataset.name,
        "method": hp.method,
        "max_seq_length": hp.max_seq_length,
        "train_examples": len(train_rows),
        "validation_examples": len(validation_rows),
        "max_skipped_share": settings.PREFLIGHT_MAX_SKIPPED_SHARE,
    }
    base_model = settings.BASE_MODEL_NAME
    tokenizer = base_tokenizer_get(base_model=base_model)
    if tokenizer is None:
        return Preflight(
            **common,
            problem=f"base model {base_model} is not prepared, so its tokenizer cannot count tokens; "
            "run `python manage.py prepare_base_model`",
        )
    if not rows:
        return Preflight(**common, problem=f"dataset {dataset.name} has no examples to train on")

    # The pairs the job builds from its snapshot, encoded as training encodes them.
    train_pairs, validation_pairs = training_pairs(train_rows=train_rows, validation_rows=validation_rows, hp=hp)
    train = encode(tokenizer, train_pairs, hp.max_seq_length)
    validation = encode(tokenizer, validation_pairs, hp.max_seq_length)
    needed = train.needed_lengths + validation.needed_lengths
    kept_train = len(train.items)
    if kept_train:
        steps = planned_steps(kept_train, hp)
        estimate = _estimate(
            hp=hp,
            base_model=base_model,
            steps=steps,
            kept_train=kept_train,
            per_epoch={"tokens_per_second": train.input_tokens, "target_tokens_per_second": train.target_tokens},
        )
    else:
        steps, estimate = 0, Estimate(None, "nothing would train")
    return Preflight(
        **common,
        prompt_tokens=sum(train.prompt_lengths) + sum(validation.prompt_lengths),
        description_tokens=sum(train.completion_lengths) + sum(validation.completion_lengths),
        trained_description_tokens=train.target_tokens,
        skipped_train=train.skipped,
        skipped_validation=validation.skipped,
        truncated_train=train.truncated,
        truncated_validation=validation.truncated,
        longest=max(needed),
        most=_fit_length(needed, MOST_SHARE),
        longest_prompt=max(train.prompt_lengths + validation.prompt_lengths),
        steps=steps,
        estimate=estimate,
    )


def _measured_jobs(*, method, base_model, measure):
    """The newest succeeded jobs of this method on this base model that recorded ``measure``."""
    jobs = FineTuningJob.objects.filter(
        status=FineTuningJob.Status.SUCCEEDED,
        base_model=base_model,
        hyperparameters__method=method,
        metrics__has_key=measure,
    ).order_by("-finished_at")
    return [job for job in jobs[: SPEED_JOBS * 4] if job.metrics.get(measure)][:SPEED_JOBS]


def _estimate(*, hp, base_model, steps, kept_train, per_epoch):
    """Seconds of training from this worker's measured speed; ``per_epoch``: tokens of one pass
    over the kept training examples, in each of SPEED_MEASURES."""
    for measure in SPEED_MEASURES:
        jobs = _measured_jobs(method=hp.method, base_model=base_model, measure=measure)
        if jobs:
            break
    else:
        return Estimate(
            None,
            f"no estimate yet: no {hp.method} job on {base_model} has finished here, so this worker's speed "
            "is not measured",
        )
    speed = statistics.median(job.metrics[measure] for job in jobs)
    # Loading, the last validation pass and saving: whatever the job took besides its training loop.
    overhead = statistics.median(
        max((job.wall_seconds or job.metrics.get("seconds") or 0) - job.metrics.get("train_seconds", 0), 0)
        for job in jobs
    )
    steps_per_epoch = planned_steps(kept_train, replace(hp, epochs=1, max_steps=0))
    planned_tokens = per_epoch[measure] * steps / steps_per_epoch
    devices = sorted({job.environment.get("device_name") or job.environment.get("device", "") for job in jobs} - {""})
    where = f"{base_model}; job{'s' if len(jobs) > 1 else ''} {', '.join(str(job.pk) for job in jobs)}"
    where += f" on {', '.join(devices)}" if devices else ""
    measured = (
        f"the speed of the last {hp.method} job"
        if len(jobs) == 1
        else f"the median of the last {len(jobs)} {hp.method} jobs"
    )
    basis = f"at {speed:,.0f} {SPEED_MEASURES[measure]}/s, {measured} ({where})"
    return Estimate(planned_tokens / speed + overhead, basis)


def preflight_refusal(preflight, *, confirmed_examples=None):
    """Why a job may not start as set (None when it may). Past the skipped share it
    starts only when the curator confirmed training on exactly the examples now kept."""
    if preflight.trains_nothing:
        return (
            f"Not one of the {preflight.train_examples} training examples fits in max_seq_length "
            f"{preflight.max_seq_length}: their prompts alone need up to {preflight.longest_prompt} tokens. "
            f"Raise max_seq_length (all fit at {preflight.longest})."
        )
    if preflight.needs_confirmation and confirmed_examples != preflight.kept:
        return (
            f"{preflight.skipped} of {preflight.examples} examples ({preflight.skipped_percent}) would be skipped at "
            f"max_seq_length {preflight.max_seq_length}: none of their description fits after the prompt "
            f"(more than {preflight.max_skipped_percent} is not started without a confirmation). "
            f"Raise max_seq_length (all fit at {preflight.longest}, {preflight.most_percent}% at {preflight.most}), "
            f'or tick "Train anyway on {preflight.kept} of {preflight.examples} examples".'
        )
    return None


def duration_text(seconds):
    """Seconds as a curator reads a duration: "about 40 s", "about 12 min", "about 1 h 20 min"."""
    seconds = round(seconds)
    if seconds < 90:
        return f"about {max(seconds, 1)} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"about {minutes} min"
    return f"about {minutes // 60} h {minutes % 60:02d} min"

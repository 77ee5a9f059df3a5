"""The fine-tuning loop: plain torch, no Django.

Loss is computed on the description tokens only (prompt tokens are masked),
and batches are grouped by length so that little compute goes to padding.
"""

import logging
import math
import random
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# A label at or below UNLIKELY marks a token that training makes unlikely at that position
# (unlikelihood, Welleck et al. 2019): the token id is UNLIKELY - label.
UNLIKELY = -(1 << 20)


class TrainingCancelled(Exception):
    pass


@dataclass
class TrainingResult:
    steps: int
    train_examples: int
    validation_examples: int
    skipped_examples: int
    final_train_loss: float
    validation_loss: float | None
    truncated_examples: int = 0
    loss_history: list = field(default_factory=list)
    validation_history: list = field(default_factory=list)
    real_tokens: int = 0
    padded_tokens: int = 0
    target_tokens: int = 0
    computed_tokens: int = 0  # real tokens less the shared prefixes computed once per batch
    seconds: float = 0.0
    train_seconds: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"

    def metrics(self):
        return {
            "steps": self.steps,
            "train_examples": self.train_examples,
            "validation_examples": self.validation_examples,
            "skipped_examples": self.skipped_examples,
            "truncated_examples": self.truncated_examples,
            "final_train_loss": self.final_train_loss,
            "validation_loss": self.validation_loss,
            "validation_perplexity": math.exp(self.validation_loss) if self.validation_loss is not None else None,
            "loss_history": self.loss_history,
            "validation_history": self.validation_history,
            "padding_share": self.padding_share,
            "target_tokens": self.target_tokens,
            "target_tokens_per_second": self.target_tokens / self.train_seconds if self.train_seconds else None,
            # Every token the steps processed, prompts included: what the fine-tune form's estimate scales by.
            "real_tokens": self.real_tokens,
            "tokens_per_second": self.real_tokens / self.train_seconds if self.train_seconds else None,
            "seconds": round(self.seconds, 2),
            "train_seconds": round(self.train_seconds, 2),
            "device": self.device,
            "precision": self.precision,
        }

    @property
    def padding_share(self):
        return 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


@dataclass
class Encoded:
    """(prompt, completion) pairs as training sees them at one ``max_length``: the rows
    that train, and what became of every example. The fine-tune form's pre-flight
    reads the same object, so the counts it shows are the ones training gets."""

    items: list  # (input_ids, labels) of the examples that train, in the order given
    prompt_lengths: list  # tokens of every example's prompt, kept or not
    completion_lengths: list  # tokens of every example's completion (description and end marker)
    max_length: int
    skipped: int = 0  # nothing of the completion fits after the prompt: not trained on
    truncated: int = 0  # trained on, with the completion cut short

    @property
    def needed_lengths(self):
        """The max_length at which each example would fit whole."""
        return [p + c for p, c in zip(self.prompt_lengths, self.completion_lengths, strict=True)]

    @property
    def input_tokens(self):
        """Tokens the kept examples put through the model, once per pass over them."""
        return sum(len(input_ids) for input_ids, _ in self.items)

    @property
    def target_tokens(self):
        """Completion tokens that train, once per pass over the examples."""
        return sum(
            min(c, self.max_length - p)
            for p, c in zip(self.prompt_lengths, self.completion_lengths, strict=True)
            if p < self.max_length
        )


def fit(prompt_ids, completion_ids, max_length, completion_labels=None):
    """(input_ids, labels) of one example cut to ``max_length``, prompt tokens masked;
    None when not one completion token fits."""
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + (completion_labels or completion_ids))[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return input_ids, labels


def completion_labels(ids, offsets, spans, invented_facts):
    """The labels of a completion's tokens ``ids`` (character ``offsets``) whose ``spans`` state
    an invented fact: "skip" masks every token that overlaps a span; "avoid" marks the first of
    them unlikely and masks the rest."""
    labels = list(ids)
    for start, end in spans:
        inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
        for n, i in enumerate(inside):
            labels[i] = UNLIKELY - ids[i] if invented_facts == "avoid" and n == 0 else IGNORE_INDEX
    return labels


def encode(tokenizer, pairs, max_length, invented_facts="learn"):
    """(prompt, completion) pairs -> Encoded; examples whose completion does not fit
    at all are dropped (``skipped``), those cut short are counted (``truncated``). A pair may
    carry a third item, the character spans of its completion that state an invented fact,
    which ``invented_facts`` ("skip" or "avoid", the recipe setting) labels."""
    pairs = list(pairs)
    if not pairs:
        return Encoded(items=[], prompt_lengths=[], completion_lengths=[], max_length=max_length)
    # One call per side: a fast tokenizer encodes a list in parallel, with the same ids as one by one.
    prompts = tokenizer([pair[0] for pair in pairs], add_special_tokens=False)["input_ids"]
    spans = [pair[2] if len(pair) > 2 else [] for pair in pairs]
    marked = invented_facts != "learn" and any(spans)
    tokenized = tokenizer([pair[1] for pair in pairs], add_special_tokens=False, return_offsets_mapping=marked)
    completions = tokenized["input_ids"]
    labels = (
        [completion_labels(ids, offsets, s, invented_facts)
         for ids, offsets, s in zip(completions, tokenized["offset_mapping"], spans, strict=True)]
        if marked else [None] * len(pairs)
    )  # fmt: skip
    encoded = Encoded(
        items=[],
        prompt_lengths=[len(ids) for ids in prompts],
        completion_lengths=[len(ids) for ids in completions],
        max_length=max_length,
    )
    for prompt_ids, completion_ids, completion_labels_ in zip(prompts, completions, labels, strict=True):
        item = fit(prompt_ids, completion_ids, max_length, completion_labels_)
        if item is None:
            encoded.skipped += 1
            continue
        if len(prompt_ids) + len(completion_ids) > max_length:
            encoded.truncated += 1
        encoded.items.append(item)
    return encoded


def length_grouped_batches(lengths, batch_size, rng):
    """Shuffle, then sort within windows of 50 batches so neighbours have similar
    lengths; batch order is shuffled again so training still sees a mix."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(items, pad_id):
    import torch

    longest = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(items), longest), dtype=torch.long)
    for row, (ids, labs) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention[row, : len(ids)] = 1
    return input_ids, attention, labels


def _causal_parts(model):
    """(decoder stack, output head) of a causal LM, whether or not PEFT wraps it."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal.get_decoder(), causal.get_output_embeddings()


def shared_prefix_length(items):
    """How many leading tokens every row of a batch has in common, stopping
    before the first position that predicts a target token (those need their
    own hidden state) and leaving every row at least one token of its own."""
    limit = min(len(ids) for ids, _ in items) - 1
    for _, labels in items:
        first_target = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        limit = min(limit, first_target - 1)
    first = items[0][0]
    length = 0
    while length < limit and all(ids[length] == first[length] for ids, _ in items):
        length += 1
    return max(length, 0)


def summed_target_loss(model, input_ids, attention, labels, device, prefix_length=0):
    """Cross-entropy summed over the unmasked (description) tokens of a batch.

    Two kinds of work are skipped, with the same result:
    - the prompt's opening (system message, instruction) is the same in every
      row, so it runs through the decoder once and its keys and values are
      shared by the batch; gradients from every row flow back into it (with
      LoRA dropout on, those shared positions get one dropout mask per batch
      instead of one per row: the same expected loss, slightly less noise);
    - the output head (576 x 49k for SmolLM2, a fifth of the model's compute)
      runs only on positions that predict a target token, never on prompt or
      padding positions.
    """
    import torch

    decoder, head = _causal_parts(model)
    input_ids, attention, labels = input_ids.to(device), attention.to(device), labels.to(device)
    if prefix_length:
        cache = decoder(input_ids=input_ids[:1, :prefix_length], use_cache=True).cache
        for layer in cache.layers:
            layer.keys = layer.keys.expand(input_ids.size(0), -1, -1, -1)
            layer.values = layer.values.expand(input_ids.size(0), -1, -1, -1)
        hidden = decoder(
            input_ids=input_ids[:, prefix_length:], attention_mask=attention, cache=cache, use_cache=True
        ).last_hidden_state
    else:
        hidden = decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
    # hidden[:, i] predicts the token after position prefix_length + i.
    targets = labels[:, prefix_length + 1 :]
    keep = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep]).float()
    targets = targets[keep]
    unlikely = targets <= UNLIKELY
    if not unlikely.any():
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    likely = ~unlikely
    loss = torch.nn.functional.cross_entropy(logits[likely], targets[likely], reduction="sum")
    # -log(1 - p(token)): log-sum-exp over every token less the same over every token but it.
    avoided = logits[unlikely]
    token = (UNLIKELY - targets[unlikely]).unsqueeze(1)
    others = avoided.scatter(1, token, float("-inf"))
    return loss + (avoided.logsumexp(1) - others.logsumexp(1)).sum()


def _evaluate(model, encoded, batch_size, pad_id, device, autocast):
    import torch

    if not encoded:
        return None
    model.eval()
    total_loss, total_tokens = 0.0, 0
    ordered = sorted(encoded, key=lambda item: len(item[0]))
    with torch.no_grad(), autocast():
        for start in range(0, len(ordered), batch_size):
            items = ordered[start : start + batch_size]
            input_ids, attention, labels = collate(items, pad_id)
            prefix = shared_prefix_length(items)
            total_loss += summed_target_loss(model, input_ids, attention, labels, device, prefix).item()
            total_tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
    model.train()
    return total_loss / max(total_tokens, 1)


def _device_and_autocast():
    """CUDA with bf16 autocast where the card supports it, else fp32 on the CPU."""
    import contextlib
    import functools

    import torch

    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "cuda", "bf16", functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
        return "cuda", "fp32", contextlib.nullcontext
    return "cpu", "fp32", contextlib.nullcontext


def runtime_environment():
    """Where and with what a job trains, recorded on the job and its version."""
    import platform
    import socket

    import peft
    import torch
    import transformers

    device, precision, _ = _device_and_autocast()
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "precision": precision,
        "torch_threads": torch.get_num_threads(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def dropout_module(p):
    """``nn.Dropout(p)`` for LoRA inputs on the CPU, with its mask drawn as
    16-bit integers (p rounded to 1/32768) instead of by torch's Bernoulli
    sampler: measured here, PEFT's dropout masks took 15% of a LoRA step on
    SmolLM2 (420 draws per step), and these cost a half to a third of that."""
    import torch

    class IntegerMaskDropout(torch.nn.Module):
        def __init__(self, p):
            super().__init__()
            self.p = p
            self.threshold = round(p * 32768)

        def forward(self, x):
            if not self.training or not self.threshold:
                return x
            # random_() on int16 is uniform over 0..32767.
            dropped = torch.empty(x.shape, dtype=torch.int16, device=x.device).random_() < self.threshold
            return (x * (1 / (1 - self.p))).masked_fill_(dropped, 0.0)

        def extra_repr(self):
            return f"p={self.p}"

    return IntegerMaskDropout(p)


def lora_config(hp):
    from peft import LoraConfig

    return LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=list(hp.lora_target_modules),
        task_type="CAUSAL_LM",
    )


def _load_model(base_dir, hp, device):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True, dtype=torch.float32).to(device)
    if hp.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(hp))
        if device == "cpu" and hp.lora_dropout:
            for module in model.modules():
                dropouts = getattr(module, "lora_dropout", None)
                if isinstance(dropouts, torch.nn.ModuleDict):
                    for name in list(dropouts):
                        dropouts[name] = dropout_module(hp.lora_dropout)
    model.train()
    return model


def planned_steps(train_examples, hp):
    """Optimiser steps a run over ``train_examples`` examples will take."""
    steps_per_epoch = math.ceil(math.ceil(train_examples / hp.batch_size) / hp.gradient_accumulation_steps)
    total = steps_per_epoch * hp.epochs
    return min(total, hp.max_steps) if hp.max_steps else total


def train(*, base_dir, train_pairs, validation_pairs, hp, output_dir, on_step=None, on_evaluate=None):
    """Fine-tune the checkpoint in ``base_dir`` and save the result in
    ``output_dir``. ``on_step(step, total, loss)`` is called after every
    optimiser step and may raise TrainingCancelled; ``on_evaluate(step, loss)``
    after every validation pass (every ``hp.eval_steps`` steps, or at the end
    of each epoch, and at the end)."""
    import torch
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    started = time.monotonic()
    random.seed(hp.seed)
    torch.manual_seed(hp.seed)
    device, precision, autocast = _device_and_autocast()

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = _load_model(base_dir, hp, device)

    train_encoded = encode(tokenizer, train_pairs, hp.max_seq_length, hp.invented_facts)
    validation_encoded = encode(tokenizer, validation_pairs, hp.max_seq_length)
    train_set, validation_set = train_encoded.items, validation_encoded.items
    if not train_set:
        raise ValueError("no training example fits in max_seq_length tokens")

    rng = random.Random(hp.seed)
    lengths = [len(ids) for ids, _ in train_set]
    total = planned_steps(len(train_set), hp)

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * hp.warmup_ratio), total)

    step, history, validations = 0, [], []
    real_tokens = padded_tokens = target_tokens = computed_tokens = 0
    last_loss = float("nan")

    def validate():
        if validation_set and (not validations or validations[-1][0] != step):
            loss = _evaluate(model, validation_set, hp.batch_size, pad_id, device, autocast)
            validations.append([step, loss])
            if on_evaluate:
                on_evaluate(step, loss)

    loop_started = time.monotonic()
    while step < total:
        batches = length_grouped_batches(lengths, hp.batch_size, rng)
        for first in range(0, len(batches), hp.gradient_accumulation_steps):
            group = batches[first : first + hp.gradient_accumulation_steps]
            group_targets = sum(
                sum(1 for label in train_set[i][1][1:] if label != IGNORE_INDEX) for batch in group for i in batch
            )
            step_loss = 0.0
            for batch in group:
                items = [train_set[i] for i in batch]
                input_ids, attention, labels = collate(items, pad_id)
                prefix = shared_prefix_length(items)
                real_tokens += int(attention.sum())
                padded_tokens += attention.numel()
                computed_tokens += int(attention.sum()) - prefix * (len(items) - 1)
                with autocast():
                    # Summed over the group's target tokens, divided once: every token counts the same.
                    loss = summed_target_loss(model, input_ids, attention, labels, device, prefix)
                    loss = loss / max(group_targets, 1)
                loss.backward()
                step_loss += loss.item()
            target_tokens += group_targets
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = step_loss
            history.append([step, round(step_loss, 5)])
            if on_step:
                on_step(step, total, step_loss)
            if hp.eval_steps and step % hp.eval_steps == 0:
                validate()
            if step >= total:
                break
        if not hp.eval_steps:
            validate()  # at the end of each epoch
    train_seconds = time.monotonic() - loop_started
    validate()

    model.save_pretrained(output_dir, safe_serialization=True)
    if hp.method == "full":
        tokenizer.save_pretrained(output_dir)
    return TrainingResult(
        steps=step,
        train_examples=len(train_set),
        validation_examples=len(validation_set),
        skipped_examples=train_encoded.skipped + validation_encoded.skipped,
        truncated_examples=train_encoded.truncated + validation_encoded.truncated,
        final_train_loss=last_loss,
        validation_loss=validations[-1][1] if validations else None,
        loss_history=history,
        validation_history=validations,
        real_tokens=real_tokens,
        padded_tokens=padded_tokens,
        target_tokens=target_tokens,
        computed_tokens=computed_tokens,
        seconds=time.monotonic() - started,
        train_seconds=train_seconds,
        device=device,
        precision=precision,
    )

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
    loss_history: list = field(default_factory=list)
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    device: str = "cpu"

    def metrics(self):
        return {
            "steps": self.steps,
            "train_examples": self.train_examples,
            "validation_examples": self.validation_examples,
            "skipped_examples": self.skipped_examples,
            "final_train_loss": self.final_train_loss,
            "validation_loss": self.validation_loss,
            "validation_perplexity": math.exp(self.validation_loss) if self.validation_loss is not None else None,
            "loss_history": self.loss_history,
            "padding_share": 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0,
            "seconds": round(self.seconds, 2),
            "device": self.device,
        }


def encode(tokenizer, pairs, max_length):
    """(prompt, completion) pairs -> list of (input_ids, labels); prompt tokens
    are masked. Examples whose completion does not fit at all are dropped."""
    encoded, skipped = [], 0
    for prompt, completion in pairs:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        input_ids = (prompt_ids + completion_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            skipped += 1
            continue
        encoded.append((input_ids, labels))
    return encoded, skipped


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


def summed_target_loss(model, input_ids, attention, labels, device):
    """Cross-entropy summed over the unmasked (description) tokens of a batch."""
    import torch

    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1).to(device)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _evaluate(model, encoded, batch_size, pad_id, device):
    import torch

    if not encoded:
        return None
    model.eval()
    total_loss, total_tokens = 0.0, 0
    ordered = sorted(encoded, key=lambda item: len(item[0]))
    with torch.no_grad():
        for start in range(0, len(ordered), batch_size):
            input_ids, attention, labels = collate(ordered[start : start + batch_size], pad_id)
            total_loss += summed_target_loss(model, input_ids, attention, labels, device).item()
            total_tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
    model.train()
    return total_loss / max(total_tokens, 1)


def train(*, base_dir, train_pairs, validation_pairs, hp, output_dir, on_step=None):
    """Fine-tune the checkpoint in ``base_dir`` and save the result in
    ``output_dir``. ``on_step(step, total, loss)`` is called after every
    optimiser step and may raise TrainingCancelled."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    started = time.monotonic()
    random.seed(hp.seed)
    torch.manual_seed(hp.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True, dtype=torch.float32).to(device)
    if hp.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=hp.lora_r,
                lora_alpha=hp.lora_alpha,
                lora_dropout=hp.lora_dropout,
                target_modules=list(hp.lora_target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    model.train()

    train_set, skipped = encode(tokenizer, train_pairs, hp.max_seq_length)
    validation_set, skipped_validation = encode(tokenizer, validation_pairs, hp.max_seq_length)
    if not train_set:
        raise ValueError("no training example fits in max_seq_length tokens")

    rng = random.Random(hp.seed)
    lengths = [len(ids) for ids, _ in train_set]
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / hp.batch_size) / hp.gradient_accumulation_steps)
    total = steps_per_epoch * hp.epochs
    if hp.max_steps:
        total = min(total, hp.max_steps)

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * hp.warmup_ratio), total)

    step, history, real_tokens, padded_tokens = 0, [], 0, 0
    last_loss = float("nan")
    while step < total:
        batches = length_grouped_batches(lengths, hp.batch_size, rng)
        for first in range(0, len(batches), hp.gradient_accumulation_steps):
            group = batches[first : first + hp.gradient_accumulation_steps]
            target_tokens = sum(
                sum(1 for label in train_set[i][1][1:] if label != IGNORE_INDEX) for batch in group for i in batch
            )
            step_loss = 0.0
            for batch in group:
                input_ids, attention, labels = collate([train_set[i] for i in batch], pad_id)
                real_tokens += int(attention.sum())
                padded_tokens += attention.numel()
                # Summed over the group's target tokens, divided once: every token counts the same.
                loss = summed_target_loss(model, input_ids, attention, labels, device) / max(target_tokens, 1)
                loss.backward()
                step_loss += loss.item()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = step_loss
            history.append([step, round(step_loss, 5)])
            if on_step:
                on_step(step, total, step_loss)
            if step >= total:
                break

    validation_loss = _evaluate(model, validation_set, hp.batch_size, pad_id, device)
    model.save_pretrained(output_dir, safe_serialization=True)
    if hp.method == "full":
        tokenizer.save_pretrained(output_dir)
    return TrainingResult(
        steps=step,
        train_examples=len(train_set),
        validation_examples=len(validation_set),
        skipped_examples=skipped + skipped_validation,
        final_train_loss=last_loss,
        validation_loss=validation_loss,
        loss_history=history,
        real_tokens=real_tokens,
        padded_tokens=padded_tokens,
        seconds=time.monotonic() - started,
        device=device,
    )

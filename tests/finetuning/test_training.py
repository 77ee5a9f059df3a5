"""The training loop on the tiny model: the shortcuts it takes change nothing
but the time, and the same inputs give the same model."""

import json

import pytest

from finetuning.hyperparameters import hyperparameters_parse
from finetuning.prompts import training_pair
from finetuning.training import (
    IGNORE_INDEX,
    UNLIKELY,
    collate,
    encode,
    length_grouped_batches,
    shared_prefix_length,
    summed_target_loss,
    train,
)
from tests.tiny_model import SEED_FILE


def _pairs(count=24, offset=0):
    rows = [json.loads(line) for line in SEED_FILE.read_text().splitlines()[offset : offset + count]]
    return [training_pair(row["attributes"], row["description"]) for row in rows]


def _plain_loss(model, input_ids, attention, labels):
    """The textbook loss: full forward pass, head on every position."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@pytest.mark.parametrize("method", ["lora", "full"])
def test_shared_prefix_and_target_only_head_give_the_textbook_loss_and_gradients(tiny_checkpoint, method):
    import torch
    from transformers import AutoTokenizer

    from finetuning.training import _load_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    hp = hyperparameters_parse({"method": method, "lora_dropout": 0})
    model = _load_model(tiny_checkpoint, hp, "cpu")
    items = encode(tokenizer, _pairs(6), 256).items
    input_ids, attention, labels = collate(items, tokenizer.pad_token_id)
    prefix = shared_prefix_length(items)
    assert prefix > 20  # the system message and instruction are shared

    expected = _plain_loss(model, input_ids, attention, labels)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    got = summed_target_loss(model, input_ids, attention, labels, "cpu", prefix)
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for grad, expected_grad in zip(
        (p.grad for p in model.parameters() if p.requires_grad), expected_grads, strict=True
    ):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_encode_cuts_long_descriptions_and_skips_examples_whose_prompt_fills_the_length(tiny_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    pairs = _pairs(12)
    one_by_one = [
        (tokenizer(p, add_special_tokens=False)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"])
        for p, c in pairs
    ]
    prompt_lengths = sorted(len(p) for p, _ in one_by_one)
    # Between the shortest and the longest prompt: some prompts fill it, others leave room.
    max_length = prompt_lengths[len(prompt_lengths) // 2] + 1
    encoded = encode(tokenizer, pairs, max_length)

    expected_skipped = sum(1 for p, _ in one_by_one if len(p) >= max_length)
    expected_truncated = sum(1 for p, c in one_by_one if len(p) < max_length < len(p) + len(c))
    assert 0 < encoded.skipped == expected_skipped
    assert 0 < encoded.truncated == expected_truncated
    assert len(encoded.items) == len(pairs) - expected_skipped
    assert encoded.needed_lengths == [len(p) + len(c) for p, c in one_by_one]  # the same ids as one by one
    kept = [(p, c) for p, c in one_by_one if len(p) < max_length]
    for (input_ids, labels), (prompt_ids, completion_ids) in zip(encoded.items, kept, strict=True):
        assert input_ids == (prompt_ids + completion_ids)[:max_length] and len(labels) == len(input_ids)
        assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert encoded.target_tokens == sum(min(len(c), max_length - len(p)) for p, c in kept)

    whole = encode(tokenizer, pairs, 4096)
    assert whole.skipped == whole.truncated == 0 and len(whole.items) == len(pairs)
    assert encode(tokenizer, [], 64).items == []


def _marked(tokenizer, setting):
    """A pair whose completion states "leather" (an invented fact), encoded with ``setting``."""
    prompt, completion = training_pair({"name": "Court Shoe"}, "A court shoe with a leather upper.")
    start = completion.index("leather")
    (item,) = encode(tokenizer, [(prompt, completion, [(start, start + 7)])], 256, setting).items
    return item, tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_invented_facts_skip_masks_the_facts_tokens_and_avoid_marks_the_first_unlikely(tiny_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    (ids, learn), prompt_ids = _marked(tokenizer, "learn")
    assert learn == [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]
    # The tokens that spell "leather": the shortest run of completion tokens whose text holds it.
    completion = range(len(prompt_ids), len(ids))
    last = next(i for i in completion if "leather" in tokenizer.decode(ids[len(prompt_ids) : i + 1]))
    first = max(i for i in completion if i <= last and "leather" in tokenizer.decode(ids[i : last + 1]))
    fact = list(range(first, last + 1))
    for setting in ("skip", "avoid"):
        (same_ids, labels), _ = _marked(tokenizer, setting)
        assert same_ids == ids
        changed = [i for i, (a, b) in enumerate(zip(learn, labels, strict=True)) if a != b]
        assert changed == fact  # the fact's tokens, nothing else
        if setting == "skip":
            assert all(labels[i] == IGNORE_INDEX for i in fact)
        else:
            assert labels[fact[0]] == UNLIKELY - ids[fact[0]]
            assert all(labels[i] == IGNORE_INDEX for i in fact[1:])


def test_an_avoided_token_costs_minus_log_one_minus_its_probability_and_a_step_makes_it_less_likely(
    tiny_checkpoint,
):
    import torch
    from transformers import AutoTokenizer

    from finetuning.training import _load_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = _load_model(tiny_checkpoint, hyperparameters_parse({"lora_dropout": 0}), "cpu")
    (ids, labels), _ = _marked(tokenizer, "avoid")
    position = next(i for i, label in enumerate(labels) if label <= UNLIKELY)
    input_ids, attention, batch_labels = collate([(ids, labels)], tokenizer.pad_token_id)

    def fact_probability():
        with torch.no_grad():
            return model(input_ids=input_ids).logits[0, position - 1].softmax(-1)[ids[position]].item()

    likely = torch.tensor([[label if label > UNLIKELY else IGNORE_INDEX for label in labels]])
    expected = (
        _plain_loss(model, input_ids, attention, likely).item()
        - torch.log1p(-torch.tensor(fact_probability(), dtype=torch.float64)).item()
    )
    loss = summed_target_loss(model, input_ids, attention, batch_labels, "cpu")
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    before = fact_probability()
    loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= 0.05 * parameter.grad
    assert fact_probability() < before


def test_training_records_skipped_and_truncated_examples(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    pairs, validation = _pairs(12), _pairs(4, offset=30)
    prompt_lengths = sorted(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p, _ in pairs)
    max_length = max(prompt_lengths[len(prompt_lengths) // 2] + 1, 32)
    hp = hyperparameters_parse({"max_steps": 1, "batch_size": 4, "max_seq_length": max_length})
    result = train(base_dir=tiny_checkpoint, train_pairs=pairs, validation_pairs=validation, hp=hp, output_dir=tmp_path)
    train_encoded, validation_encoded = encode(tokenizer, pairs, max_length), encode(tokenizer, validation, max_length)
    metrics = result.metrics()
    assert metrics["skipped_examples"] == train_encoded.skipped + validation_encoded.skipped > 0
    assert metrics["truncated_examples"] == train_encoded.truncated + validation_encoded.truncated > 0
    assert metrics["train_examples"] == len(train_encoded.items)
    assert metrics["real_tokens"] > 0 and metrics["tokens_per_second"] > metrics["target_tokens_per_second"]


def test_shared_prefix_stops_before_the_first_target_token():
    # Two rows that are identical up to and into their targets.
    items = [
        ([1, 2, 3, 4, 5], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 5]),
        ([1, 2, 3, 4, 9], [-100, -100, 3, 4, 9]),
    ]
    # Position 1 predicts the second row's first target (index 2): only position 0 may be shared.
    assert shared_prefix_length(items) == 1
    assert shared_prefix_length([([7, 8], [IGNORE_INDEX, 8]), ([6, 8], [IGNORE_INDEX, 8])]) == 0


def test_length_grouping_keeps_padding_low_and_covers_every_example():
    import random

    lengths = [random.Random(i).randint(60, 250) for i in range(400)]
    batches = length_grouped_batches(lengths, 8, random.Random(0))
    assert sorted(i for batch in batches for i in batch) == list(range(400))
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    assert 1 - sum(lengths) / padded < 0.05


def test_the_same_data_hyperparameters_and_seed_give_the_same_final_loss(tiny_checkpoint, tmp_path):
    hp = hyperparameters_parse({"max_steps": 6, "batch_size": 4, "max_seq_length": 192, "seed": 7})
    runs = [
        train(
            base_dir=tiny_checkpoint,
            train_pairs=_pairs(24),
            validation_pairs=_pairs(6, offset=30),
            hp=hp,
            output_dir=tmp_path / f"run{i}",
        )
        for i in range(2)
    ]
    assert runs[0].steps == runs[1].steps == 6
    assert abs(runs[0].final_train_loss - runs[1].final_train_loss) < 1e-4
    assert abs(runs[0].validation_loss - runs[1].validation_loss) < 1e-4
    other_seed = train(
        base_dir=tiny_checkpoint,
        train_pairs=_pairs(24),
        validation_pairs=[],
        hp=hyperparameters_parse({**hp.as_dict(), "seed": 8}),
        output_dir=tmp_path / "other",
    )
    assert abs(other_seed.final_train_loss - runs[0].final_train_loss) > 1e-4  # the seed matters


def test_training_reports_padding_and_evaluates_at_each_epoch(tiny_checkpoint, tmp_path):
    evaluations = []
    result = train(
        base_dir=tiny_checkpoint,
        train_pairs=_pairs(16),
        validation_pairs=_pairs(4, offset=40),
        hp=hyperparameters_parse({"epochs": 2, "batch_size": 4, "max_seq_length": 192}),
        output_dir=tmp_path / "out",
        on_evaluate=lambda step, loss: evaluations.append(step),
    )
    assert result.steps == 8 and evaluations == [4, 8]
    assert [step for step, _ in result.validation_history] == [4, 8]
    assert result.padding_share < 0.25 and result.target_tokens > 0
    assert result.computed_tokens < result.real_tokens  # shared prefixes were computed once per batch


def test_the_lora_input_dropout_drops_p_and_keeps_the_expected_value(tiny_checkpoint):
    import torch

    from finetuning.training import _load_model, dropout_module

    dropout = dropout_module(0.1).train()
    x = torch.ones(400, 500)
    y = dropout(x)
    assert abs((y == 0).float().mean().item() - 0.1) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01  # survivors scaled by 1/(1-p)
    assert torch.equal(dropout.eval()(x), x)
    model = _load_model(tiny_checkpoint, hyperparameters_parse({"lora_dropout": 0.1}), "cpu")
    swapped = [m for m in model.modules() if type(m).__name__ == "IntegerMaskDropout"]
    assert len(swapped) == 2 * 7 and all(m.p == 0.1 for m in swapped)  # every LoRA module of both layers

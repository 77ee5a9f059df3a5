"""Text generation from a loaded model version."""

import secrets
import time
from dataclasses import dataclass


class PromptTooLong(ValueError):
    pass


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 160
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    repetition_penalty: float = 1.0
    seed: int | None = None
    num_return_sequences: int = 1


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop": the model ended its answer; "length": max_new_tokens reached
    tokens: int


@dataclass
class GenerationResult:
    completions: list
    prompt_tokens: int
    seed: int | None
    generate_seconds: float


def generate(loaded, prompt_text, params):
    import torch

    tokenizer = loaded.tokenizer
    encoded = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False)
    input_ids = encoded["input_ids"]
    prompt_tokens = input_ids.shape[1]
    if prompt_tokens + params.max_new_tokens > loaded.max_positions:
        raise PromptTooLong(
            f"the prompt is {prompt_tokens} tokens; with max_new_tokens={params.max_new_tokens} it exceeds "
            f"the model's {loaded.max_positions}-token context"
        )
    sampling = params.temperature > 0
    kwargs = {
        "max_new_tokens": params.max_new_tokens,
        "do_sample": sampling,
        "num_return_sequences": params.num_return_sequences,
        "repetition_penalty": params.repetition_penalty,
        "eos_token_id": loaded.stop_token_ids,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else loaded.stop_token_ids[0],
    }
    if sampling:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    else:
        # The checkpoint's generation_config may carry sampling defaults; greedy means greedy.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    seed = params.seed
    if sampling and seed is None:
        seed = secrets.randbelow(2**31)
    # Versions on one base model share its modules (and torch RNG is global): they take turns.
    with loaded.use() as model, torch.inference_mode():
        started = time.monotonic()
        if sampling:
            torch.manual_seed(seed)
        output = model.generate(input_ids=input_ids, attention_mask=encoded["attention_mask"], **kwargs)
        seconds = time.monotonic() - started
    stops = set(loaded.stop_token_ids)
    completions = []
    for row in output[:, prompt_tokens:].tolist():
        cut = next((i for i, token in enumerate(row) if token in stops), None)
        tokens = row if cut is None else row[:cut]
        completions.append(
            Completion(
                text=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                finish_reason="length" if cut is None else "stop",
                tokens=len(tokens) if cut is None else cut + 1,
            )
        )
    return GenerationResult(completions=completions, prompt_tokens=prompt_tokens, seed=seed, generate_seconds=seconds)

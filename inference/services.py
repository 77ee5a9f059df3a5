import time

from finetuning import prompts
from finetuning.selectors import active_version_get
from inference.generation import generate
from inference.loader import ModelUnavailable, model_get


def text_generate(*, params, product=None, prompt=None, version=None):
    """Generate for a product (normalised attributes) or a free prompt with
    ``version`` (the active one when None). Returns the API's response dict."""
    started = time.monotonic()
    if version is None:
        version = active_version_get()
        if version is None:
            raise ModelUnavailable("no model version is active; run `python manage.py prepare_base_model`")
    loaded = model_get(version)
    loaded_at = time.monotonic()
    prompt_text = prompts.product_prompt(product) if product is not None else prompts.free_prompt(prompt)
    result = generate(loaded, prompt_text, params)
    completion_tokens = sum(c.tokens for c in result.completions)
    return {
        "model_version": {"id": version.pk, "name": version.name},
        "choices": [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason} for i, c in enumerate(result.completions)
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": result.prompt_tokens + completion_tokens,
        },
        "seed": result.seed,
        "timings": {
            "load_ms": round((loaded_at - started) * 1000, 1),
            "generate_ms": round(result.generate_seconds * 1000, 1),
            "total_ms": round((time.monotonic() - started) * 1000, 1),
            "tokens_per_second": round(completion_tokens / result.generate_seconds, 2)
            if result.generate_seconds
            else None,
        },
    }

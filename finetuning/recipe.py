"""The recipe: what an artifact in the model store is and what made it, written with its weights
(``genapi.json``) and read back through the same type by everything that serves, exports or
checks it. Like nanoGPT's checkpoints, enough to rebuild it: the base it was trained on, the
hyperparameters, the prompt format, the data snapshot."""

from dataclasses import asdict, dataclass, field, fields

from finetuning.prompts import PROMPT_FORMAT_VERSION

KINDS = ("base", "lora", "full")


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class Recipe:
    kind: str
    name: str
    prompt_format_version: int
    # A base model: where it came from and its transformers architecture.
    source: str = ""
    architecture: str = ""
    # A fine-tune: the base it was trained on (its store path and manifest sha256), how, on what.
    base_model: str = ""
    base_artifact: str = ""
    base_sha256: str = ""
    hyperparameters: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RecipeError(f"kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "lora" and not (self.base_artifact and self.base_sha256):
            raise RecipeError("base_artifact: a LoRA recipe names the base weights it was trained on")

    @property
    def is_adapter(self):
        """Serving needs its base weights too (``base_artifact``, checked by ``base_sha256``)."""
        return self.kind == "lora"

    def as_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data):
        if not isinstance(data, dict):
            raise RecipeError("not a JSON object")
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"{unknown[0]}: not a recipe field")
        missing = [name for name in ("kind", "name", "prompt_format_version") if name not in data]
        if missing:
            raise RecipeError(f"{missing[0]}: missing")
        return cls(**data)

    def prompt_format_check(self):
        """Refuse weights trained on another prompt format than the one this code builds: served
        with the new format, they would write garbage without any error."""
        if self.prompt_format_version != PROMPT_FORMAT_VERSION:
            raise RecipeError(
                f"prompt_format_version: {self.name} was made with prompt format {self.prompt_format_version}; "
                f"this genapi builds prompts in format {PROMPT_FORMAT_VERSION}"
            )

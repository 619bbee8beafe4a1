"""Model families by name.

A family is a config class (a dataclass: the recipe's ``[model]`` table, validated by its
own ``validate()``, and the ``config.json`` of a run) and a builder. ``FAMILIES.get(name)``
gives the family; a new family is one module that registers itself plus one import line in
``_FAMILY_MODULES`` below:

    @dataclass
    class TinyConfig(ModelConfig):
        family: str = "tiny"
        width: int = 8

    FAMILIES.register("tiny")(Family(TinyConfig, build=TinyNet))

``config_from_dict`` reads any family's config (``family`` missing means ``gpt``: run folders
written before families existed), ``build_model`` builds one.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from adl_cli.errors import AdlError
from adl_cli.registry import Registry

FAMILIES = Registry("model family")
DEFAULT_FAMILY = "gpt"
_FAMILY_MODULES = ("adl_cli.models.gpt", "adl_cli.models.reward", "adl_cli.models.vit", "adl_cli.models.mixer", "adl_cli.models.poolformer",
                   "adl_cli.models.fnet", "adl_cli.models.cnn", "adl_cli.models.axial", "adl_cli.models.swin",
                   "adl_cli.models.perceiver", "adl_cli.models.slots", "adl_cli.models.perceiver_ar",
                   "adl_cli.models.mamba", "adl_cli.models.mamba2", "adl_cli.models.rnn", "adl_cli.models.xlstm")


class ModelConfig:
    """Base of every family's config dataclass. As a recipe section it resolves to the class of
    the family its ``family`` key names (see recipe.py)."""

    family: str = DEFAULT_FAMILY

    @classmethod
    def section_type(cls, data: dict[str, Any]) -> type:
        name = data.get("family", DEFAULT_FAMILY) if isinstance(data, dict) else DEFAULT_FAMILY
        try:
            return family(str(name)).config
        except AdlError as e:
            raise AdlError(f"model.family: {e}") from None

    def validate(self) -> None:  # pragma: no cover - families override
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def with_vocab(self, vocab_size: int):
        """A copy sized for a tokenizer of ``vocab_size`` ids (families without tokens return self)."""
        return self


@dataclass(frozen=True)
class Family:
    config: type  # a ModelConfig dataclass
    build: Callable[[Any], nn.Module]
    # Old state-dict layouts of this family -> the current one (e.g. a fused qkv split in three).
    upgrade_state: Callable[[dict], dict] = lambda tensors: tensors  # noqa: E731  (an instance field: not bound as a method)
    # The model's language-model head (None: not a language model): decides which commands take it.
    language_model: bool = True


def _load_families() -> None:
    for module in _FAMILY_MODULES:
        importlib.import_module(module)


def family(name: str) -> Family:
    if name not in FAMILIES:
        _load_families()
    return FAMILIES.get(name)


def config_from_dict(d: dict[str, Any]):
    """A family's config from a config.json dict; ValueError/TypeError for a bad one."""
    if not isinstance(d, dict):
        raise ValueError("config.json must hold a JSON object")
    fam = family(str(d.get("family", DEFAULT_FAMILY)))
    return fam.config.from_dict(d)


def build_model(cfg) -> nn.Module:
    """The model of ``cfg``'s family; a config the family refuses is an AdlError."""
    try:
        return family(cfg.family).build(cfg)
    except ValueError as e:
        raise AdlError(f"model: {e}") from None


__all__ = ["FAMILIES", "Family", "ModelConfig", "build_model", "config_from_dict", "family"]

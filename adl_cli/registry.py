"""Registries by name, so a recipe can swap a component without code.

    ATTENTION = Registry("attention")

    @ATTENTION.register("naive")
    def naive_attention(q, k, v, *, causal=True, scale=None, bias=None): ...

    ATTENTION.get("naive")  # -> the function; an unknown name is an AdlError
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adl_cli.errors import unknown


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise unknown(self.kind, name, self._items)
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

"""Recipes: TOML files parsed into typed, validated config objects, with --set overrides.

A recipe schema is a dataclass whose fields are section dataclasses (``model``, ``data``,
``train``) plus top-level scalars. ``load_recipe(path, Schema, ["train.steps=10"])``
returns a filled Schema; every problem is an AdlError that names the key, the file and,
for unknown keys, the closest valid one. ``dump_recipe`` writes the resolved recipe back
as TOML, so a run folder reproduces its run.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from adl_cli.errors import AdlError, closest, opt


def _fields(cls) -> dict[str, dataclasses.Field]:
    """The recipe keys of a section: field names, or ``metadata["key"]`` where the TOML key is a
    Python keyword (``init.from``)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.metadata.get("key", f.name)] = f
    return out


def _is_section(tp) -> bool:
    return isinstance(tp, type) and (dataclasses.is_dataclass(tp) or hasattr(tp, "section_type"))


def _resolve(tp, data: Any):
    """A section whose class depends on its data (``[model]``: the class of the family it names)."""
    if hasattr(tp, "section_type"):
        return tp.section_type(data if isinstance(data, dict) else {})
    return tp


def _describe(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _describe(a) for a in args)
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if typing.get_origin(tp) is dict or tp is dict:
        return "a table"
    if typing.get_origin(tp) is list:
        return "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp, where: str) -> Any:
    """Check/convert a TOML value (or a --set string, already parsed) to the field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except AdlError as e:
                errors.append(e)
        raise AdlError(f"{where} must be {_describe(tp)}, got {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise AdlError(f"{where} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}{closest(str(value), map(str, allowed))}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        if isinstance(value, str):  # --set train.log_with=tensorboard: one item
            value = [value] if value else []
        if not isinstance(value, list):
            raise AdlError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise AdlError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise AdlError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise AdlError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AdlError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise AdlError(f"{where} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise AdlError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported recipe field type {tp}")


def _parse_scalar(text: str) -> Any:
    """A --set value: TOML syntax when it parses (numbers, booleans, quoted strings, arrays), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _build(cls, data: dict[str, Any], source: str, prefix: str = ""):
    cls = _resolve(cls, data)
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise AdlError(f"unknown key '{dotted}' in {source}{closest(dotted, [prefix + k for k in fields])}; valid keys: {', '.join(prefix + k for k in fields)}")
        tp = fields[key].type
        if _is_section(tp):
            if not isinstance(value, dict):
                raise AdlError(f"'{dotted}' in {source} must be a table [{dotted}]")
            kwargs[fields[key].name] = _build(tp, value, source, dotted + ".")
        else:
            kwargs[fields[key].name] = _coerce(value, tp, f"'{dotted}' in {source}")
    for key, f in fields.items():
        if f.name not in kwargs and _is_section(f.type):
            kwargs[f.name] = _build(f.type, {}, source, f"{prefix}{key}.")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise AdlError(f"{source}: {e}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise AdlError(f"{source}: {e}") from None
    return obj


def _set_dotted(data: dict[str, Any], schema, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    cls, node, prefix = schema, data, ""
    for i, part in enumerate(parts):
        fields = _fields(cls) if cls is not None else {}
        here = prefix + part
        last = i == len(parts) - 1
        if cls is not None and part not in fields:
            raise AdlError(f"{opt('set')}: unknown key '{here}'{closest(here, [prefix + k for k in fields])}")
        tp = fields[part].type if cls is not None else None
        if last:
            if tp is not None and _is_section(tp):
                raise AdlError(f"{opt('set')}: '{here}' is a section; set one of its keys, e.g. {here}.{next(iter(_fields(_resolve(tp, {}))))}=...")
            value = _parse_scalar(raw)
            if tp is str and not isinstance(value, str):
                value = raw  # a string field keeps the literal text (e.g. a corpus path like 1.txt)
            node[part] = value
            return
        if tp is not None and _is_section(tp):
            cls = _resolve(tp, node.get(part, {}))
        elif tp is not None and (typing.get_origin(tp) is dict or tp is dict):
            cls = None  # free-form table: anything below is accepted
        elif tp is not None:
            raise AdlError(f"{opt('set')}: '{here}' is not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise AdlError(f"{opt('set')}: '{here}' is not a table")
        prefix = here + "."


def load_recipe(path: str | Path, schema, overrides: list[str] | None = None):
    """Read a TOML recipe into ``schema`` applying ``key.path=value`` overrides."""
    path = Path(path)
    if not path.exists():
        raise AdlError(f"recipe not found: {path}")
    if path.is_dir():
        raise AdlError(f"recipe {path} is a folder; give a .toml file (a run folder holds recipe.toml)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise AdlError(f"TOML syntax error in {path}: {e}") from None
    except UnicodeDecodeError:
        raise AdlError(f"recipe {path} is not UTF-8 text") from None
    for item in overrides or []:
        if "=" not in item:
            raise AdlError(f"{opt('set')} expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        _set_dotted(data, schema, key.strip(), raw.strip())
    return _build(schema, data, str(path))


def recipe_dict(obj) -> dict[str, Any]:
    """The recipe as nested dicts keyed by recipe keys (``init.from``, not the field name)."""
    out = {}
    for key, f in _fields(type(obj)).items():
        value = getattr(obj, f.name)
        out[key] = recipe_dict(value) if dataclasses.is_dataclass(value) else (dict(value) if isinstance(value, dict) else value)
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} to TOML")


def dump_recipe(obj, header: str = "") -> str:
    """The recipe as TOML text (None values are left out: they mean 'default')."""
    data = recipe_dict(obj)
    lines = [f"# {line}" for line in header.splitlines()]
    tables = []
    for k, v in data.items():
        if _is_section(_fields(type(obj))[k].type):
            tables.append((k, v))
        elif v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{name}]")
        for k, v in table.items():
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"

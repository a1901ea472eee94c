"""Reading, overriding and validating configs: YAML files, ``--set key=value`` overrides, one-line errors.

Kept apart from the config models in :mod:`tumorseg.config` (which re-exports these), so each stays short.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ValidationError

from tumorseg.errors import TumorsegError

C = TypeVar("C", bound=BaseModel)


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[2, 3]"]`` into a nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TumorsegError(f"--set {pair!r}: expected key=value, e.g. --set epochs=2 or --set optim.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise TumorsegError(f"--set {pair!r}: value is not valid YAML ({exc.__class__.__name__})") from exc
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TumorsegError(f"--set {pair!r}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``over`` into a copy of ``base``."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class _Twice(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"{key!r} is set twice in one mapping")
        self.line = line


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise _Twice(key, key_node.start_mark.line + 1)
            seen.add(key if isinstance(key, Hashable) else id(key_node))
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad YAML is a one-line error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise TumorsegError(f"{path}: config file not found") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader
    except _Twice as exc:
        raise TumorsegError(f"{path}: {exc} (line {exc.line}); keep one of them") from exc
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise TumorsegError(f"{path}: invalid YAML{line}; fix the syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TumorsegError(f"{path}: expected a mapping of settings at the top level")
    return data


_TYPE_TAGS = frozenset({"none", "int", "float", "str", "bool"})
"""Names pydantic puts in an error's location for the alternatives of a union (besides ``tuple[int, int]``)."""


def validation_message(exc: ValidationError, source: str, section: str | None = None) -> str:
    """One line from a pydantic error: the first problem, its key (under ``section``) and the fix.

    A value that fits none of a union's forms (``image_size: [32]``) is said once, with the forms it may take.
    """
    errs = exc.errors()
    err = errs[0]
    path = [str(p) for p in err["loc"]]
    tag = next((i for i, p in enumerate(path) if i and ("[" in p or p in _TYPE_TAGS)), None)
    forms = [] if tag is None else list(dict.fromkeys(
        str(e["loc"][tag]) for e in errs if [str(p) for p in e["loc"][:tag]] == path[:tag] and len(e["loc"]) > tag))
    if len(forms) > 1:
        path, msg = path[:tag], f"{err.get('input')!r} fits none of its forms ({', '.join(forms)})"
        left = sum(1 for e in errs if [str(p) for p in e["loc"][:tag]] != path)
    else:
        msg = "unknown setting; check the spelling" if err["type"] == "extra_forbidden" else err["msg"]
        left = len(errs) - 1
    loc = ".".join([*([section] if section else []), *path]) or "(top level)"
    return f"{source}: {loc}: {msg}{f' (+{left} more)' if left else ''}"


def build_config(cls: type[C], data: dict[str, Any], source: str = "config", section: str | None = None) -> C:
    """Validate ``data`` as ``cls``; errors become one-line :class:`TumorsegError`.

    ``section`` prefixes the key in the message (``train.epochs``) when ``data`` is one
    section of a larger file, such as a pipeline YAML.
    """
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise TumorsegError(validation_message(exc, source, section)) from exc


def load_config(cls: type[C], path: Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> C:
    """Build a config from ``base`` <- YAML file <- ``--set`` overrides."""
    data: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        data = deep_merge(data, read_yaml(path))
        source = str(path)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
        source = f"{source} + --set" if path is not None else "--set"
    return build_config(cls, data, source)


def dump_config(cfg: BaseModel) -> str:
    """The full resolved config as YAML (paths as strings)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """``"30m"``, ``"2h"``, ``"90s"``, ``"1h30m"`` -> seconds; anything else (or zero) is a ValueError."""
    raw = str(text).strip()
    parts = _DURATION.findall(raw)
    if not parts or _DURATION.sub("", raw).strip():
        raise ValueError(f"budget {text!r} is not a duration; use e.g. 90s, 30m, 2h or 1h30m")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u.lower()] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"budget {text!r} must be longer than zero (e.g. 30m)")
    return seconds


def _check_budget(v: Any) -> str | None:
    if v is not None:
        if not isinstance(v, str):  # a bare number in a YAML file: seconds or minutes?
            raise ValueError(f"budget {v!r} has no unit; use e.g. 90s, 30m, 2h or 1h30m")
        parse_duration(v)
    return v


Budget = Annotated[str | None, BeforeValidator(_check_budget)]
"""A wall-time budget such as ``30m``; checked by :func:`parse_duration` (config and pipeline files)."""

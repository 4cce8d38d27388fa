"""A config document (the dict ``tomllib`` reads) back to TOML text: how each matrix run's
config reaches the backend server (``Config.text``)."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from viommu_backend.config import ConfigError

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # a bare TOML key (also the parts of an override key)


def _toml_key(k: str) -> str:
    return k if KEY_RE.match(k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise ConfigError(f"cannot write {type(v).__name__} {v!r} as TOML")


def dumps_toml(doc: Mapping[str, Any]) -> str:
    """A config document back to TOML text (tables, arrays of tables, scalars, lists)."""
    lines: list[str] = []

    def is_aot(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def emit(prefix: str, table: Mapping[str, Any]) -> None:
        for k, v in table.items():
            if not isinstance(v, dict) and not is_aot(v):
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in table.items():
            path = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
            if isinstance(v, dict):
                lines.extend(["", f"[{path}]"])
                emit(path, v)
            elif is_aot(v):
                for item in v:
                    lines.extend(["", f"[[{path}]]"])
                    emit(path, item)

    emit("", doc)
    return "\n".join(lines).lstrip("\n") + "\n"

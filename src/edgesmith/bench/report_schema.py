"""The report.json schema (``report_schema.json``, JSON Schema draft 2020-12) and a small checker.

The checker implements the subset of JSON Schema the schema file uses (``type``, ``required``,
``properties``, ``additionalProperties``, ``items``, ``enum``, ``const``, ``minimum``, ``maximum``,
``minLength``, local ``$ref``), so validating a report needs no extra package. Every problem is
collected and reported at once, each with its JSON path.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from edgesmith.errors import EdgesmithError

SCHEMA_FILE = "report_schema.json"
_MAX_SHOWN = 12


class ReportError(EdgesmithError, ValueError):
    """A report.json is missing, unreadable or does not follow the documented schema."""


@functools.cache
def report_schema() -> dict[str, Any]:
    """The report.json schema, as shipped beside this module."""
    return json.loads((resources.files("edgesmith.bench") / SCHEMA_FILE).read_text(encoding="utf-8"))


def schema_problems(value: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Every way ``value`` breaks ``schema`` (default: the report schema), as ``path: problem`` lines."""
    root = schema if schema is not None else report_schema()
    problems: list[str] = []
    _check(value, root, root, "$", problems)
    return problems


def validate_report(report: Any, *, origin: str = "report.json") -> None:
    """Raise :class:`ReportError` listing every schema violation of ``report`` (a parsed report.json)."""
    problems = schema_problems(report)
    if problems:
        shown = problems[:_MAX_SHOWN] + ([f"... and {len(problems) - _MAX_SHOWN} more"]
                                         if len(problems) > _MAX_SHOWN else [])
        raise ReportError(f"{origin} does not follow the report schema ({len(problems)} problem(s)):\n  "
                          + "\n  ".join(shown))


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: ((isinstance(v, int) and not isinstance(v, bool))
                          or (isinstance(v, float) and v.is_integer())),
}


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"only local $ref is supported, got {ref!r}")
        schema = functools.reduce(lambda node, key: node[key], ref[2:].split("/"), root)
    return schema


def _check(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str, problems: list[str]) -> None:
    schema = _resolve(schema, root)
    if not _check_scalar(value, schema, path, problems):
        return
    if isinstance(value, dict):
        _check_object(value, schema, root, path, problems)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], root, f"{path}[{i}]", problems)


def _check_scalar(value: Any, schema: dict[str, Any], path: str, problems: list[str]) -> bool:
    """Type, const, enum and bounds; False when the type is wrong (nothing else is worth checking)."""
    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else types
        if not any(_TYPES[t](value) for t in allowed):
            problems.append(f"{path}: expected {' or '.join(allowed)}, got {_describe(value)}")
            return False
    if "const" in schema and value != schema["const"]:
        problems.append(f"{path}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} is not one of {', '.join(map(repr, schema['enum']))}")
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{path}: {value!r} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{path}: {value!r} is above the maximum {schema['maximum']}")
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        problems.append(f"{path}: shorter than {schema['minLength']} character(s)")
    return True


def _check_object(value: dict[str, Any], schema: dict[str, Any], root: dict[str, Any], path: str,
                  problems: list[str]) -> None:
    properties = schema.get("properties", {})
    for key in schema.get("required", []):
        if key not in value:
            problems.append(f"{path}: missing required key {key!r}")
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            _check(item, properties[key], root, f"{path}.{key}", problems)
        elif extra is False:
            problems.append(f"{path}: unknown key {key!r} (documented keys: {', '.join(properties)})")
        elif isinstance(extra, dict):
            _check(item, extra, root, f"{path}.{key}", problems)


def _describe(value: Any) -> str:
    kind = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__)
    text = json.dumps(value) if not isinstance(value, dict | list) else ""
    return f"{kind} {text[:40]}".rstrip()

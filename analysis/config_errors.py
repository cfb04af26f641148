"""Config validation that names each offending key on one line, for the Snakefile.

`snakemake.utils.validate` stops at the first schema error and prints it with the whole failing sub-schema, so
the key path is buried in a 50-line dump (and a `oneOf` failure, e.g. a subset rule missing a key, dumps every
branch). Here every error is reported at once, one line each:

    config key datasets.syn_in.format: 'imagenet21k' is not one of ['imagenet', 'coco', 'openimages', 'bdd100k']
    config key datasets.syn_in.subset: 'per_class' is required for rule uniform
    config key only_experiment: unknown key (value 'iou'); did you mean 'only_experiments'?

A `oneOf`/`anyOf` whose branches are told apart by a `const` property (the subset `rule`) is reported as the
errors of the branch the config selects; other groups fall back to jsonschema's `best_match`. The Snakefile
still calls `validate` afterwards, for the schema's `default:` values.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

MAX_VALUE_CHARS = 60
SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigSchemaError(ValueError):
    """The config does not match the schema; the message has one line per offending key."""


def _short(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def key_path(path: Iterable[Any]) -> str:
    """`['datasets', 'syn_in', 'subset']` -> `datasets.syn_in.subset`; list indices as `[i]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _discriminator(branches: Sequence[dict], instance: Any) -> tuple[str, list[int]] | None:
    """The `const` property every branch pins (e.g. `rule`) and the branches the instance's value selects."""
    if not isinstance(instance, dict) or not branches:
        return None
    consts = [
        {k: v["const"] for k, v in (b.get("properties") or {}).items() if "const" in v} for b in branches
    ]
    for key in consts[0]:
        if all(key in c for c in consts) and key in instance:
            return key, [i for i, c in enumerate(consts) if c[key] == instance[key]]
    return None


@dataclass(frozen=True)
class _Line:
    """One problem at a key path. `required` names a missing key (merged per path into one line); a
    `fallback` line is dropped when another line names the same path."""

    path: tuple
    message: str
    required: str | None = None
    fallback: bool = False

    def text(self, names: Sequence[str] = ()) -> str:
        prefix = f"config key {key_path(self.path)}" if self.path else "config"
        if self.required is None:
            return f"{prefix}: {self.message}"
        names = list(names) or [self.required]
        verb = "are" if len(names) > 1 else "is"
        return f"{prefix}: {', '.join(names)} {verb} required{self.message}"


def _lines(error: ValidationError, suffix: str = "") -> list[_Line]:
    path = tuple(error.absolute_path)
    kind, inst = error.validator, error.instance
    if kind in ("oneOf", "anyOf"):
        return _group_lines(error, path)
    if kind == "required":
        missing = error.message.removesuffix(" is a required property")  # the key's repr
        return [_Line(path, suffix, required=missing)]
    if kind == "additionalProperties" and isinstance(inst, dict):
        allowed = sorted((error.schema.get("properties") or {}).keys())
        patterns = error.schema.get("patternProperties") or {}
        out = []
        for k in inst:
            if k in allowed or any(re.search(p, k) for p in patterns):
                continue
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
            out.append(_Line((*path, k), f"unknown key (value {_short(inst[k])}); {hint}"))
        if out:
            return out
    if "propertyNames" in error.relative_schema_path:  # the instance is the key itself, the path its parent's
        return [_Line((*path, inst), f"key name does not match {error.validator_value!r}")]
    if kind == "enum":
        return [_Line(path, f"{_short(inst)} is not one of {error.validator_value}{suffix}")]
    if kind == "type":
        return [_Line(path, f"{_short(inst)} is not of type {error.validator_value!r}{suffix}")]
    message = error.message
    if len(message) > 2 * MAX_VALUE_CHARS and not isinstance(inst, (dict, list)):
        message = message[: 2 * MAX_VALUE_CHARS] + "..."
    elif isinstance(inst, (dict, list)) and message.startswith(repr(inst)):
        message = _short(inst) + message[len(repr(inst)) :]
    return [_Line(path, message + suffix)]


def _group_lines(error: ValidationError, path: tuple) -> list[_Line]:
    """A failed oneOf/anyOf: the errors of the branch the instance selects, else the best match."""
    branches = error.validator_value
    if not error.context:  # oneOf with several valid branches
        return [_Line(path, f"{_short(error.instance)} matches more than one allowed form", fallback=True)]
    found = _discriminator(branches, error.instance)
    if found is not None:
        key, chosen = found
        value = error.instance[key]
        if len(chosen) == 1:
            sub = [e for e in error.context if e.relative_schema_path[0] == chosen[0]]
            out = [line for e in sub for line in _lines(e, suffix=f" for {key} {value}")]
            if out:
                return out
        elif not chosen:  # an unknown discriminator value; a sibling `enum` usually says it already
            allowed = [b["properties"][key]["const"] for b in branches]
            return [_Line((*path, key), f"{_short(value)} is not one of {allowed}", fallback=True)]
    return _lines(best_match(error.context))


def config_errors(config: dict, schema: dict | str | os.PathLike = SCHEMA) -> list[str]:
    """One line per offending key of `config` against the JSON schema (a dict, or a YAML/JSON file)."""
    if not isinstance(schema, dict):
        schema = yaml.safe_load(Path(schema).read_text())
    validator = Draft202012Validator(schema)
    lines = [line for e in validator.iter_errors(config) for line in _lines(e)]
    named = {line.path for line in lines if not line.fallback}
    missing: dict[tuple, list[str]] = {}  # (path, suffix) -> missing keys, reported on the first's line
    out: list[_Line] = []
    for line in lines:
        if line.fallback and line.path in named:
            continue
        if line.required is not None:
            group = missing.setdefault((line.path, line.message), [])
            group.append(line.required)
            if len(group) > 1:
                continue
        out.append(line)
    texts = [
        line.text(missing[(line.path, line.message)]) if line.required is not None else line.text()
        for line in out
    ]
    return list(dict.fromkeys(texts))


def check_config(config: dict, schema: dict | str | os.PathLike = SCHEMA) -> None:
    """Raise ConfigSchemaError listing every offending key, or return when the config matches the schema."""
    errors = config_errors(config, schema)
    if errors:
        n = len(errors)
        name = "the schema" if isinstance(schema, dict) else _display(Path(schema))
        head = f"the study config does not match {name} ({n} problem{'s' * (n > 1)}):"
        raise ConfigSchemaError("\n".join([head, *errors]))


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(SCHEMA.parents[2]))
    except ValueError:
        return str(path)

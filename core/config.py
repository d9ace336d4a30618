"""What every YAML config of dinodist shares: reading the file, `KEY=VALUE` overrides, one-line errors.

Both schemas use it: the distillation topology (orchestrator/topology.py) and the SSL stage recipe
(core/ssl/config.py). An error names the file and the field path in one line, for example
`cpu-demo.yaml:7: invalid YAML: ...`, `students[1].arch: unknown arch 'vitx'` or
`override 'students[5].devices': index 5 out of range`. Plain Python (pydantic and PyYAML only), so
the driver reads configs without loading torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dinodist.core.errors import DinodistError

Overrides = Mapping[str, Any] | Sequence[str] | None
_KEY_TOKEN = re.compile(r"[^.\[\]]+|\[\d+\]")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float, as YAML 1.2 does (PyYAML's 1.1 rules want `1.0e-5`).

    Strict schemas would otherwise refuse `lr: 1e-5` as a string, or a lenient one pass it on.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Safe YAML with 1.2 floats (see `_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def read_yaml_mapping(path: str | Path, what: str, allow_empty: bool = False) -> dict[str, Any]:
    """The top-level mapping of a YAML file; `what` names the kind of file in errors ("topology")."""
    path = Path(path)
    if not path.is_file():
        raise DinodistError(f"{path}: {what} file not found")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DinodistError(f"{path}{line}: invalid YAML: {problem}") from None
    if raw is None and allow_empty:
        return {}
    if not isinstance(raw, dict):
        raise DinodistError(f"{path}: a {what} must be a YAML mapping, got {type(raw).__name__}")
    return raw


def parse_overrides(overrides: Overrides) -> list[tuple[str, Any]]:
    """`{"train.iterations": 5}` or `["train.iterations=5"]` -> [(key, value)].

    String values are read as YAML scalars (`1e-5`, `null`, `[1, 2]`); text that is not valid YAML
    stays a string (a path with a colon, say).
    """
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    pairs = []
    for item in overrides:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise DinodistError(f"override {item!r}: expected KEY=VALUE, e.g. train.iterations=10")
        try:
            value = load_yaml(text)
        except yaml.YAMLError:
            value = text
        pairs.append((key.strip(), value))
    return pairs


def apply_override(tree: dict, key: str, value: Any) -> None:
    """Set `key` in a nested mapping: dotted names, `[i]` or `.i` list indices (`students[1].devices`).

    Missing mappings on the way are created, so an override can set a section the file leaves out.
    """
    parts: list[str | int] = []
    for tok in _KEY_TOKEN.findall(key):
        parts.append(int(tok[1:-1]) if tok.startswith("[") else (int(tok) if tok.isdigit() else tok))
    if not parts:
        raise DinodistError(f"override {key!r}: empty key")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(part, int):
            if not isinstance(node, list) or not -len(node) <= part < len(node):
                raise DinodistError(f"override {key!r}: index {part} out of range")
        elif not isinstance(node, dict):
            raise DinodistError(f"override {key!r}: {part!r} is not inside a mapping")
        if last:
            node[part] = value
        elif isinstance(part, int):
            node = node[part]
        else:
            node = node.setdefault(part, {})


def apply_overrides(tree: dict, overrides: Overrides) -> dict:
    """`tree` with every override applied (in place; returned for convenience)."""
    for key, value in parse_overrides(overrides):
        apply_override(tree, key, value)
    return tree


def format_loc(loc: Sequence[Any]) -> str:
    """('students', 1, 'arch') -> 'students[1].arch'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_error_line(exc: ValidationError, source: str | None = None, root: str = "topology") -> str:
    """The first pydantic error as one line: `[source: ]field.path: message`.

    `root` names the top level for errors that have no field path (an unknown top-level key); a
    model-level rule (loc empty) writes its own field path into its message.
    """
    err = exc.errors()[0]
    loc = list(err.get("loc", ()))
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "extra_forbidden" and loc:
        key = loc.pop()
        line = f"{format_loc(loc) or root}: unknown key {key!r}"
    else:
        if kind == "missing":
            msg = "required field is missing"
        if kind.endswith("_type") and "input" in err:
            msg = f"{msg}, got {type(err['input']).__name__} {err['input']!r}"
        where = format_loc(loc)
        line = f"{where}: {msg}" if where else (msg if source else f"{root}: {msg}")
    if source:
        line = f"{source}: {line}"
    return " ".join(line.split())  # pydantic messages can carry newlines

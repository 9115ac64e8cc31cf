"""Reading a spec file into plain data, refusing what YAML or JSON would silently accept.

A repeated key keeps only its last value in both formats, so a spec could say one thing and do
another: every repeat is refused, with its field path (and its line in YAML). YAML anchors and
aliases are refused outright: an alias shares a node, and a few nested ones ("billion laughs")
expand into more data than validation could ever walk. Refusing them is simpler than bounding
them, and a sweep spec does not need them.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

Loc = tuple[str | int, ...]


class SpecSyntaxError(ValueError):
    """The file is not valid YAML or JSON at all."""


class SpecStructureError(ValueError):
    """The file parses, but repeats keys or uses YAML aliases; ``problems`` are (field path, message)."""

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        super().__init__(f"{len(problems)} problem(s)")
        self.problems = problems


def read_spec_text(text: str, is_json: bool) -> Any:
    """The spec's data; raises ``SpecSyntaxError`` or ``SpecStructureError``."""
    return _read_json(text) if is_json else _read_yaml(text)


# -- YAML ---------------------------------------------------------------------------------------
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _SpecLoader(yaml.SafeLoader):
    """A safe loader that records, while composing, the field path of every node it makes."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._paths: list[Loc] = [()]
        self.problems: list[tuple[Loc, str]] = []

    def compose_node(self, parent, index):
        path = self._paths[-1] if parent is None else self._paths[-1] + (_step(index),)
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self.problems.append((path, f"YAML alias *{event.anchor} (line {_line(event)}): {_NO_ALIASES}"))
        elif getattr(event, "anchor", None) is not None:
            self.problems.append((path, f"YAML anchor &{event.anchor} (line {_line(event)}): {_NO_ALIASES}"))
        self._paths.append(path)
        try:
            return super().compose_node(parent, index)
        finally:
            self._paths.pop()

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        first_line: dict[Any, int] = {}
        path = self._paths[-1]
        for key, _ in node.value:
            if key.tag == _MERGE_TAG:
                line = key.start_mark.line + 1
                self.problems.append((path, f"YAML merge key '<<' (line {line}): merge keys are not allowed in a sweep spec (they hide which value wins); write the fields out"))
                continue
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is None:
                continue  # a list or mapping as a key: validation refuses it as not a field name
            line = key.start_mark.line + 1
            if name in first_line:
                self.problems.append((path + (name,), f"duplicate key {name!r} on line {line} (first on line {first_line[name]})"))
            else:
                first_line[name] = line
        return node


_NO_ALIASES = "anchors and aliases are not allowed in a sweep spec (they can expand without bound); write the values out"


def _line(event) -> int:
    return event.start_mark.line + 1


def _step(index) -> str | int:
    if isinstance(index, int):
        return index
    if isinstance(index, yaml.ScalarNode):
        return index.value
    return "(key)"  # None: the node being composed is itself a mapping key


def _read_yaml(text: str) -> Any:
    loader = _SpecLoader(text)
    try:
        node = loader.get_single_node()
        if loader.problems:
            raise SpecStructureError(loader.problems)
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise SpecSyntaxError(f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()


# -- JSON ---------------------------------------------------------------------------------------
class _Object(dict):
    """A JSON object that remembers the keys it was given more than once."""

    repeated: list[str]


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    seen: set[str] = set()
    obj.repeated = [k for k, _ in pairs if k in seen or seen.add(k)]
    return obj


def _plain(value: Any, path: Loc, problems: list[tuple[Loc, str]]) -> Any:
    """``value`` with plain dicts, recording the repeated keys of each object by path."""
    if isinstance(value, _Object):
        for key in dict.fromkeys(value.repeated):
            count = value.repeated.count(key) + 1
            problems.append((path + (key,), f"duplicate key {key!r} ({count} times in one JSON object)"))
        return {k: _plain(v, path + (k,), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, path + (i,), problems) for i, v in enumerate(value)]
    return value


def _read_json(text: str) -> Any:
    try:
        data = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as exc:
        raise SpecSyntaxError(f"not valid JSON: {exc}") from None
    problems: list[tuple[Loc, str]] = []
    data = _plain(data, (), problems)
    if problems:
        raise SpecStructureError(problems)
    return data

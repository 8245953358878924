"""Reading what a pusher wrote, in bounded time and memory.

A repository's files are input from whoever can push. YAML aliases can make a 400-byte file
stand for gigabytes once expanded, and a value echoed into an error message can be as large:
`load_yaml` refuses documents whose aliases expand past a budget, and `show` is the only way a
value of such a file reaches a message.
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

from tasks.errors import SettingsError

MAX_EXPANDED_NODES = 10_000
"""A settings or workflow file has tens of nodes; with aliases expanded it may have this many."""
MAX_FILE_BYTES = 256 * 1024
"""A settings file, workflow file or legacy script is a few hundred bytes."""
MAX_NUMBER_DIGITS = 40
"""Longer numbers are kept as text, so that the key they belong to can be named."""

_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80
_repr.maxlist = _repr.maxdict = _repr.maxtuple = _repr.maxset = 6
_repr.maxlevel = 3


def show(value: Any) -> str:
    """A short repr of any value for a message: long strings and deep or wide values are cut."""
    return shorten(_repr.repr(value), 200, mark="...")


def shorten(text: str, limit: int, one_line: bool = False, mark: str = "…") -> str:
    """`text` cut to at most `limit` characters, ending in `mark` when cut; with `one_line`, its
    runs of whitespace (newlines too) become single spaces first."""
    if one_line:
        text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - len(mark)] + mark


class LongNumber(str):
    """A number with more digits than `MAX_NUMBER_DIGITS`, kept as its text."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<a number of {len(self)} characters>"


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses huge numbers' conversion and alias bombs (see `load_yaml`)."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        text = str(node.value)
        too_long = len(text) > MAX_NUMBER_DIGITS
        return LongNumber(text) if too_long else super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> Any:
        text = str(node.value)
        too_long = len(text) > MAX_NUMBER_DIGITS
        return LongNumber(text) if too_long else super().construct_yaml_float(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)
_BoundedLoader.add_constructor("tag:yaml.org,2002:float", _BoundedLoader.construct_yaml_float)


def _expanded_size(root: yaml.Node, budget: int) -> int:
    """Nodes in the document with every alias expanded, counted without expanding (memoized on
    shared nodes); stops counting once past `budget`."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        if depth > 100:
            return budget + 1
        if (known := sizes.get(id(node))) is not None:
            return known
        sizes[id(node)] = budget + 1  # a node that contains itself is infinite
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child, depth + 1)
                if total > budget:
                    break
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                total += size(key, depth + 1) + size(value, depth + 1)
                if total > budget:
                    break
        sizes[id(node)] = total
        return total

    return size(root, 0)


def check_size(text: bytes, source: str) -> None:
    """Refuse a file larger than `MAX_FILE_BYTES` before parsing it."""
    if len(text) > MAX_FILE_BYTES:
        raise SettingsError(
            f"{source}: the file has {len(text)} bytes; allowed: at most {MAX_FILE_BYTES}"
        )


def load_yaml(text: bytes, source: str, budget: int = MAX_EXPANDED_NODES) -> Any:
    """Parse one YAML document safely: aliases may not expand past `budget` nodes. Raises
    SettingsError naming `source` for invalid YAML, non-UTF-8 text, a file over
    `MAX_FILE_BYTES` or an alias bomb."""
    check_size(text, source)
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise SettingsError(f"{source}: the file is not UTF-8 text") from None
    loader = _BoundedLoader(decoded)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, budget) > budget:
            raise SettingsError(
                f"{source}: YAML aliases expand to more than {budget} values; "
                f"write the values out, or use fewer nested aliases"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise SettingsError(f"{source}: not valid YAML: {str(exc)[:500]}") from None
    except RecursionError:
        raise SettingsError(f"{source}: the YAML is nested too deeply") from None
    finally:
        loader.dispose()

"""Path and branch filters with GitHub Actions semantics, matched in linear time.

Patterns follow GitHub's filter cheat sheet: `*` matches any characters but `/`, `**` any
characters, `?` makes the preceding character optional, `+` repeats it, `[...]` is a class,
`\\` escapes, and a leading `!` negates the patterns before it. A pattern matches the whole path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from tasks.bounded import show
from tasks.errors import SettingsError

MAX_PATTERN_CHARS = 256
MAX_PATTERNS = 200


@dataclass(frozen=True)
class _Atom:
    """One piece of a filter pattern: a character, a class, or a wildcard."""

    kind: str  # "char", "class", "star" (no /), "any" (anything), "dirs" (empty or ".../")
    char: str = ""
    ranges: tuple[tuple[str, str], ...] = ()
    negated: bool = False
    quant: str = ""  # "", "?" (optional) or "+" (one or more)

    def accepts(self, c: str) -> bool:
        if self.kind == "char":
            return c == self.char
        return any(lo <= c <= hi for lo, hi in self.ranges) != self.negated


def _parse_class(body: str, pattern: str) -> _Atom:
    negated = body.startswith("^")
    items = body[1:] if negated else body
    if not items:
        raise SettingsError(
            f"pattern {show(pattern)}: the class [{body}] is empty; list characters or ranges"
        )
    ranges: list[tuple[str, str]] = []
    i = 0
    while i < len(items):
        if i + 2 < len(items) and items[i + 1] == "-":
            lo, hi = items[i], items[i + 2]
            if lo > hi:
                raise SettingsError(
                    f"pattern {show(pattern)}: the class range {lo}-{hi} is reversed; "
                    f"write the lower character first ({hi}-{lo})"
                )
            ranges.append((lo, hi))
            i += 3
        else:
            ranges.append((items[i], items[i]))
            i += 1
    return _Atom("class", ranges=tuple(ranges), negated=negated)


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> tuple[_Atom, ...]:
    """Parse one filter pattern (without its leading `!`) into atoms; refuses what is too long
    or malformed with a message naming the pattern."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SettingsError(
            f"pattern {show(pattern)} has {len(pattern)} characters; "
            f"allowed: at most {MAX_PATTERN_CHARS}"
        )
    atoms: list[_Atom] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\" and i + 1 < n:
            atoms.append(_Atom("char", char=pattern[i + 1]))
            i += 2
            continue
        if char == "*":
            if pattern.startswith("**", i):
                i += 2
                if i < n and pattern[i] == "/":
                    atoms.append(_Atom("dirs"))  # `**/` also matches no folder at all
                    i += 1
                else:
                    atoms.append(_Atom("any"))
                continue
            atoms.append(_Atom("star"))
        elif char in "?+":
            last = atoms[-1] if atoms else None
            literal = last is not None and last.kind == "char" and last.char not in "*?+"
            if last is not None and not last.quant and (literal or last.kind == "class"):
                atoms[-1] = replace(last, quant=char)
            else:
                atoms.append(_Atom("char", char=char))
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                atoms.append(_Atom("char", char=char))
            else:
                atoms.append(_parse_class(pattern[i + 1 : end], pattern))
                i = end
        else:
            atoms.append(_Atom("char", char=char))
        i += 1
    return tuple(atoms)


def _closure(atoms: tuple[_Atom, ...], states: set[tuple[int, bool]]) -> set[tuple[int, bool]]:
    """Add the states reachable without reading a character (skipping optional atoms)."""
    todo = list(states)
    while todo:
        index, inside = todo.pop()
        if inside or index >= len(atoms):
            continue
        atom = atoms[index]
        if atom.quant == "?" or atom.kind in {"star", "any", "dirs"}:
            nxt = (index + 1, False)
            if nxt not in states:
                states.add(nxt)
                todo.append(nxt)
    return states


def glob_match(pattern: str, path: str) -> bool:
    """Whether the pattern matches the whole path, in time linear in the path's length: it is
    run as a set of positions (an NFA), never by backtracking, so a pattern of many wildcards
    against a long name costs length x atoms steps, not exponential time."""
    atoms = compile_pattern(pattern)
    end = len(atoms)
    states = _closure(atoms, {(0, False)})
    for c in path:
        nxt: set[tuple[int, bool]] = set()
        for index, _inside in states:
            if index >= end:
                continue
            atom = atoms[index]
            if atom.kind == "dirs":
                # Inside `(.*/)`: any character stays inside; a slash may also end it.
                nxt.add((index, True))
                if c == "/":
                    nxt.add((index + 1, False))
            elif atom.kind == "any":
                nxt.add((index, False))
            elif atom.kind == "star":
                if c != "/":
                    nxt.add((index, False))
            elif atom.accepts(c):
                nxt.add((index + 1, False))
                if atom.quant == "+":
                    nxt.add((index, False))
        if not nxt:
            return False
        states = _closure(atoms, nxt)
    return (end, False) in states


def pattern_list(value: Any, where: str) -> list[str]:
    """A pattern or list of patterns, each checked to compile (bounded in count and length)."""
    if value is None:
        return []
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(v, str) for v in patterns):
        raise SettingsError(f"{where}: expected a pattern or a list of patterns, got {show(value)}")
    if len(patterns) > MAX_PATTERNS:
        raise SettingsError(f"{where}: {len(patterns)} patterns; allowed: at most {MAX_PATTERNS}")
    for pattern in patterns:
        try:
            compile_pattern(pattern.removeprefix("!"))
        except SettingsError as exc:
            raise SettingsError(f"{where}: {exc}") from None
    return list(patterns)


def matches_patterns(path: str, patterns: list[str]) -> bool:
    """Whether `path` is selected by the list: the last pattern that matches it decides."""
    selected = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if glob_match(pattern[1:] if negated else pattern, path):
            selected = not negated
    return selected

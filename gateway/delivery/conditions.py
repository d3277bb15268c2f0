"""Which records a webhook wants: `when` conditions (AND) over record fields."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from gateway.config import Condition

_MISSING = object()


def lookup(record: Any, path: str) -> Any:
    """Follow a dotted path through dicts and lists; _MISSING when absent."""
    value = record
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _num(v: Any) -> int | float | None:
    """A field as a number, or None. Whole numbers stay ints: as floats, two 20-digit
    ICCIDs that differ in their last digit would compare equal."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    digits = v.strip().lstrip("+-") if isinstance(v, str) else ""
    if digits.isascii() and digits.isdigit():
        try:
            return int(v)
        except ValueError:  # beyond int's digit limit
            return None
    if isinstance(v, float | str):
        try:
            return float(v)
        except (ValueError, OverflowError):  # not a number, or an int beyond a float's range
            return None
    return None


def _unordered(v: Any) -> bool:
    return v is None or isinstance(v, bool | dict | list)


def _text(v: Any) -> str:
    """A field as text for text comparisons; never raises (an int too long for str())."""
    if isinstance(v, str):
        return v
    try:
        return str(v)
    except ValueError:
        return hex(v) if isinstance(v, int) else repr(v)


def _cmp(op: str, a: Any, b: Any) -> bool:
    na, nb = _num(a), _num(b)
    if na is not None and nb is not None:
        x: Any = na
        y: Any = nb
    elif op in ("==", "!="):
        x, y = a if isinstance(a, str | bool) or a is None else _text(a), b
        if isinstance(y, str) and not isinstance(x, str):
            x = _text(x)
    elif _unordered(a) or _unordered(b):
        return False  # null, true/false, lists and objects have no order
    else:
        x, y = _text(a), _text(b)
    if op == "==":
        return bool(x == y)
    if op == "!=":
        return bool(x != y)
    if op == ">":
        return bool(x > y)
    if op == ">=":
        return bool(x >= y)
    if op == "<":
        return bool(x < y)
    return bool(x <= y)


def compile_condition(cond: Condition) -> Callable[[Callable[[str], Any]], bool]:
    """A predicate over a field getter; a missing field never matches (not even !=)."""
    op, want, name = cond.op, cond.value, cond.field
    pattern = re.compile(str(want)) if op == "regex" else None

    def check(get: Callable[[str], Any]) -> bool:
        have = get(name)
        if have is _MISSING:
            return False
        if op == "contains":
            if isinstance(have, list):
                return want in have
            if isinstance(have, dict):
                return str(want) in have
            return str(want) in _text(have)
        if op == "startswith":
            return _text(have).startswith(str(want))
        if op == "regex":
            assert pattern is not None
            return pattern.search(_text(have)) is not None
        if op == "in":
            return any(_cmp("==", have, w) for w in want)
        return _cmp(op, have, want)

    return check


class Filter:
    """AND of compiled conditions; an empty filter matches everything."""

    def __init__(self, conditions: Sequence[Condition]) -> None:
        self._checks = [compile_condition(c) for c in conditions]
        self.empty = not self._checks

    def __call__(self, get: Callable[[str], Any]) -> bool:
        return all(check(get) for check in self._checks)


MISSING = _MISSING

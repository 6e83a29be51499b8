"""Frozen copies of JSON-like data (a config, a list parameter) for an immutable, hashable plan: they
read as the dict and list they copy (isinstance, ==, repr, json.dumps), and refuse every change."""

from __future__ import annotations

import copy
from typing import Any, NoReturn


def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(f"a plan's {type(self).__name__} cannot be changed: it is part of an immutable plan")


class FrozenDict(dict):
    """A dict that cannot change and hashes as its items (a plan's config, its nested objects)."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict) -> FrozenDict:
        return self


class FrozenList(list):
    """A list that cannot change and hashes as its items (a list in a config, a list parameter)."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = clear = extend = insert = pop = remove = reverse = sort = _refuse

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self))

    def __reduce__(self):
        return (FrozenList, (list(self),))

    def __copy__(self) -> FrozenList:
        return self

    def __deepcopy__(self, memo: dict) -> FrozenList:
        return self


def freeze(v: Any) -> Any:
    """A deep, frozen copy of `v`: dicts and lists become FrozenDict and FrozenList, tuples keep their
    type with frozen items; strings, numbers and other immutable leaves are shared; anything else is
    deep-copied (a caller's later change never reaches the copy)."""
    if isinstance(v, (FrozenDict, FrozenList)) or v is None or isinstance(v, (str, int, float, bytes)):
        return v
    if isinstance(v, dict):
        return FrozenDict((k, freeze(x)) for k, x in v.items())
    if isinstance(v, list):
        return FrozenList(freeze(x) for x in v)
    if type(v) is tuple:
        return tuple(freeze(x) for x in v)
    return copy.deepcopy(v)


def thaw(v: Any) -> Any:
    """A plain copy of frozen data: FrozenDict and FrozenList as dict and list, for what is handed
    out of the plan to be used (or shown in a message) as the caller's own data was. Anything else
    is returned as it is."""
    if isinstance(v, FrozenDict):
        return {k: thaw(x) for k, x in v.items()}
    if isinstance(v, FrozenList):
        return [thaw(x) for x in v]
    if type(v) is tuple:
        return tuple(thaw(x) for x in v)
    return v

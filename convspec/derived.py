"""Tables derived from an immutable plan (its match regexes, evaluated parameters, block runs, its
inverse): made on first use and held here, beside the plan, bounded, never written into it. The one
owner of a plan's runtime data; a plan's tables go when the plan does."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

MAX_TABLES = 4096  # derived tables held per plan; the oldest go first

_tables: dict[int, OrderedDict[Hashable, Any]] = {}
_lock = threading.RLock()  # a finalizer (_forget) may run inside, when a collection frees a plan


def derived(plan: object, key: Hashable, make: Callable[[], T]) -> T:
    """The table `key` of `plan`, made by `make()` the first time it is asked for (and again if it
    was evicted). `make` runs outside the lock: it may ask for other tables of the same plan."""
    tables = _tables.get(id(plan))
    if tables is not None:
        try:
            value = tables[key]
        except KeyError:
            pass
        else:
            return value
    value = make()
    evicted = None
    with _lock:
        tables = _tables.get(id(plan))
        if tables is None:
            tables = _tables[id(plan)] = OrderedDict()
            weakref.finalize(plan, _forget, id(plan), tables)
        tables[key] = value
        if len(tables) > MAX_TABLES:
            evicted = tables.popitem(last=False)
    del evicted  # outside the lock: freeing a table (an inverse plan) may run finalizers
    return value


def held(plan: object) -> int:
    """How many tables are held for `plan` (for tests of the bound)."""
    return len(_tables.get(id(plan), ()))


def _forget(plan_id: int, tables: OrderedDict) -> None:
    with _lock:
        if _tables.get(plan_id) is tables:
            del _tables[plan_id]

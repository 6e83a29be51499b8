"""Many keys written once: numbers that vary become ranges, `model.layers.{0..31}.mlp.experts.{0..7}.w1.weight`."""

from __future__ import annotations

import re
from collections.abc import Iterable

_ANY_NUMBER = re.compile(r"(\d+)")
_SEGMENT_NUMBER = re.compile(r"(?<![^.])(\d+)(?![^.])")


def number_ranges(values: Iterable[str]) -> str:
    """{"0", "1", "2", "5"} -> `{0..2,5}`; numbers with leading zeros are listed as written."""
    vals = sorted(set(values), key=lambda v: (len(v), v))
    if len(vals) == 1:
        return vals[0]
    if any(v != str(int(v)) for v in vals):
        return "{" + ",".join(vals) + "}"
    nums, runs = sorted(int(v) for v in vals), []
    start = prev = nums[0]
    for n in [*nums[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        runs.append(
            str(start) if start == prev else f"{start},{prev}" if prev == start + 1 else f"{start}..{prev}"
        )
        if n is not None:
            start = prev = n
    return "{" + ",".join(runs) + "}"


def compact_keys(keys: Iterable[str], segments: bool = False) -> list[tuple[str, list[str]]]:
    """Keys that differ only in numbers folded into templates (`experts.{0..63}.w1.weight`), each
    with the keys it stands for, in first-seen order: a 64-expert group reads as one line. With
    `segments`, only whole-segment numbers fold (`w1` and `w3` stay apart)."""
    split = _SEGMENT_NUMBER if segments else _ANY_NUMBER
    skeletons: dict[tuple[str, ...], list[tuple[tuple[str, ...], str]]] = {}
    for k in keys:
        parts = split.split(k)
        skeletons.setdefault(tuple(parts[0::2]), []).append((tuple(parts[1::2]), k))
    out: list[tuple[str, list[str]]] = []
    for skel, items in skeletons.items():
        out.extend(_fold(skel, items))
    return out


def _fold(skel: tuple[str, ...], items: list[tuple[tuple[str, ...], str]]) -> list[tuple[str, list[str]]]:
    """One skeleton's keys: a product of number ranges is one template; otherwise split on the
    first number that varies and fold each part."""
    n = len(items[0][0])
    seen = [sorted({nums[i] for nums, _ in items}, key=lambda v: (len(v), v)) for i in range(n)]
    varying = [i for i in range(n) if len(seen[i]) > 1]
    product = 1
    for i in varying:
        product *= len(seen[i])
    if product == len({nums for nums, _ in items}):
        text = [skel[0]]
        for i in range(n):
            text.append(number_ranges(seen[i]) if i in varying else seen[i][0])
            text.append(skel[i + 1])
        return [("".join(text), [k for _, k in items])]
    first = varying[0]
    out = []
    for v in seen[first]:
        out.extend(_fold(skel, [(nums, k) for nums, k in items if nums[first] == v]))
    return out

"""The dtypes convspec handles, by the names specs and headers use. A leaf module, and torch-free:
names and sizes are plain data, and the torch dtypes are looked up on first use, so reading
headers and binding a plan (`convspec compile --against`) never import torch."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e8m0fnu": 1,  # a power of two 2 ** (byte - 127), 0xFF NaN: MXFP8/DeepSeek E8M0 scales
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


class _TorchDtypes(Mapping):
    """name -> torch.dtype; iterating or testing membership does not import torch."""

    def __getitem__(self, name: str) -> Any:
        if name not in ITEMSIZE:
            raise KeyError(name)
        import torch

        return getattr(torch, name)

    def __iter__(self) -> Iterator[str]:
        return iter(ITEMSIZE)

    def __len__(self) -> int:
        return len(ITEMSIZE)

    def __contains__(self, name: object) -> bool:
        return name in ITEMSIZE


DTYPES: Mapping[str, Any] = _TorchDtypes()


def check_dtype(name: str | None) -> None:
    """A dtype a user names (`--dtype`) is one convspec handles; else an error with the names."""
    if name is None or name in ITEMSIZE:
        return
    import difflib

    from .errors import ConvspecError

    close = difflib.get_close_matches(name, list(ITEMSIZE), 1)
    raise ConvspecError(
        f"unknown dtype {name!r}",
        hint=(f"did you mean {close[0]!r}? " if close else "") + f"dtypes: {', '.join(ITEMSIZE)}",
    )

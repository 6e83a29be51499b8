"""Spec front ends: `.cspec` (DSL) and `.yaml`, both parsed into the same Spec IR."""

from __future__ import annotations

from .model import Spec
from .parse import parse_dsl
from .yaml_front import parse_yaml


def parse_spec(text: str, file: str | None = None, syntax: str | None = None) -> Spec:
    """Parse spec text; the syntax follows the file suffix (.yaml/.yml or .cspec) unless given."""
    if syntax is None:
        syntax = "yaml" if file and file.endswith((".yaml", ".yml")) else "cspec"
    return parse_yaml(text, file) if syntax == "yaml" else parse_dsl(text, file)


__all__ = ["Spec", "parse_dsl", "parse_spec", "parse_yaml"]

"""convspec: declarative conversion specs for model checkpoints, compiled to exact, invertible plans."""

from __future__ import annotations

from .api import compile, convert, load_spec, spec_names
from .bind import BoundPlan
from .compile.plan import Plan
from .errors import (
    BindError,
    CompileError,
    ConfigError,
    ConvspecError,
    NotInvertibleError,
    PlanError,
    SpecError,
    SpecNotFoundError,
    SpecSyntaxError,
    SpecValidationError,
)
from .spec import Spec

__all__ = [
    "BindError",
    "BoundPlan",
    "CompileError",
    "ConfigError",
    "ConvspecError",
    "NotInvertibleError",
    "Plan",
    "PlanError",
    "Spec",
    "SpecError",
    "SpecNotFoundError",
    "SpecSyntaxError",
    "SpecValidationError",
    "compile",
    "convert",
    "load_spec",
    "spec_names",
]

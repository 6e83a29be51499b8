"""convspec: declarative conversion specs for model checkpoints, compiled to exact, invertible plans."""

from __future__ import annotations

import warnings

from . import runtime  # noqa: F401 - installs what a Plan's conveniences (plan.bind, ...) call
from .api import compile, convert, load_spec, spec_names
from .bind import BoundPlan
from .compile.plan import Plan
from .errors import (
    BindError,
    CompileError,
    ConfigError,
    ConvspecError,
    DeviceError,
    NotInvertibleError,
    PlanError,
    SpecError,
    SpecNotFoundError,
    SpecSyntaxError,
    SpecValidationError,
    TransformersMissing,
)
from .spec import Spec
from .synthesis import infer

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it

# torch warns on import where numpy is not installed; convspec never needs numpy (docs/decisions.md).
# Importing convspec imports no torch, so this is in place before torch is first imported.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__all__ = [
    "infer",
    "__version__",
    "BindError",
    "BoundPlan",
    "CompileError",
    "ConfigError",
    "ConvspecError",
    "DeviceError",
    "LoadError",
    "LoadReport",
    "NotInvertibleError",
    "Plan",
    "PlanError",
    "Spec",
    "SpecError",
    "SpecNotFoundError",
    "SpecSyntaxError",
    "SpecValidationError",
    "TransformersMissing",
    "compile",
    "convert",
    "load_spec",
    "spec_names",
]


def __getattr__(name: str):
    """`LoadReport` and `LoadError` on first use: their module imports torch, and `import convspec`
    does not (reading headers and binding plans never need it)."""
    if name in ("LoadReport", "LoadError"):
        from . import load_into

        return getattr(load_into, name)
    raise AttributeError(f"module 'convspec' has no attribute {name!r}")

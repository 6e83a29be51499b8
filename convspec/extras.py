"""Optional dependencies, each installed by an extra of the package: a part that needs one it lacks
raises a typed error naming the extra, not an ImportError from deep inside."""

from __future__ import annotations

from types import ModuleType

from .errors import TransformersMissing

TRANSFORMERS_HINT = "pip install 'convspec[transformers]'"


def require_transformers(what: str) -> ModuleType:
    """The transformers module, or TransformersMissing saying that `what` needs it and how to get it."""
    try:
        import transformers
    except ImportError as exc:
        raise TransformersMissing(
            f"{what} needs transformers, which is not installed ({exc})", hint=TRANSFORMERS_HINT
        ) from None
    return transformers

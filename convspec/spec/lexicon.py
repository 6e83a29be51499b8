"""Spellings that spec text shares between the grammar, both front ends and the JSON schema, so they agree."""

from __future__ import annotations

import re

# An include prefix: literal key text, dot-separated segments (`model.language_model`).
# grammar.lark's PREFIX terminal is this pattern (parse.py puts it in when it loads the grammar).
DOTTED_PREFIX = r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*"
_DOTTED_PREFIX = re.compile(DOTTED_PREFIX)


def is_dotted_prefix(text: str) -> bool:
    """Whether `text` is a whole include prefix (the empty prefix, for every key, is the caller's to allow)."""
    return _DOTTED_PREFIX.fullmatch(text) is not None

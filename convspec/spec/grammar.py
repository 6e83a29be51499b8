"""The one lark parser of the spec language, built on first use and its tables kept in a per-user cache.

Building the LALR tables from grammar.lark costs about 0.1 s, which every process that compiled a
spec paid; lark's own cache loads them back in about 0.01 s. The cache file lives in a private folder
of the user's cache directory (never a shared temporary folder: lark's cache is a pickle), and where
no such folder can be had the parser is built in memory as before.
"""

from __future__ import annotations

import os
from functools import cache
from importlib import resources

import lark
from lark import Lark

from .lexicon import DOTTED_PREFIX

START = ["spec", "template", "expr"]


@cache
def parser() -> Lark:
    """The parser for the three start rules: `spec` (the DSL), `template` and `expr` (both front ends)."""
    grammar = resources.files("convspec.spec").joinpath("grammar.lark").read_text()
    grammar = grammar.replace("$DOTTED_PREFIX", DOTTED_PREFIX)
    options = dict(start=START, parser="lalr", propagate_positions=True, maybe_placeholders=True)
    cache_file = _cache_file()
    return Lark(grammar, **options, cache=cache_file) if cache_file else Lark(grammar, **options)


def _cache_file() -> str | None:
    """`~/.cache/convspec/grammar-LARKVERSION.lark-cache`, in a folder only this user can write; else None.

    lark keys the file's content by a hash of the grammar, its options and the Python and lark
    versions, and rebuilds (and rewrites) a stale or unreadable file."""
    home = os.path.expanduser("~")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    if not os.path.isabs(base):
        return None  # no home to speak of: never a folder relative to where the command runs
    folder = os.path.join(base, "convspec")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.stat(folder)
    except OSError:
        return None
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        return None  # someone else could write the pickle lark would load
    return os.path.join(folder, f"grammar-{lark.__version__}.lark-cache")

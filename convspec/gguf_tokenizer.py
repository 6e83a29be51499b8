"""The tokenizer a GGUF file holds, written beside the converted weights as Hugging Face tokenizer
files: transformers' own GGUF tokenizer conversion (`AutoTokenizer.from_pretrained(dir, gguf_file=)`),
so the folder loads whole. Optional: without transformers the metadata is still kept whole in
gguf_metadata.json, and the conversion says so."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from .io.gguf_checkpoint import GgufCheckpoint

TOKENIZER_KEY = "tokenizer.ggml.model"


def write_tokenizer(ckpt: GgufCheckpoint, dst: Path) -> str | None:
    """Write the file's tokenizer into `dst` (tokenizer.json, tokenizer_config.json); None when done or
    when the file has none, else a note saying why it was not written."""
    if TOKENIZER_KEY not in ckpt.header.metadata:
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return (
            f"{ckpt.src.name}'s tokenizer was not written as tokenizer.json (transformers is not installed: "
            "pip install 'convspec[transformers]'); gguf_metadata.json holds it"
        )
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stderr(quiet), _no_bars():
            tokenizer = AutoTokenizer.from_pretrained(str(ckpt.src.parent), gguf_file=ckpt.src.name)
            tokenizer.save_pretrained(str(dst))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the weights are still right
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return f"{ckpt.src.name}'s tokenizer was not written: transformers could not build it ({first})"
    return None


@contextlib.contextmanager
def _no_bars():
    """transformers' GGUF reader draws a progress bar per load: none here."""
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old

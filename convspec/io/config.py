"""Model configs: a dict, a config.json path, or a transformers config object -> a plain dict."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .sidefile import MAX_CONFIG_BYTES, load_json, regular_file


def load_config(config: Any) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    data = load_json(path, MAX_CONFIG_BYTES, ConfigError, "config file")  # capped, strict, never blocks
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a JSON object, not {type(data).__name__}")
    return data


def checkpoint_config(directory: str | Path) -> Path | None:
    """A checkpoint directory's config.json, or None when it has none. Anything else by that name (a
    directory, a pipe, a broken or looping link, a link out of the checkpoint) is an error naming it,
    never a checkpoint read as if it had no config."""
    from .safetensors import check_inside

    directory = Path(directory)
    path = directory / "config.json"
    if not os.path.lexists(path):
        return None
    if path.is_symlink():
        check_inside(directory, path, path)
    regular_file(path, ConfigError, "config file")
    return path

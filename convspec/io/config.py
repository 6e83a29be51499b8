"""Model configs: a dict, a config.json path, or a transformers config object -> a plain dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def load_config(config: Any) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # an int past 4300 digits; nesting past the stack
        raise ConfigError(f"{path}: invalid JSON ({str(exc)[:200] or 'nested too deeply'})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a JSON object, not {type(data).__name__}")
    return data

"""A layout ({key: (shape, dtype)}) from what a user names: a checkpoint's headers, a layout JSON file
(`{"model.embed.weight": [[32000, 4096], "bfloat16"]}`), or a transformers model type or class built
on the meta device from its default config or a given one. What `convspec infer` compares."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError, ConvspecError
from .synthesis import Layout, layout_of


def read_layout(name: str | Path, config: str | Path | None = None) -> Layout:
    """The layout `name` stands for: a `.json` layout file or a checkpoint (`synthesis.layout_of`),
    or a transformers model type or class (`mixtral`, `MixtralForCausalLM`) on the meta device,
    built from `config` (a config.json) or its default config."""
    path = Path(name)
    if path.exists() or "/" in str(name) or path.suffix:
        return layout_of(path)
    return model_layout(str(name), config)


def model_layout(key: str, config: str | Path | None = None) -> Layout:
    """The state_dict layout of a transformers model type or class, built on the meta device."""
    from .extras import require_transformers

    require_transformers("a model type as a layout")
    import torch

    from .hf.mapping import meta_model, state_layout
    from .io.config import load_config

    values = load_config(config) if config is not None else {}
    try:
        model = meta_model(key, config=values)
    except ConvspecError:  # transformers has no model class by that name
        raise ConvspecError(
            f"{key}: not a checkpoint, a layout .json, or a transformers model type or class",
            hint="name a checkpoint directory, a layout file, or e.g. `mixtral` / `MixtralForCausalLM`",
        ) from None
    except Exception as exc:  # noqa: BLE001 - transformers' own error for this config
        raise ConfigError(f"transformers cannot build {key} from this config: {exc}"[:300]) from None
    dtype = values.get("torch_dtype") or values.get("dtype")  # what a checkpoint of it stores
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        model = model.to(getattr(torch, dtype))
    return state_layout(model.state_dict())

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
    import contextlib
    import io
    import warnings

    from .extras import require_transformers

    require_transformers("a model type as a layout")
    import torch

    from .hf.mapping import model_class
    from .io.config import load_config

    cls, config_cls = model_class(key)
    if cls is None or config_cls is None:
        raise ConvspecError(
            f"{key}: not a checkpoint, a layout .json, or a transformers model type or class",
            hint="name a checkpoint directory, a layout file, or e.g. `mixtral` / `MixtralForCausalLM`",
        )
    values = load_config(config) if config is not None else {}
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            cfg = config_cls(**{k: v for k, v in values.items() if k != "model_type"})
            with torch.device("meta"):
                model = cls(cfg)
            dtype = values.get("torch_dtype") or values.get("dtype")  # what a checkpoint of it stores
            if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
                model = model.to(getattr(torch, dtype))
        except Exception as exc:  # noqa: BLE001 - transformers' own error for this config
            raise ConfigError(f"transformers cannot build {key} from this config: {exc}"[:300]) from None
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}

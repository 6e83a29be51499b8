"""Pickle checkpoints (`.bin`, `.pt`, `.pth`), read only when the user asks: torch.load with
weights_only=True, one shard at a time, rewritten as safetensors so the rest of convspec never sees
a pickle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .safetensors import PICKLE_SUFFIXES, CheckpointError, check_inside, index_files

PICKLE_INDEX = "pytorch_model.bin.index.json"


def pickle_files(src: str | Path) -> list[Path]:
    """The pickle shards of a checkpoint directory (by its index when there is one), or one file;
    checked as the safetensors reader checks its shards: each inside the directory."""
    src = Path(src)
    if src.is_file():
        return [src] if src.name.endswith(PICKLE_SUFFIXES) else []
    index = src / PICKLE_INDEX
    if index.is_file():
        return index_files(src, index)
    files = sorted(p for p in src.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    for f in files:
        check_inside(src, f, f)
    return files


def safetensors_names(files: list[Path]) -> list[str]:
    """The name `transcode` gives the safetensors copy of each pickle shard, in order."""
    if len(files) == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]


def transcode(src: str | Path, out: str | Path) -> Path:
    """Rewrite a pickle checkpoint as safetensors in `out` (one shard per pickle shard, an index when
    there are several, the other files copied). Each shard is loaded with weights_only=True: a pickle
    that would run code or build anything but tensors is refused by torch, and so here."""
    import torch

    from .writer import write_file

    src, out = Path(src), Path(out)
    files = pickle_files(src)
    if not files:
        raise CheckpointError(f"{src}: no pickle checkpoint files ({', '.join(PICKLE_SUFFIXES)})")
    out.mkdir(parents=True, exist_ok=True)
    names = safetensors_names(files)
    weight_map: dict[str, str] = {}
    for i, f in enumerate(files):
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds; all mean "not a safe weights pickle"
            raise CheckpointError(
                f"{f}: not loadable as weights only ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                hint="convspec reads pickles with torch.load(weights_only=True) and never runs their code",
            ) from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()
        ):
            raise CheckpointError(f"{f}: not a state dict of tensors")
        name = names[i]
        dup = [k for k in sd if k in weight_map]
        if dup:
            raise CheckpointError(f"tensor {dup[0]} appears in both {weight_map[dup[0]]} and {f.name}")
        # tensors sharing storage (tied weights) are written once per key
        write_file(out / name, sd)
        weight_map.update(dict.fromkeys(sd, name))
        del sd
    if len(files) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if src.is_dir():
        for p in src.iterdir():
            if p.is_file() and not p.name.endswith(PICKLE_SUFFIXES) and p.name != PICKLE_INDEX:
                if p.is_symlink():  # as the safetensors reader: never a file from elsewhere
                    check_inside(src, p, p)
                shutil.copy2(p, out / p.name)
    return out

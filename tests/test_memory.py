"""Bounded memory: converting a checkpoint many times larger than its largest group keeps peak RSS
growth near the largest group (measured with resource.getrusage in a fresh subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

MiB = 1 << 20

CHILD = r"""
import json, resource, sys
import torch, convspec
from convspec.streaming import convert_checkpoint
plan = convspec.compile("mixtral")
# the one-layer copy has the same largest group: its peak is the baseline the 24-layer run must not pass by much
convert_checkpoint(plan, sys.argv[1], sys.argv[3] + "-warm")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
convert_checkpoint(plan, sys.argv[2], sys.argv[3], max_shard_size="16MB")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak}))
"""


def _checkpoint(d: Path, layers: int, experts: int = 8, inter: int = 256, hidden: int = 256) -> int:
    """Per layer: gate_up group = 2 x experts x inter x hidden x 4 bytes."""
    d.mkdir(parents=True)
    sd = {}
    for layer in range(layers):
        for e in range(experts):
            for w, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
                sd[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"] = torch.full(
                    shape, float(e)
                )
    save_file(sd, str(d / "model.safetensors"))
    return 2 * experts * inter * hidden * 4


def test_peak_rss_growth_is_bounded_by_the_largest_group(tmp_path):
    group = _checkpoint(tmp_path / "one", layers=1)
    _checkpoint(tmp_path / "big", layers=24)
    total = sum(f.stat().st_size for f in (tmp_path / "big").iterdir())
    assert total > 30 * group  # the checkpoint is far larger than any group
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "one"), str(tmp_path / "big"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
    )
    m = json.loads(r.stdout)
    growth = m["peak"] - m["base"]
    # inputs + stacked + fused output of one group, plus slack for the writer's buffers
    assert growth < 4 * group + 32 * MiB, (
        f"peak grew {growth / MiB:.0f} MiB for a {total / MiB:.0f} MiB checkpoint"
    )

"""torch.distributed.checkpoint both ways on more architectures than Mixtral (issue 16): for tiny
Qwen2-MoE, DeepSeek-V3, a fused-QKV split with GQA and a rope-permuted fused wqkv, `dcp.load`
through `ConvspecReader` gives what `plan.load` gives, and `dcp.save` through `ConvspecWriter` writes
the files `plan.inverse().save` writes, byte for byte. One process: the multi-rank runs are
tests/test_dcp_reader.py and tests/test_dcp_writer.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers.tiny_checkpoints import ARCHITECTURES

import convspec
from convspec.integrations.dcp import ConvspecReader, ConvspecWriter

SHARD = 1024  # bytes: several files


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_dcp_loads_and_saves_each_architecture_as_plan_load_and_save_do(name, tmp_path):
    spec, make = ARCHITECTURES[name]
    src = make(tmp_path / "src")
    plan = convspec.compile(spec, config=f"{src}/config.json")
    want = plan.load(src)
    got = {k: torch.empty_like(t) for k, t in want.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ...": one process, as meant
        reader = ConvspecReader(plan, src)
        dcp.load(got, storage_reader=reader, no_dist=True)
        assert reader.stats.wider == 0
        assert reader.stats.bytes == sum(t.numel() * t.element_size() for t in want.values())
        assert [k for k in want if not got[k].equal(want[k])] == []

        plan.inverse().save(dict(want), tmp_path / "ref", max_shard_size=SHARD)
        dcp.save(got, storage_writer=ConvspecWriter(plan, tmp_path / "saved", max_shard_size=SHARD))
    ref = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert len(ref) > 2 and sorted(p.name for p in (tmp_path / "saved").iterdir()) == ref
    assert [
        n for n in ref if (tmp_path / "ref" / n).read_bytes() != (tmp_path / "saved" / n).read_bytes()
    ] == []

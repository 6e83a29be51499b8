"""Block plans: groups that only move contiguous blocks run as byte ranges, and give the same bits
as running their ops with torch, loading into memory and writing file to file alike."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from helpers.processes import cli_without_torch
from helpers.tensors import assert_same_state, random_tensor
from safetensors.torch import load_file, save_file
from test_builtin_specs import CONVERT_SPECS, SMALL_CONFIG, _group_layout
from test_plan import moe_layout, moe_state

import convspec
import convspec.blocks
import convspec.streaming
from convspec.blocks import block_runs
from convspec.io import writer
from convspec.ops import TensorInfo
from convspec.run import run_group
from convspec.spec import parse_spec
from convspec.streaming import convert_checkpoint


@pytest.fixture
def every_group_moves_blocks(monkeypatch):
    """Tests use tiny tensors: take the block path whatever the size of the runs."""
    monkeypatch.setattr(convspec.blocks, "MIN_AVERAGE_RUN", 0)


def _assemble(runs, state, info) -> torch.Tensor:
    out = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
    view = out.reshape(-1).view(torch.uint8)
    for src, a, b, n in runs:
        view[b : b + n] = state[src].reshape(-1).view(torch.uint8)[a : a + n]
    return out


def _check_groups(plan, state) -> int:
    """Every block group's outputs, made from byte runs, against the ops run with torch."""
    bound = plan.bind({k: TensorInfo.of(t) for k, t in state.items()})
    moved = 0
    for g in bound.groups:
        runs = block_runs(bound, g)
        if runs is None:
            continue
        ref = run_group(bound, g, state)
        assert_same_state({k: _assemble(runs[k], state, i) for k, i in g.outputs.items()}, ref)
        moved += 1
    return moved


@pytest.mark.parametrize("name", CONVERT_SPECS)
def test_block_runs_give_the_ops_bits_forward_and_back(name, every_group_moves_blocks):
    plan = convspec.compile(name, SMALL_CONFIG)
    for rule in plan.rules:
        if rule.kind != "convert":
            continue
        for shape in ((12, 6), (2, 12, 6)):
            layout = _group_layout(plan, rule, shape)
            try:
                plan.bind(layout)
                break
            except convspec.BindError:
                continue
        else:
            continue
        state = {k: random_tensor(s, d, i) for i, (k, (s, d)) in enumerate(layout.items())}
        _check_groups(plan, state)
        if plan.inverse_rules is not None and not plan.lossy:
            _check_groups(plan.inverse(), plan.apply(state))


def test_moe_experts_are_block_moves_and_attention_maths_is_not(every_group_moves_blocks):
    plan = convspec.compile("mixtral")
    state = moe_state(moe_layout(layers=2, experts=3, dtype="float32"))
    assert _check_groups(plan, state) == 4  # gate_up and down, per layer
    assert _check_groups(plan.inverse(), plan.apply(state)) == 4  # and back: unstack, chunk
    rope = convspec.compile(
        parse_spec(
            "spec r\nconvert w = {p:path}.wq.weight -> {p}.q_proj.weight = permute_rope(w, heads=2)\n",
            "r.cspec",
        )
    )
    q = {"layers.0.wq.weight": torch.randn(8, 8)}  # permute_rope: computed, not moved
    bound = rope.bind({k: TensorInfo.of(t) for k, t in q.items()})
    assert all(block_runs(bound, g) is None for g in bound.groups)


def test_small_runs_are_computed(monkeypatch):
    """Below the average run size, one syscall per run costs more than torch's copies."""
    plan = convspec.compile("mixtral")
    state = moe_state(moe_layout(layers=1, experts=2, dtype="float32"))
    bound = plan.bind({k: TensorInfo.of(t) for k, t in state.items()})
    assert all(block_runs(bound, g) is None for g in bound.groups)


def _checkpoint(tmp_path, layers=2, experts=4):
    state = moe_state(moe_layout(layers=layers, experts=experts, inter=16, hidden=8, dtype="bfloat16"))
    src = tmp_path / "src"
    src.mkdir()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[: len(keys) // 2]}, str(src / "a.safetensors"))
    save_file({k: state[k] for k in keys[len(keys) // 2 :]}, str(src / "b.safetensors"))
    return src, state


def test_load_and_convert_move_blocks_bit_exact(tmp_path, every_group_moves_blocks):
    """Loading reads runs straight into the outputs; converting copies them file to file; both across
    two source files, and back with the inverse."""
    plan = convspec.compile("mixtral")
    src, state = _checkpoint(tmp_path)
    expected = plan.apply(state)
    assert_same_state(plan.load(src), expected)
    convert_checkpoint(plan, src, tmp_path / "out", max_shard_size="2KB")
    written = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(str(f)))
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    assert_same_state(written, expected)
    convert_checkpoint(plan.inverse(), tmp_path / "out", tmp_path / "back")
    assert_same_state(load_file(str(tmp_path / "back" / "model.safetensors")), state)


def test_a_cast_is_computed_not_copied(tmp_path, every_group_moves_blocks):
    plan = convspec.compile("mixtral")
    src, state = _checkpoint(tmp_path, layers=1)
    convert_checkpoint(plan, src, tmp_path / "out", dtype="float32")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in written.values())
    assert_same_state(written, {k: v.float() for k, v in plan.apply(state).items()})


def test_copies_fall_back_to_reads_and_writes(tmp_path, monkeypatch, every_group_moves_blocks):
    """Where the kernel cannot copy between the two files (another filesystem), bytes go through a buffer."""

    def refuse(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    monkeypatch.setattr(writer, "_COPY_CHUNK", 100)  # several buffer fills per run
    plan = convspec.compile("mixtral")
    src, state = _checkpoint(tmp_path)
    convert_checkpoint(plan, src, tmp_path / "out")
    assert_same_state(load_file(str(tmp_path / "out" / "model.safetensors")), plan.apply(state))


def test_a_conversion_of_copies_only_never_imports_torch(tmp_path):
    """Experts large enough to move as blocks, attention renamed: `convspec convert` is file copies,
    and does not pay torch's import time; the output is the same as converting with torch."""
    state = moe_state(moe_layout(layers=2, experts=4, inter=128, hidden=256, dtype="bfloat16"))
    src = tmp_path / "src"
    src.mkdir()
    save_file(state, str(src / "model.safetensors"))
    last, output = cli_without_torch(["convert", "mixtral", str(src), str(tmp_path / "out"), "--quiet"])
    assert last == "NO-TORCH 0", output
    plan = convspec.compile("mixtral")
    assert_same_state(load_file(str(tmp_path / "out" / "model.safetensors")), plan.apply(state))


def test_flushing_behind_the_writer_keeps_output_and_failures_clean(tmp_path, monkeypatch):
    """The background fdatasync after every few bytes: the output is the same, and a failure midway
    waits for the flush in flight before the file closes and leaves nothing behind."""
    import convspec.run

    monkeypatch.setattr(writer, "FLUSH_EVERY", 1)
    plan = convspec.compile("mixtral")
    src, state = _checkpoint(tmp_path)
    convert_checkpoint(plan, src, tmp_path / "out", max_shard_size="2KB")
    written = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(str(f)))
    assert_same_state(written, plan.apply(state))
    real, calls = convspec.run.run_group, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real(*args)

    monkeypatch.setattr(convspec.run, "run_group", failing)
    # the groups compute (a file-to-file conversion copies every block move, whatever its runs)
    monkeypatch.setattr(convspec.streaming, "block_runs", lambda *a: None)
    with pytest.raises(RuntimeError, match="injected failure"):
        convert_checkpoint(plan, src, tmp_path / "failed", max_shard_size="2KB")
    assert not (tmp_path / "failed").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

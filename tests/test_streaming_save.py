"""`streaming.save_state_dict`: the streamed `Plan.save` writes the same files, returns the same names,
raises the same errors, stays atomic, and holds one group's outputs at a time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import convspec
from convspec.errors import BindError, ConvspecError
from convspec.streaming import save_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from make_tiny_mixtral import make  # noqa: E402


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "tiny"
    make(d, layers=3, experts=5)
    plan = convspec.compile("mixtral")
    return plan, plan.load(d)


def _files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


@pytest.mark.parametrize("size", ["5GB", "40KB"])
def test_same_files_and_names_as_plan_save(loaded, tmp_path, size):
    plan, sd = loaded
    inverse = plan.inverse()
    names = inverse.save(sd, tmp_path / "saved", max_shard_size=size)
    streamed = save_state_dict(inverse, sd, tmp_path / "streamed", max_shard_size=size)
    assert streamed == names and (size == "5GB") == (len(names) == 1)
    assert _files(tmp_path / "streamed") == _files(tmp_path / "saved")


def _errors(save, sd, tmp_path: Path) -> list[tuple[type, str]]:
    """What a save raises for an existing destination, a bad size and a state dict that does not bind."""
    bad = {**sd, "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(5, 7, 32)}  # 7 rows: no halves
    cases = [(sd, "exists", {}), (sd, "bad-size", {"max_shard_size": "lots"}), (bad, "bad-bind", {})]
    out = []
    for state, name, kw in cases:
        with pytest.raises(ConvspecError) as exc:
            save(state, tmp_path / name, **kw)
        out.append((type(exc.value), str(exc.value)))
        assert name == "exists" or not (tmp_path / name).exists()
    return out


def test_same_errors_and_nothing_written(loaded, tmp_path):
    plan, sd = loaded
    inverse = plan.inverse()
    (tmp_path / "exists").mkdir()
    expected = _errors(inverse.save, sd, tmp_path)
    assert expected[2][0] is BindError
    assert _errors(lambda *a, **k: save_state_dict(inverse, *a, **k), sd, tmp_path) == expected
    assert list((tmp_path / "exists").iterdir()) == []


def test_overwrite_replaces(loaded, tmp_path):
    plan, sd = loaded
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    names = save_state_dict(plan.inverse(), sd, tmp_path / "out", overwrite=True)
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == names


def test_one_group_of_outputs_alive_at_a_time(loaded, tmp_path, monkeypatch):
    """Each group's outputs are freed once written: at most one group's are alive at a time."""
    import weakref

    from convspec import run

    plan, sd = loaded
    alive: list[weakref.ref] = []
    most = [0]
    real = run.run_group

    def spy(bound, group, tensors):
        most[0] = max(most[0], sum(r() is not None for r in alive))
        outs = real(bound, group, tensors)
        alive.extend(weakref.ref(t) for t in outs.values())
        return outs

    monkeypatch.setattr(run, "run_group", spy)
    save_state_dict(plan.inverse(), sd, tmp_path / "out")
    assert alive and most[0] == 0  # every earlier group's outputs were written and freed

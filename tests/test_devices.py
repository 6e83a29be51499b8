"""The device a user names (`--device`, `device=`) is checked before anything is read or written: an
unknown string, a device the machine lacks, or meta where data is needed is one DeviceError (exit 2
from the CLI), and nothing is left behind. cpu, a torch.device, and meta for shape-only loading work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import convspec
from convspec import DeviceError
from convspec.cli import main
from convspec.devices import check_device

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from make_tiny_mixtral import make  # noqa: E402

BAD = {
    "meta": "device 'meta' holds shapes, not data, and {needs}",
    "gpu": "unknown device 'gpu'",
    "cuda:": "unknown device 'cuda:'",
    "": "unknown device ''",
    "cuda:99": "device 'cuda:99' ",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "ckpt"
    make(d, layers=2, experts=4)
    return d


@pytest.fixture
def plain(monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")


def _tree(d: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else None for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("device", list(BAD), ids=lambda d: d or "empty")
@pytest.mark.parametrize("command", ["convert", "verify"])
def test_a_bad_device_is_one_message_exit_2_and_nothing_written(
    command, device, tiny, tmp_path, capsys, plain
):
    argv = [command, "mixtral", str(tiny), *([str(tmp_path / "out")] if command == "convert" else [])]
    before = _tree(tiny)
    assert main([*argv, "--device", device]) == 2
    out, err = capsys.readouterr()
    needs = "convert writes the data" if command == "convert" else "verify compares the data"
    assert out == "" and "Traceback" not in err
    assert err.splitlines()[0].startswith("error: " + BAD[device].format(needs=needs)), err
    assert len(err.splitlines()) == 2 and err.splitlines()[1].startswith("  hint: ")
    assert list(tmp_path.iterdir()) == [] and _tree(tiny) == before
    assert main([*argv, "--device", device, "--json"]) == 2
    error = json.loads(capsys.readouterr().err)["error"]
    assert error["type"] == "DeviceError" and error["hint"]


def test_cuda_on_a_machine_without_it(tiny, tmp_path, capsys, plain, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["convert", "mixtral", str(tiny), str(tmp_path / "out"), "--device", "cuda"]) == 2
    first, hint = capsys.readouterr().err.splitlines()
    assert first.startswith("error: device 'cuda' is not available: ")
    assert hint == "  hint: use a device this machine has: cpu"
    assert not (tmp_path / "out").exists()


def test_a_cuda_index_beyond_the_devices_there_are(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError) as e:
        check_device("cuda:2")
    assert (
        e.value.message
        == "device 'cuda:2' does not exist: this machine has 2 cuda device(s) (cuda:0 to cuda:1)"
    )
    assert e.value.hint == "use cuda or cuda:0 to cuda:1"


def test_cpu_in_every_spelling_and_meta_where_no_data_is_needed():
    assert check_device("cpu") == check_device("cpu:0") == check_device(torch.device("cpu")) == "cpu"
    assert check_device("meta") == check_device(torch.device("meta")) == "meta"
    with pytest.raises(DeviceError, match="holds shapes, not data, and it is needed"):
        check_device(torch.device("meta"), needs_data="it is needed")


def test_the_api_raises_device_error_and_writes_nothing(tiny, tmp_path):
    with pytest.raises(DeviceError, match="convert writes the data"):
        convspec.convert("mixtral", tiny, tmp_path / "out", device="meta")
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        convspec.convert("mixtral", tiny, tmp_path / "out", device="gpu", dry_run=True)
    plan = convspec.compile("mixtral", config=tiny / "config.json")
    with pytest.raises(DeviceError, match="verify compares the data"):
        from convspec.streaming import verify_checkpoint

        verify_checkpoint(plan, tiny, device="meta")
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        plan.load(tiny, device="gpu")
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        plan.load_into(torch.nn.Module(), tiny, device="gpu")
    assert list(tmp_path.iterdir()) == []


def test_the_device_is_checked_before_the_checkpoint_is_opened(tmp_path):
    plan = convspec.compile("mixtral")
    with pytest.raises(DeviceError):
        next(plan.stream(tmp_path / "no-such-checkpoint", device="gpu"))


def test_a_pickle_source_is_not_read_when_the_device_or_dtype_is_bad(
    tiny, tmp_path, monkeypatch, capsys, plain
):
    from convspec.io import pickled

    pk = tmp_path / "pk"
    pk.mkdir()
    torch.save({"x": torch.zeros(1)}, pk / "pytorch_model.bin")

    def never(*a, **k):
        raise AssertionError("the pickle was transcoded before the options were checked")

    monkeypatch.setattr(pickled, "transcode", never)
    assert (
        main(["convert", "mixtral", str(pk), str(tmp_path / "out"), "--allow-pickle", "--device", "meta"])
        == 2
    )
    assert main(["verify", "mixtral", str(pk), "--allow-pickle", "--device", "gpu"]) == 2
    assert (
        main(["convert", "mixtral", str(pk), str(tmp_path / "out"), "--allow-pickle", "--dtype", "f99"]) == 2
    )
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pk"]


def test_meta_loads_shapes_only_and_a_torch_device_converts_like_its_string(tiny, tmp_path):
    plan = convspec.compile("mixtral", config=tiny / "config.json")
    real = plan.load(tiny)
    shapes = plan.load(tiny, device=torch.device("meta"))
    assert {k: (t.shape, t.dtype) for k, t in shapes.items()} == {
        k: (t.shape, t.dtype) for k, t in real.items()
    }
    assert all(t.is_meta for t in shapes.values())
    a, b = tmp_path / "a", tmp_path / "b"
    convspec.convert("mixtral", tiny, a, device="cpu")
    convspec.convert("mixtral", tiny, b, device=torch.device("cpu"))
    assert _tree(a) == _tree(b)

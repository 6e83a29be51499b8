"""Multi-process convert (`--workers N`): the files are byte for byte those one process writes, the
commit stays atomic, and a worker that fails, is killed or hangs under a SIGTERM leaves no
destination, no temporary and no process behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import convspec
from convspec.cli import main
from convspec.errors import ConvspecError
from convspec.parallel_convert import FAULT_ENV, check_workers, split

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from make_tiny_mixtral import make  # noqa: E402

SHARDS = ["--max-shard-size", "30KB"]  # 4 files of the tiny checkpoint, 5 of its float32 cast


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("workers") / "src"
    make(d, layers=2, experts=4)
    return d


def tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def convert(src: Path, dst: Path, *extra: str) -> int:
    return main(["convert", "mixtral", str(src), str(dst), "--quiet", *SHARDS, *extra])


@pytest.mark.parametrize(
    "workers, extra",
    [(3, ["--manifest"]), (2, ["--dtype", "float32"])],
    ids=["3-manifest", "2-dtype"],
)
def test_several_workers_write_the_bytes_one_process_writes(src, tmp_path, workers, extra):
    one, many = tmp_path / "one", tmp_path / "many"
    assert convert(src, one, *extra) == 0
    assert convert(src, many, *extra, "--workers", str(workers)) == 0
    files = tree(one)
    assert len([n for n in files if n.endswith(".safetensors")]) >= 4
    assert "model.safetensors.index.json" in files and "config.json" in files
    assert tree(many) == files
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_the_inverse_with_workers_gives_the_original_bytes_back(src, tmp_path):
    fused, one, many = tmp_path / "fused", tmp_path / "one", tmp_path / "many"
    assert convert(src, fused) == 0
    assert convert(fused, one, "--reverse") == 0
    assert convert(fused, many, "--reverse", "--workers", "2") == 0
    assert tree(many) == tree(one)


def test_the_api_takes_workers_and_reports_progress_for_every_tensor(src, tmp_path):
    seen: dict[str, int] = {}
    r = convspec.convert("mixtral", src, tmp_path / "out", workers=2, on_tensor=seen.__setitem__)
    assert sorted(seen) == sorted(
        convspec.convert("mixtral", src, tmp_path / "x", dry_run=True).bound.outputs
    )
    assert sum(seen.values()) == r.bytes and r.files == ["model.safetensors"]


@pytest.mark.parametrize("bad", ["0", "-1", "x", "1.5", "", " ", "99999999999", "1025", "9" * 5000])
def test_a_bad_workers_value_is_one_clear_error(src, tmp_path, capsys, bad):
    assert convert(src, tmp_path / "out", "--workers", bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --workers must be a whole number of at least 1"), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert len(err.splitlines()[0]) < 200  # a huge value is shown cut short


@pytest.mark.parametrize("bad", [0, -3, True, 2.0, None, 1025, 10**12])
def test_the_api_refuses_a_bad_workers_value_before_reading(tmp_path, bad):
    with pytest.raises(ConvspecError, match="--workers must be a whole number"):
        convspec.convert("mixtral", tmp_path / "missing", tmp_path / "out", workers=bad)


def test_check_workers_reads_ints_and_digit_strings():
    assert check_workers(1) == 1 and check_workers("4") == 4 and check_workers(" 12 ") == 12


def test_dry_run_is_the_same_with_workers(src, tmp_path, capsys):
    assert convert(src, tmp_path / "out", "--dry-run") == 0
    plain = capsys.readouterr().out
    assert convert(src, tmp_path / "out", "--dry-run", "--workers", "3") == 0
    assert capsys.readouterr().out == plain and not (tmp_path / "out").exists()


def test_split_is_contiguous_balanced_and_at_most_one_worker_per_unit():
    assert split([10, 10, 10, 10], 2) == [range(0, 2), range(2, 4)]
    assert split([5, 1, 1], 10) == [range(0, 1), range(1, 2), range(2, 3)]
    assert split([100, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 5)]
    assert split([0, 0, 0], 2) == [range(0, 1), range(1, 3)]
    assert split([], 4) == [range(0, 0)]
    shares = split(list(range(1, 50)), 4)
    assert [r.start for r in shares[1:]] == [r.stop for r in shares[:-1]] and shares[-1].stop == 49
    sums = [sum(range(r.start + 1, r.stop + 1)) for r in shares]
    assert max(sums) - min(sums) <= 49


@pytest.mark.parametrize(
    "fault, said",
    [("2:raise", "worker 2 of 2 failed: RuntimeError"), ("1:kill", "worker 1 of 2 was killed by SIGKILL")],
)
def test_a_failing_worker_leaves_no_destination(src, tmp_path, capsys, monkeypatch, fault, said):
    monkeypatch.setenv(FAULT_ENV, fault)
    assert convert(src, tmp_path / "out", "--workers", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {said}"), err
    assert "nothing was written" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no destination, no temporary


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, PR_SET_PDEATHSIG")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_signal_to_the_parent_ends_the_workers(src, tmp_path, sig):
    """SIGTERM: the workers are ended and the temporary removed (exit 130). SIGKILL: nothing runs in
    the parent, but the workers die with it, and the next run removes the temporary."""
    dst = tmp_path / "out"
    env = {**os.environ, FAULT_ENV: "1:hang", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "convspec.cli", "convert", "mixtral", str(src), str(dst), "--workers", "2"]
    p = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _children(p.pid) or not any(tmp_path.iterdir()):  # the workers started
            assert time.monotonic() < deadline and p.poll() is None, "no worker started"
            time.sleep(0.2)
        time.sleep(1)  # the other worker has written its share; the hung one has not
        children = _children(p.pid)
        p.send_signal(sig)
        err = p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if sig == signal.SIGTERM:
        assert p.returncode == 130 and "interrupted" in err, err
    else:
        assert p.returncode == -signal.SIGKILL
        assert convert(src, dst, "--overwrite") == 0
        assert [p.name for p in tmp_path.iterdir()] == ["out"]
        shutil.rmtree(dst)
    assert not any(tmp_path.iterdir())
    deadline = time.monotonic() + 20
    while [c for c in children if _running(c)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [c for c in children if _running(c)] == []


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the workers, and multiprocessing's resource tracker)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


RANK = """
import json, os, sys
from pathlib import Path
from convspec.cli import main
out, src, dst = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rc = main(["convert", "mixtral", src, dst, "--quiet", "--max-shard-size", "30KB", *sys.argv[4:]])
(out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"rc": rc}))
"""


def test_under_torchrun_the_ranks_share_the_work_and_rank_0_commits(src, tmp_path):
    from helpers.distributed import run_workers

    one, ranks = tmp_path / "one", tmp_path / "ranks"
    assert convert(src, one, "--manifest") == 0
    got = run_workers(RANK, 2, tmp_path, str(src), str(ranks), "--manifest", timeout=120)
    assert got == [{"rc": 0}, {"rc": 0}]
    assert tree(ranks) == tree(one)


def test_under_torchrun_a_failing_rank_fails_every_rank_and_leaves_nothing(src, tmp_path, monkeypatch):
    from helpers.distributed import run_workers

    monkeypatch.setenv(FAULT_ENV, "2:raise")  # RANK 1
    (tmp_path / "logs").mkdir()
    got = run_workers(RANK, 2, tmp_path / "logs", str(src), str(tmp_path / "out"), timeout=120)
    assert got == [{"rc": 2}, {"rc": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]


def test_under_torchrun_workers_is_refused_before_anything_is_read(src, tmp_path, capsys, monkeypatch):
    for name, value in {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(name, value)
    assert convert(src, tmp_path / "out", "--workers", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --workers and torchrun ranks cannot be combined"), err
    assert not any(tmp_path.iterdir())


MISSING = """
import contextlib, io, json, os, sys
from pathlib import Path
from convspec.cli import main
out, src, dst = Path(sys.argv[1]), sys.argv[2].replace("{rank}", os.environ["RANK"]), sys.argv[3]
err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc = main(["convert", "mixtral", src, dst, "--quiet"])
(out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"rc": rc, "err": err.getvalue()}))
"""


def test_under_torchrun_a_rank_whose_copy_is_missing_stops_every_rank_before_a_byte_is_read(src, tmp_path):
    import shutil

    from helpers.distributed import run_workers

    shutil.copytree(src, tmp_path / "src0")
    shutil.copytree(src, tmp_path / "src1")
    for f in (tmp_path / "src1").glob("*.safetensors"):
        f.unlink()  # rank 1's copy of the checkpoint lost its weights
    (tmp_path / "logs").mkdir()
    got = run_workers(MISSING, 2, tmp_path / "logs", str(tmp_path / "src{rank}"), str(tmp_path / "out"))
    assert [r["rc"] for r in got] == [2, 2]
    assert all(r["err"].startswith("error: rank 1: ") for r in got), got
    assert got[0]["err"] == got[1]["err"]  # one error, the same on every rank
    assert not (tmp_path / "out").exists()

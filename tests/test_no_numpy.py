"""convspec runs without numpy, which it does not declare: the README's main job and every read and
write path (load, stream, save, convert with a cast, pickle transcoding, the example generators)
run in a fresh interpreter where `import numpy` and `import transformers` fail, as on a new virtual
environment made with the README's first command (transformers is an extra, and brings numpy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SHIM = """\
import sys
sys.modules["numpy"] = None  # `import numpy` raises ImportError, as where it is not installed
sys.modules["transformers"] = None
"""

PATHS = """\
import sys
from pathlib import Path

import torch

import convspec
from convspec.io.writer import write_file

work = Path(sys.argv[1])
sys.path.insert(0, sys.argv[2])
from make_tiny_mixtral import make

src = work / "tiny"
make(src)
plan = convspec.compile("mixtral", config=src / "config.json")
sd = plan.load(src)  # reads through Checkpoint.assemble
streamed = dict(plan.stream(src))
assert sd.keys() == streamed.keys() and all(torch.equal(sd[k], streamed[k]) for k in sd)
plan.inverse().save(sd, work / "saved")  # writes tensors' bytes
back = convspec.compile("mixtral").load(work / "saved", dtype="float32")
r = convspec.convert("mixtral", src, work / "f32", dtype="float32")  # a cast: computed, then written
assert r.tensors == len(sd), r
torch.save({"a": torch.arange(6.0).reshape(2, 3), "e": torch.zeros(0, 4)}, work / "pickle.bin")
(work / "pk").mkdir()
(work / "pk" / "pytorch_model.bin").write_bytes((work / "pickle.bin").read_bytes())
convspec.convert("identity", work / "pk", work / "pk-out", allow_pickle=True)
write_file(work / "empty.safetensors", {"e": torch.zeros(0, 3), "s": torch.tensor(2.0)})
got = convspec.compile("identity").load(work / "empty.safetensors")
assert got["e"].shape == (0, 3) and got["s"].item() == 2.0, got
assert "numpy" not in sys.modules or sys.modules["numpy"] is None
print("read and write paths ok without numpy")
"""


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SHIM)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def shim_works(tmp_path_factory):
    res = _run(["-c", "import numpy"], tmp_path_factory.mktemp("probe"))
    assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr, res.stderr[-2000:]


def test_the_main_job_runs_without_numpy(shim_works, tmp_path):
    res = _run(["examples/mixtral_roundtrip.py", str(tmp_path / "work")], tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "transformers is not installed" in res.stdout
    assert "bit-exact against the source" in res.stdout
    assert "Failed to initialize NumPy" not in res.stderr  # torch's warning: convspec quiets it


def test_every_read_and_write_path_runs_without_numpy(shim_works, tmp_path):
    (tmp_path / "work").mkdir()
    res = _run(["-c", PATHS, str(tmp_path / "work"), str(ROOT / "examples")], tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "read and write paths ok without numpy" in res.stdout


def test_the_authoring_example_checkpoint_is_written_without_numpy(shim_works, tmp_path):
    res = _run(["examples/authoring/make_checkpoint.py", str(tmp_path / "orca")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "orca" / "model.safetensors").is_file()

""".ci/run runs the README's two commands exactly as README.md writes them (read from the file, not
copied), each in a new virtual environment, and fails when either fails. Checked on a stand-in
checkout whose README holds cheap commands; the real run is CI's."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / ".ci" / "run"


def _readme_commands(text: str) -> list[str]:
    section = text.split("\n## The two commands\n", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```$", section, re.M | re.S)]


def test_the_readme_gives_the_two_commands_in_the_form_ci_reads():
    first, test = _readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert (
        first == "pip install -c constraints.txt -e . && python examples/mixtral_roundtrip.py examples/_work"
    )
    assert test == "pip install -c constraints.txt -e '.[test]' && python -m pytest -q"
    script = CI.read_text(encoding="utf-8")
    assert "pip install" not in script and "pytest" not in script  # read from README.md, never copied
    assert "/examples/_work/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


def _checkout(tmp_path: Path, first: str, second: str) -> Path:
    d = tmp_path / "checkout"
    (d / ".ci").mkdir(parents=True)
    shutil.copy(CI, d / ".ci" / "run")
    in_venv = "python -c \"import sys; assert sys.prefix != sys.base_prefix; print('in', sys.prefix)\""
    (d / "README.md").write_text(
        "# x\n\n## The two commands\n\nMain job:\n\n"
        f"```bash\n{in_venv} && {first}\n```\n\nTests:\n\n```bash\n{in_venv} && {second}\n```\n\n## More\n"
    )
    return d


def _run(d: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", ".ci/run"], cwd=d, capture_output=True, text=True, timeout=600)


def test_ci_runs_both_commands_each_in_a_new_virtual_environment(tmp_path):
    res = _run(_checkout(tmp_path, "echo FIRST-RAN", "echo SECOND-RAN"))
    assert res.returncode == 0, res.stdout + res.stderr
    venvs = re.findall(r"^in (\S+)$", res.stdout, re.M)
    assert len(venvs) == 2 and venvs[0] != venvs[1]
    assert res.stdout.index("FIRST-RAN") < res.stdout.index("SECOND-RAN")


def test_ci_fails_when_the_first_command_fails_and_stops_there(tmp_path):
    res = _run(_checkout(tmp_path, "python -c 'import no_such_module'", "echo SECOND-RAN"))
    assert res.returncode != 0
    assert "ModuleNotFoundError: No module named 'no_such_module'" in res.stderr
    assert "FAILED in a new virtual environment" in res.stderr and "SECOND-RAN" not in res.stdout


def test_ci_refuses_a_readme_it_cannot_read(tmp_path):
    d = _checkout(tmp_path, "true", "true")
    (d / "README.md").write_text("# x\n\n## The two commands\n\n```bash\ntrue\n```\n")
    res = _run(d)
    assert res.returncode != 0 and "two ```bash blocks" in res.stderr

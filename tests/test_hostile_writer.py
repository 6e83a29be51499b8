"""Round two for everything that writes (issue 14, classes 2, 4, 5, 6 and 7): a destination that is,
holds or is inside its source, however it is spelled, is refused before anything is read; the
operating system's refusals (a parent that is a file, a name too long, a read-only folder, a full
disk, Ctrl-C) are one message and leave nothing behind, no folder made for the output included; size
options are bounded; the copy a pickle checkpoint is read through is reclaimed after a SIGKILL, and
errors name the user's files, never that copy.

HOSTILE_CASES run through tests/hostile.py as real processes; cases that need a condition in the
child (a full disk, no root override of permissions, a signal at a chosen point) get it from
tests/helpers/hooks/sitecustomize.py. The variant generators run in-process under an alarm and a
tracemalloc ceiling, as tests/test_fuzz.py does, with the same assertions (hostile.assert_refused).
"""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hostile import Outcome, assert_refused, check_case, run_hostile
from hypothesis import given
from hypothesis import strategies as st
from test_bad_inputs import GOOD, RENAME, Case, Link, _snapshot, _write, entry
from test_bad_inputs import st as safetensors_bytes
from test_fuzz import within

from convspec.cli import main
from convspec.errors import ConvspecError
from convspec.io.destination import MAX_DST_NAME, write_error
from convspec.io.writer import (
    MAX_SHARD_SIZE,
    MAX_SIZE_CHARS,
    SCRATCH_MARK,
    clean_scratch,
    parse_size,
    scratch_dir,
)

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "tests" / "helpers" / "hooks"
NAME_MAX = 255  # bytes in a file name on the file systems this runs on


def _pickle(tensors: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


PICKLE_NO_FIT = _pickle({"zzz": torch.zeros(3)})  # the RENAME spec claims none of its keys
PICKLE_FITS = _pickle({"m.a": torch.arange(4, dtype=torch.float32)})
BIG = safetensors_bytes({"m.a": entry(shape=(16384,), offsets=(0, 65536))}, b"\1" * 65536)  # 64 KiB of data


def conv(dst: str, *extra: str, src: str = "{d}/src") -> tuple[str, ...]:
    return ("convert", "{d}/spec.yaml", src, dst, *extra)


def case(
    name: str, argv: tuple[str, ...], expected: str, files: dict | None = None, kind="destination"
) -> Case:
    """A convert of a good checkpoint under {d}/src with the RENAME spec, plus `files`."""
    return Case(
        name, kind, {"spec.yaml": RENAME, "src/model.safetensors": GOOD, **(files or {})}, argv, expected
    )


HUB = "{d}/hub/models--o--m"  # a Hugging Face cache: the snapshot's files link into blobs
HUB_FILES = {
    "hub/models--o--m/blobs/abc": GOOD,
    "hub/models--o--m/snapshots/r1/model.safetensors": Link(f"{HUB}/blobs/abc"),
}
INCLUDING = "spec: m\nrules:\n  - include: inc\n"

HOSTILE_CASES = [
    # ---- class 2: the destination and the source ---------------------------------------------
    case(
        "dst_is_src", conv("{d}/src", "--overwrite"), "error: cannot write {d}/src: it is the source {d}/src"
    ),
    case("dst_holds_src", conv("{d}", "--overwrite"), "error: cannot write {d}: it holds the source {d}/src"),
    case(
        "dst_links_to_src",
        conv("{d}/dst", "--overwrite"),
        "error: cannot write {d}/dst (that is {d}/src): it is the source {d}/src",
        {"dst": Link("{d}/src")},
    ),
    # ---- class 5: what the operating system refuses --------------------------------------------
    case(
        "parent_is_a_file",
        conv("{d}/afile/out"),
        "error: cannot write {d}/afile/out: {d}/afile is a file, not a folder",
        {"afile": "x"},
    ),
    case(
        "name_too_long_for_its_temporary",
        conv("{d}/new/" + "n" * 250),
        f"its name is 250 bytes long, more than {MAX_DST_NAME}",
    ),
    case(
        "path_too_long",  # folders are made on the way before the system says no: all removed again
        conv("{d}/" + ("n" * 200 + "/") * 21 + "out"),
        "the path is too long for the file system",
    ),
    # ---- class 6: numeric options --------------------------------------------------------------
    case(
        "shard_size_of_400_digits",
        conv("{d}/new/out", "--max-shard-size", "9" * 400),
        f"error: the size '{'9' * 20}... (400 characters)' is longer than {MAX_SIZE_CHARS} characters",
        kind="option",
    ),
    # ---- compile -o: never over what it reads --------------------------------------------------
    Case(
        "compile_output_is_the_spec",
        "spec",
        {"spec.yaml": RENAME},
        ("compile", "{d}/spec.yaml", "-o", "{d}/spec.yaml"),
        "error: cannot write {d}/spec.yaml: it is the spec {d}/spec.yaml",
    ),
]


# the same kind of case, run in-process (a process each would take the file past its time budget)
IN_PROCESS_CASES = [
    case(
        "dst_is_src_without_overwrite",
        conv("{d}/src"),
        "error: cannot write {d}/src: it is the source {d}/src",
    ),
    case(
        "dst_inside_src",
        conv("{d}/src/out"),
        "error: cannot write {d}/src/out: it is inside the source {d}/src",
    ),
    case(
        "dst_dot_dot",
        conv("{d}/src/..", "--overwrite"),
        "error: cannot write {d}/src/..: it holds the source",
    ),
    case(
        "dst_trailing_slash",
        conv("{d}/src/", "--overwrite"),
        "error: cannot write {d}/src/: it is the source",
    ),
    case(
        "src_through_a_link",
        conv("{d}/src", "--overwrite", src="{d}/srclink"),
        "error: cannot write {d}/src: it is the source {d}/srclink ({d}/src)",
        {"srclink": Link("{d}/src")},
    ),
    case(
        "src_file_inside_dst",
        conv("{d}/src", "--overwrite", src="{d}/src/model.safetensors"),
        "error: cannot write {d}/src: it holds the source {d}/src/model.safetensors",
    ),
    case(
        "dst_is_the_config_beside_a_file_src",
        conv("{d}/src/config.json", "--overwrite", src="{d}/src/model.safetensors"),
        "error: cannot write {d}/src/config.json: it is the source {d}/src/model.safetensors ({d}/src/config.json)",
        {"src/config.json": "{}"},
    ),
    case(
        "ancestor_is_a_file",
        conv("{d}/afile/x/y/out", "--overwrite"),
        "error: cannot write {d}/afile/x/y/out: {d}/afile is a file, not a folder",
        {"afile": "x"},
    ),
    case(
        "shard_size_past_the_limit",
        conv("{d}/new/out", "--max-shard-size", "2000000TB"),
        f"error: the size '2000000TB' is more than {MAX_SHARD_SIZE} bytes",
        kind="option",
    ),
    case(
        "shard_size_zero",
        conv("{d}/new/out", "--max-shard-size", "0.0004KB"),
        "error: the size '0.0004KB' is less than 1 byte",
        kind="option",
    ),
    Case(
        "compile_output_is_the_config",
        "config",
        {"spec.yaml": RENAME, "config.json": "{}"},
        ("compile", "{d}/spec.yaml", "--config", "{d}/config.json", "-o", "{d}/config.json"),
        "error: cannot write {d}/config.json: it is the config {d}/config.json",
    ),
    Case(
        "compile_output_inside_the_checkpoint",
        "checkpoint",
        {"spec.yaml": RENAME, "src/model.safetensors": GOOD},
        ("compile", "{d}/spec.yaml", "--against", "{d}/src", "-o", "{d}/src/plan.txt"),
        "error: cannot write {d}/src/plan.txt: it is inside the checkpoint {d}/src",
    ),
    case(
        "dst_holds_the_blobs_a_cache_snapshot_links_to",
        conv(f"{HUB}/blobs", "--overwrite", src=f"{HUB}/snapshots/r1"),
        f"error: cannot write {HUB}/blobs: it holds the source {HUB}/snapshots/r1 ({HUB}/blobs/abc)",
        HUB_FILES,
    ),
    Case(
        "compile_output_is_an_included_spec",
        "spec",
        {"main.yaml": INCLUDING, "inc.yaml": RENAME},
        ("compile", "{d}/main.yaml", "-o", "{d}/inc.yaml"),
        "error: cannot write {d}/inc.yaml: it is the spec {d}/main.yaml ({d}/inc.yaml)",
    ),
    # ---- class 7: a pickle read through a copy -------------------------------------------------
    Case(
        "pickle_the_spec_does_not_fit",  # named as the user named it, and the folders made go again
        "checkpoint",
        {"spec.yaml": RENAME, "src/pytorch_model.bin": PICKLE_NO_FIT},
        conv("{d}/new/deeper/out", "--allow-pickle"),
        "claims no key of {d}/src ",
    ),
]


@pytest.fixture
def d(tmp_path) -> Path:
    return tmp_path.resolve()


@pytest.mark.parametrize("c", HOSTILE_CASES, ids=[c.name for c in HOSTILE_CASES])
def test_hostile_writer_case(c: Case, d):
    outcome = check_case(c, d)
    assert ".convspec-" not in outcome.err, outcome.err  # never the name of a temporary


# ---- cases that need a condition in the child ------------------------------------------------


def hooked(hook: str) -> dict[str, str]:
    """The environment that makes tests/helpers/hooks/sitecustomize.py set `hook` up in the child."""
    path = os.pathsep.join(p for p in (str(HOOKS), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "CONVSPEC_TEST_HOOK": hook}


READ_ONLY = {"ro/keep": "x"}  # {d}/ro is made read-only before the run

HOOKED_CASES = [  # (case, hook, exit status)
    (
        case(
            "read_only_parent",
            conv("{d}/ro/new/out"),
            "error: cannot write {d}/ro/new/out: permission denied in {d}/ro",
            READ_ONLY,
        ),
        "nodac",
        2,
    ),
    (
        Case(
            "compile_output_in_a_read_only_folder",
            "spec",
            {"spec.yaml": RENAME, **READ_ONLY},
            ("compile", "{d}/spec.yaml", "-o", "{d}/ro/plan.txt"),
            "error: cannot write {d}/ro/plan.txt: permission denied in {d}/ro",
        ),
        "nodac",
        2,
    ),
    (
        case(
            "disk_full",  # EFBIG past RLIMIT_FSIZE: the kernel's refusal of a write, as ENOSPC is
            conv("{d}/new/deeper/out"),
            "error: cannot write {d}/new/deeper/out: a file would be larger than",
            {"src/model.safetensors": BIG},
        ),
        "fsize=16384",
        2,
    ),
    (
        Case(
            "compile_output_on_a_full_disk",
            "spec",
            {"spec.yaml": RENAME},
            ("compile", "{d}/spec.yaml", "-o", "{d}/plan.txt"),
            "error: cannot write {d}/plan.txt: a file would be larger than",
        ),
        "fsize=64",
        2,
    ),
    # Ctrl-C: a real SIGINT at a chosen point of the work: exit 130, one line, nothing left
    (
        case("ctrl_c_while_copying", conv("{d}/new/deeper/out"), "error: interrupted"),
        "INT@convspec.io.writer:copy_range",
        130,
    ),
    (
        case("ctrl_c_after_making_folders", conv("{d}/new/deeper/out"), "error: interrupted"),
        "INT@convspec.io.writer:make_folders",
        130,
    ),
]


@contextmanager
def _read_only(d: Path):
    if (d / "ro").exists():
        (d / "ro").chmod(0o555)
    try:
        yield
    finally:
        if (d / "ro").exists():
            (d / "ro").chmod(0o755)


@pytest.mark.parametrize("c,hook,code", HOOKED_CASES, ids=[c.name for c, _, _ in HOOKED_CASES])
def test_hostile_writer_case_with_a_condition(c: Case, hook: str, code: int, d):
    _write(c, d)
    with _read_only(d):
        before = _snapshot(d)
        outcome = run_hostile(c, d, env=hooked(hook))
        assert_refused(c, d, outcome, before, code=code)
    assert ".convspec-" not in outcome.err, outcome.err


# ---- class 7: the pickle's copy after a SIGKILL ----------------------------------------------


def test_a_pickle_copy_left_by_a_sigkill_is_reclaimed_by_the_next_run(d):
    """A real SIGKILL once the first shard of the copy is written: the copy stays (nothing runs after
    SIGKILL); the next conversion beside it (from any source) removes it, says so, and succeeds."""
    c = Case(
        "sigkill_while_transcoding",
        "checkpoint",
        {"spec.yaml": RENAME, "src/pytorch_model.bin": PICKLE_FITS, "st/model.safetensors": GOOD},
        conv("{d}/new/out", "--allow-pickle"),
        "",
    )
    _write(c, d)
    killed = run_hostile(c, d, env=hooked("KILL@convspec.io.writer:write_file"))
    assert killed.code == -signal.SIGKILL, killed.err
    left = [p for p in (d / "new").iterdir() if p.name.startswith(SCRATCH_MARK)]
    assert len(left) == 1 and (left[0] / "checkpoint" / "model.safetensors").is_file(), left
    again = run_hostile(Case(c.name, c.kind, c.files, conv("{d}/new/out", src="{d}/st"), ""), d)
    assert again.code == 0, again.err
    assert f"note: removed {left[0].name}, left by a conversion that died" in again.err
    assert sorted(p.name for p in (d / "new").iterdir()) == ["out"]
    assert (d / "src" / "pytorch_model.bin").read_bytes() == PICKLE_FITS


def test_a_pickle_copy_in_use_is_left_alone_and_a_dead_one_is_not(d):
    (d / f"{SCRATCH_MARK}999999999-1-0").mkdir()  # no process has that pid: dead
    (d / f"{SCRATCH_MARK}notours").mkdir()  # not a name scratch_dir makes: never touched
    removed: list[Path] = []
    with scratch_dir(d, d / "out", removed) as live:
        assert removed == [d / f"{SCRATCH_MARK}999999999-1-0"]
        (d / f"{SCRATCH_MARK}999999998-1-0").mkdir()
        assert clean_scratch(d) == [d / f"{SCRATCH_MARK}999999998-1-0"]
        assert live.is_dir()  # locked by this run: in use
    assert not live.exists()
    assert sorted(p.name for p in d.iterdir()) == [f"{SCRATCH_MARK}notours"]


# ---- in-process variants: the same assertions, under an alarm and a memory ceiling ---------------

TIME_LIMIT_S = 20
PEAK_BYTES = 64 << 20


def _bounded():
    """The block within this file's time and peak bounds."""
    return within(TIME_LIMIT_S, PEAK_BYTES)


def _in_process(c: Case, d: Path, capsys) -> Outcome:
    argv = [a.replace("{d}", str(d)) for a in c.argv]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return Outcome(code, out, err)


@pytest.mark.parametrize("c", IN_PROCESS_CASES, ids=[c.name for c in IN_PROCESS_CASES])
def test_hostile_writer_case_in_process(c: Case, d, capsys):
    _write(c, d)
    before = _snapshot(d)
    with _bounded():
        outcome = _in_process(c, d, capsys)
    assert_refused(c, d, outcome, before)
    assert ".convspec-" not in outcome.err, outcome.err  # never the name of a temporary


def test_ctrl_c_while_transcoding_a_pickle_removes_the_copy_and_the_folders(d, capsys, monkeypatch):
    """A real SIGINT to this process once the copy's first shard is written (in-process: a child
    would spend most of its time importing torch); a KeyboardInterrupt that escaped main would be
    the traceback a user sees, so it fails the test here."""
    import convspec.io.writer as writer

    real = writer.write_file

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(writer, "write_file", interrupted)
    c = Case(
        "ctrl_c_while_transcoding_a_pickle",
        "checkpoint",
        {"spec.yaml": RENAME, "src/pytorch_model.bin": PICKLE_FITS},
        conv("{d}/new/deeper/out", "--allow-pickle"),
        "error: interrupted",
    )
    _write(c, d)
    before = _snapshot(d)
    try:
        with _bounded():
            outcome = _in_process(c, d, capsys)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main: a traceback")
    assert_refused(c, d, outcome, before, code=130)


# every spelling of SRC, and of a destination that is, holds or is inside it: plain, relative,
# with ./ and trailing / and /., through a link to the folder above, through `x/..`
SRC_SPELLINGS = [
    "src",
    "./src",
    "src/",
    "{d}/src",
    "srclink",
    "dlink/src",
    "src/sub/..",
    "src/model.safetensors",
]
TARGETS = {"src": "is", "src/sub": "is inside", "src/sub/deeper": "is inside", ".": "holds", "..": "holds"}


def _spellings(target: str) -> list[str]:
    forms = [target, f"./{target}", f"{target}/", f"{target}/.", f"{{d}}/{target}", f"dlink/{target}"]
    forms.append(f"src/sub/../../{target}")
    if target == "src":
        forms += ["srclink", "srclink/", "dlink/srclink"]
    return forms


def _variants(src: str) -> list[tuple[str, bool]]:
    """Every destination spelling that must be refused for this SRC spelling, with and without --overwrite."""
    targets = ["src", ".", ".."] if src.endswith(".safetensors") else list(TARGETS)
    if src.endswith(".safetensors"):
        targets.append("src/model.safetensors")
    return [(dst, ow) for t in targets for dst in _spellings(t) for ow in (False, True)]


@pytest.mark.parametrize("src", SRC_SPELLINGS)
def test_every_spelling_of_a_destination_around_the_source_is_refused(src, d, capsys, monkeypatch):
    files = {"spec.yaml": RENAME, "src/model.safetensors": GOOD, "src/sub/keep": "x"}
    files |= {"srclink": Link("{d}/src"), "dlink": Link("{d}")}
    base = Case("spelling", "destination", files, (), "")
    _write(base, d)
    monkeypatch.chdir(d)
    before = _snapshot(d)
    variants = _variants(src)
    assert len(variants) >= 40
    with _bounded():
        _refuse_all(variants, src, files, d, before, capsys)


def _refuse_all(variants, src, files, d, before, capsys):
    for dst, overwrite in variants:
        argv = conv(dst, *(["--overwrite"] if overwrite else []), src=src)
        c = Case(
            f"{src} -> {dst}", "destination", files, argv, f"error: cannot write {dst.replace('{d}', str(d))}"
        )
        outcome = _in_process(c, d, capsys)
        assert_refused(c, d, outcome, before)
        assert src.replace("{d}", str(d)) in outcome.err and (
            "the source" in outcome.err or "working directory" in outcome.err
        ), outcome.err


@pytest.mark.parametrize("dst", [".", "./", "sub/..", "{d}/w"])
def test_the_working_directory_is_never_replaced(dst, d, capsys, monkeypatch):
    """DST `.` with --overwrite, the source elsewhere: refused, the folder one stands in is kept."""
    files = {"spec.yaml": RENAME, "src/model.safetensors": GOOD, "w/sub/keep": "x"}
    c = Case("cwd", "destination", files, conv(dst, "--overwrite"), "is the working directory {d}/w")
    _write(c, d)
    monkeypatch.chdir(d / "w")
    before = _snapshot(d)
    with _bounded():
        outcome = _in_process(c, d, capsys)
    assert_refused(c, d, outcome, before)


def _names(byte_lengths: list[int]) -> list[str]:
    """Names of these lengths in bytes, in ASCII and in two-byte characters."""
    out = []
    for n in byte_lengths:
        out.append("n" * n)
        if n % 2 == 0:
            out.append("é" * (n // 2))
    return out


@pytest.mark.parametrize(
    "name", _names([1, MAX_DST_NAME - 2, MAX_DST_NAME, MAX_DST_NAME + 2, 230, 254, 256, 300])
)
def test_destination_names_around_the_limit(name, d, capsys):
    """Up to MAX_DST_NAME bytes a name converts (its temporary fits beside it); past it, one message."""
    size = len(name.encode())
    c = case(
        f"name_{size}", conv("{d}/new/" + name), f"its name is {size} bytes long, more than {MAX_DST_NAME}"
    )
    _write(c, d)
    before = _snapshot(d)
    with _bounded():
        outcome = _in_process(c, d, capsys)
    if size <= MAX_DST_NAME:
        assert outcome.code == 0, outcome.err
        assert (d / "new" / name / "model.safetensors").is_file()
        assert not [p for p in (d / "new").iterdir() if ".convspec-" in p.name]
    else:
        assert_refused(c, d, outcome, before)


@pytest.mark.parametrize("name", _names([1, 200, 240, 242, 250, NAME_MAX, NAME_MAX + 1, 300]))
def test_compile_output_names_around_name_max(name, d, capsys):
    """compile -o FILE: any name the file system takes is written (its temporary's name is cut
    short); a longer one is one message."""
    size = len(name.encode())
    c = Case(
        f"o_{size}", "spec", {"spec.yaml": RENAME}, ("compile", "{d}/spec.yaml", "-o", f"{{d}}/{name}"), ""
    )
    c = Case(c.name, c.kind, c.files, c.argv, f"error: cannot write {d}/{name}: the path is too long")
    _write(c, d)
    before = _snapshot(d)
    with _bounded():
        outcome = _in_process(c, d, capsys)
    if size <= NAME_MAX:
        assert outcome.code == 0, outcome.err
        assert (d / name).read_text().startswith("plan t")
        assert sorted(p.name for p in d.iterdir()) == sorted([name, "spec.yaml", "src"])
    else:
        assert_refused(c, d, outcome, before)


# ---- class 6: every size is bounded and exact --------------------------------------------------


@given(
    st.one_of(
        st.text(max_size=60), st.from_regex(r"\s*\d{1,60}(\.\d{1,30})?\s*[KMGT]?i?B?\s*", fullmatch=True)
    )
)
def test_a_size_option_is_read_or_refused_never_a_crash(text):
    try:
        n = parse_size(text)
    except ConvspecError as exc:
        assert exc.message.startswith(("the size", "cannot read the size")), exc.message
        assert len(exc.message) < 400, exc.message  # 40 characters shown at most, escaped
    else:
        assert 1 <= n <= MAX_SHARD_SIZE


@given(st.integers(min_value=-(10**5000), max_value=10**5000))
def test_a_size_given_as_an_integer_is_bounded(n):
    if 1 <= n <= MAX_SHARD_SIZE:
        assert parse_size(n) == n
    else:
        with pytest.raises(ConvspecError, match="the size"):
            parse_size(n)


@pytest.mark.parametrize("digits", [1, 18, 19, 20, MAX_SIZE_CHARS, MAX_SIZE_CHARS + 1, 400, 5000])
def test_sizes_of_every_length_are_exact_or_refused(digits):
    text = "1" + "0" * (digits - 1)
    if digits > MAX_SIZE_CHARS:
        with pytest.raises(ConvspecError, match=f"longer than {MAX_SIZE_CHARS} characters"):
            parse_size(text)
    elif 10 ** (digits - 1) > MAX_SHARD_SIZE:
        with pytest.raises(ConvspecError, match="more than"):
            parse_size(text)
    else:
        assert parse_size(text) == 10 ** (digits - 1)
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("0.5KiB") == 512  # exact: no float


# ---- class 4: folders made for an output that fails go again -------------------------------------


@pytest.mark.parametrize("pickled", [False, True])
def test_a_failing_convert_removes_the_folders_it_made(pickled, d, monkeypatch):
    """Whatever fails midway (here the writer, as a zero-size expert once made it fail), the folders
    made for the destination (and for a pickle's copy) are removed with the temporary."""
    import convspec
    import convspec.streaming as streaming

    src = d / "src"
    src.mkdir()
    if pickled:
        (src / "pytorch_model.bin").write_bytes(PICKLE_FITS)
    else:
        (src / "model.safetensors").write_bytes(GOOD)
    (d / "spec.yaml").write_text(RENAME)
    (d / "keep").mkdir()

    def failing(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(streaming, "write_sharded", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        convspec.convert(d / "spec.yaml", src, d / "keep" / "new" / "deeper" / "out", allow_pickle=pickled)
    left = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    assert left == sorted(["keep", "spec.yaml", "src", *(f"src/{p.name}" for p in src.iterdir())])


# ---- docs/safety.md states these limits --------------------------------------------------------


def test_safety_md_states_the_writer_limits():
    text = (ROOT / "docs" / "safety.md").read_text()
    section = text.split("### Writing", 1)[1]
    assert re.search(rf"\b{MAX_DST_NAME} bytes\b", section)
    assert f"{MAX_SHARD_SIZE:,}" in section
    assert re.search(rf"\b{MAX_SIZE_CHARS} characters\b", section)
    assert "exit 130" in section and "error: interrupted" in section
    for message in (
        "its name is 250 bytes long, more than",
        "is longer than",
        "is more than",
        "is less than 1 byte",
        "it is the source",
        "it holds the source",
        "it is inside the source",
        "is the working directory",
    ):
        assert message in text, message


def test_the_hooks_really_change_the_child():
    """The conditions the hooked cases rely on take effect (else those cases would test nothing)."""
    code = (
        "import resource, sys, os; "
        "print(resource.getrlimit(resource.RLIMIT_FSIZE)[0], 'convspec.io.writer' in sys.modules)"
    )
    env = {**os.environ, **hooked("fsize=12345;INT@convspec.io.writer:copy_range")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.stdout.split() == ["12345", "True"], out.stderr


@pytest.mark.parametrize(
    "err,expected",
    [
        (errno.ENOSPC, "cannot write {d}/out: no space is left on the device"),
        (errno.EDQUOT, "cannot write {d}/out: the disk quota is used up"),
        (errno.EFBIG, "cannot write {d}/out: a file would be larger than"),
        (errno.EROFS, "cannot write {d}/out: the file system is read-only"),
        (errno.EACCES, "cannot write {d}/out: permission denied in {d}"),
        (errno.EIO, "cannot write {d}/out: Input/output error"),
    ],
)
def test_every_write_error_names_the_destination_and_what_to_do(err, expected, d):
    """The errors a real disk gives that these tests cannot cause unprivileged (ENOSPC, EDQUOT, EROFS,
    EIO) read as the ones they can: the destination, the reason, a hint; never the temporary."""
    tmp = d / ".out.convspec-tmp-1-2"
    exc = write_error(OSError(err, os.strerror(err), str(tmp / "model.safetensors")), d / "out", tmp)
    assert exc.message.startswith(expected.replace("{d}", str(d))), exc.message
    assert exc.hint and ".convspec-" not in exc.message
    # an error on a file that is not the output's (a source file read) names that file
    src = write_error(OSError(err, os.strerror(err), str(d / "src" / "model.safetensors")), d / "out", tmp)
    assert src.message.startswith(f"cannot read {d}/src/model.safetensors: "), src.message


def test_safety_md_refusals_are_what_convert_prints(d, capsys, monkeypatch):
    """docs/safety.md section 3's console block, run in a folder laid out as it says (/data is `d`)."""
    text = (ROOT / "docs" / "safety.md").read_text()
    block = re.search(r"```console\n(\$ cd /data\n.*?)```", text, re.S).group(1)
    _write(
        Case(
            "doc",
            "destination",
            {"src/model.safetensors": GOOD, "src/sub/keep": "x", "out": Link("{d}/src"), "w/keep": "x"},
            (),
            "",
        ),
        d,
    )
    before = _snapshot(d)
    lines = block.splitlines()
    ran = 0
    for i, line in enumerate(lines):
        if line.startswith("$ cd "):
            monkeypatch.chdir(line[5:].replace("/data", str(d)))
        elif line.startswith("$ convspec "):
            capsys.readouterr()
            assert main(line.split()[2:]) == 2
            err = capsys.readouterr().err.replace(str(d), "/data")
            assert err.splitlines()[0] == lines[i + 1], line
            ran += 1
    assert ran >= 6 and _snapshot(d) == before


def test_an_os_error_nothing_foresaw_is_still_one_line(d, capsys, monkeypatch):
    """The CLI's last net: an OSError from anywhere is one message naming its path, exit 2."""
    import convspec.api as api

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(d / "somewhere"))

    monkeypatch.setattr(api, "convert", refused)
    c = case("os_error", conv("{d}/out"), "error: {d}/somewhere: Permission denied")
    _write(c, d)
    before = _snapshot(d)
    assert_refused(c, d, _in_process(c, d, capsys), before)

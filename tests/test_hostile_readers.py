"""Hostile checkpoints and side files (issue 14, classes 1, 3, 5, 6 and 9 for the readers): every header
entry validated on its own after JSON decoding, whatever its order or spelling; nothing the safetensors
library refuses is accepted (a differential test against `safetensors.safe_open`); side files read with a
size cap and never waited on; manifests checked whole; each refusal one message naming the file, exit 2.

HOSTILE_CASES run as real processes under tests/hostile.py's memory cap and time limit; the variant
generators run the same assertions in-process under an alarm and a tracemalloc ceiling (test_fuzz's
`bounded`), or, where a file is large, as processes too.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hostile import assert_refused, check_case, run_hostile
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st_
from safetensors import safe_open
from test_bad_inputs import (
    CONVERT,
    GOOD,
    RENAME,
    Case,
    Fifo,
    Link,
    _snapshot,
    _write,
    ckpt,
    entry,
    index,
    st,
    tensors,
)
from test_fuzz import EXAMPLES, bounded

from convspec import manifest
from convspec.cli import main
from convspec.io import sidefile
from convspec.io.safetensors import MAX_HEADER, SAFETENSORS_CODES, CheckpointError, read_header
from convspec.io.sidefile import MAX_CONFIG_BYTES, MAX_INDEX_BYTES, MAX_MANIFEST_BYTES

ROOT = Path(__file__).resolve().parent.parent
E16 = json.dumps(entry()).encode()  # float32[4] at [0, 16)
E32 = json.dumps(entry(offsets=(16, 32))).encode()  # float32[4] at [16, 32)
VERIFY_MANIFEST = ("verify", "{d}/spec.yaml", "{d}/src", "--converted", "{d}/out", "--manifest")


def raw(header: bytes, data: bytes = b"\0" * 16) -> bytes:
    """A safetensors file whose header is exactly these bytes (escapes and duplicate keys kept)."""
    return struct.pack("<Q", len(header)) + header + data


def manifest_case(name: str, text: str, expected: str) -> Case:
    """`verify --manifest` of a converted directory whose manifest is `text`."""
    files = {
        "spec.yaml": RENAME,
        "src/model.safetensors": GOOD,
        "out/model.safetensors": tensors("m.b"),
        "out/convspec-manifest.json": text,
    }
    return Case(name, "side file", files, VERIFY_MANIFEST, expected)


def good_manifest(**change) -> dict:
    d = {
        "convspec_manifest": 1,
        "spec": "t",
        "reverse": False,
        "dtype": None,
        "source": {"m.a": "0" * 64},
        "output": {
            "m.b": {"sha256": "0" * 64, "dtype": "float32", "shape": [4], "file": "model.safetensors"}
        },
    }
    d.update(change)
    return d


_ALL = [
    # ---- class 3: validation that depended on order or spelling ----------------------------------
    ckpt(
        "escaped_duplicate_field_drops_a_tensors_bytes",
        {
            "model.safetensors": raw(
                b'{"m.a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], '
                b'"data_offset\\u0073": [16, 32]}}',
                b"\0" * 32,
            )
        },
        "error: {d}/src/model.safetensors: header has the key 'data_offsets' twice",
    ),
    ckpt(
        "escaped_duplicate_tensor_key",
        {"model.safetensors": raw(b'{"m.a": ' + E16 + b', "m.\\u0061": ' + E32 + b"}", b"\0" * 32)},
        "error: {d}/src/model.safetensors: header has the key 'm.a' twice",
    ),
    ckpt(
        "float_dim_after_an_int_shaped_twin",
        {"model.safetensors": st({"m.a": entry(), "m.b": entry(shape=(4.0,), offsets=(16, 32))}, b"\0" * 32)},
        "error: {d}/src/model.safetensors: tensor m.b: shape [4.0] is not a list of integers",
    ),
    ckpt(
        "bool_dim_after_an_int_shaped_twin",
        {
            "model.safetensors": st(
                {"m.a": entry(shape=(1, 4)), "m.b": entry(shape=(True, 4), offsets=(16, 32))}, b"\0" * 32
            )
        },
        "error: {d}/src/model.safetensors: tensor m.b: shape [True, 4] is not a list of integers",
    ),
    ckpt(
        "negative_zero_dim",  # serde_json reads -0 as a float, and so the safetensors library refuses it
        {"model.safetensors": raw(b'{"m.a": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', b"")},
        "error: {d}/src/model.safetensors: tensor m.a: shape [-0.0] is not a list of integers",
    ),
    ckpt(
        "metadata_a_list",
        {"model.safetensors": raw(b'{"__metadata__": [], "m.a": ' + E16 + b"}")},
        "error: {d}/src/model.safetensors: __metadata__ is a list, not an object of strings",
    ),
    ckpt(
        "metadata_spelled_with_an_escape",
        {"model.safetensors": raw(b'{"__metadat\\u0061__": {"k": 1}, "m.a": ' + E16 + b"}")},
        "error: {d}/src/model.safetensors: __metadata__: the value of 'k' is an integer, not a string",
    ),
    ckpt(
        "tensor_named_metadata",
        {"model.safetensors": st({"__metadata__": entry(), "m.a": entry(offsets=(16, 32))}, b"\0" * 32)},
        "error: {d}/src/model.safetensors: a tensor cannot be named __metadata__",
    ),
    ckpt(
        "bytes_between_tensors",
        {"model.safetensors": st({"m.a": entry(shape=(2,), offsets=(8, 16))}, b"\0" * 16)},
        "error: {d}/src/model.safetensors: bytes [0, 8) of the data belong to no tensor",
    ),
    ckpt(
        "bytes_after_the_last_tensor",
        {"model.safetensors": st({"m.a": entry()}, b"\0" * 32)},
        "error: {d}/src/model.safetensors: 16 bytes after the last tensor's data belong to no tensor",
    ),
    ckpt(
        "index_with_an_empty_weight_map",
        {"model.safetensors.index.json": index({}), "model.safetensors": GOOD},
        "error: {d}/src/model.safetensors.index.json: the weight_map is empty: the index names no tensor",
    ),
    ckpt(
        "index_key_given_twice_by_an_escape",
        {
            "model.safetensors.index.json": '{"weight_map": {"m.a": "model.safetensors", '
            '"m.\\u0061": "other.safetensors"}}',
            "model.safetensors": GOOD,
        },
        "error: {d}/src/model.safetensors.index.json: the key 'm.a' is given twice in one object",
    ),
    ckpt(
        "index_lists_a_tensor_its_shard_lacks",
        {
            "model.safetensors.index.json": index({"m.a": "model.safetensors", "m.z": "model.safetensors"}),
            "model.safetensors": GOOD,
        },
        "error: {d}/src/model.safetensors.index.json: the weight_map lists tensor m.z in model.safetensors, "
        "which has no such tensor",
    ),
    ckpt(
        "index_omits_a_tensor_of_its_shard",
        {
            "model.safetensors.index.json": index({"m.a": "model.safetensors"}),
            "model.safetensors": tensors("m.a", "n.a"),
        },
        "error: {d}/src/model.safetensors.index.json: tensor n.a of shard model.safetensors is not in the "
        "weight_map",
    ),
    ckpt(
        "index_puts_a_tensor_in_the_wrong_shard",
        {
            "model.safetensors.index.json": index({"m.a": "b.safetensors", "n.a": "b.safetensors"}),
            "b.safetensors": tensors("n.a"),
            "c.safetensors": tensors("m.a"),  # not named by the index: never read
        },
        "error: {d}/src/model.safetensors.index.json: the weight_map lists tensor m.a in b.safetensors, "
        "which has no such tensor",
    ),
    # ---- class 5: what the operating system says about a file, one message each ----------------
    ckpt(
        "index_a_symlink_to_a_pipe",
        {"model.safetensors.index.json": Link("{d}/src/pipe"), "pipe": Fifo(), "model.safetensors": GOOD},
        "error: {d}/src/model.safetensors.index.json: not a regular file (a named pipe)",
    ),
    ckpt(
        "index_a_directory",
        {"model.safetensors.index.json/x": "x", "model.safetensors": GOOD},
        "error: {d}/src/model.safetensors.index.json: is a directory, not a checkpoint index",
    ),
    ckpt(
        "index_a_symlink_loop",
        {
            "model.safetensors.index.json": Link("{d}/src/model.safetensors.index.json"),
            "model.safetensors": GOOD,
        },
        "error: {d}/src/model.safetensors.index.json: cannot follow it (Too many levels of symbolic links)",
    ),
    ckpt(
        "shard_a_symlink_to_a_pipe",
        {
            "model.safetensors.index.json": index({"m.a": "model.safetensors"}),
            "model.safetensors": Link("{d}/src/weights/pipe"),
            "weights/pipe": Fifo(),
        },
        "error: {d}/src/model.safetensors: not a regular file (a named pipe)",
    ),
    ckpt(
        "config_a_symlink_to_a_pipe",
        {"config.json": Link("{d}/src/weights/pipe"), "weights/pipe": Fifo(), "model.safetensors": GOOD},
        "error: {d}/src/config.json: not a regular file (a named pipe)",
        kind="config",
    ),
    ckpt(
        "config_a_directory",
        {"config.json/x": "{}", "model.safetensors": GOOD},
        "error: {d}/src/config.json: is a directory, not a config file",
        kind="config",
    ),
    ckpt(
        "config_a_symlink_loop",
        {"config.json": Link("{d}/src/config.json"), "model.safetensors": GOOD},
        "error: {d}/src/config.json: cannot follow it (Too many levels of symbolic links)",
        kind="config",
    ),
    ckpt(
        "side_file_a_pipe",  # was silently left out of the output
        {"tokenizer.json": Fifo(), "model.safetensors": GOOD},
        "error: {d}/src/tokenizer.json: not a regular file (a named pipe)",
        kind="side file",
    ),
    ckpt(
        "side_file_a_broken_link",  # was silently left out of the output
        {"tokenizer.json": Link("{d}/src/gone.json"), "model.safetensors": GOOD},
        "error: {d}/src/tokenizer.json: does not exist",
        kind="side file",
    ),
    # ---- class 6: manifests, checked whole ---------------------------------------------------------
    manifest_case(
        "manifest_5000_digit_integer",
        json.dumps(good_manifest()).replace('"reverse": false', '"reverse": ' + "9" * 5000),
        "error: {d}/out/convspec-manifest.json: invalid JSON (Exceeds the limit (4300 digits)",
    ),
    manifest_case(
        "manifest_nested_100k_deep",
        json.dumps(good_manifest(spec="@")).replace('"@"', "[" * 100_000 + "]" * 100_000),
        "error: {d}/out/convspec-manifest.json: invalid JSON (nested too deeply)",
    ),
    manifest_case(
        "manifest_format_true",  # True == 1 in Python: the format must be the integer 1
        json.dumps(good_manifest(convspec_manifest=True)),
        "error: {d}/out/convspec-manifest.json: not a convspec manifest (format 1)",
    ),
    manifest_case(
        "manifest_digest_a_number",
        json.dumps(good_manifest(source={"m.a": 5})),
        "error: {d}/out/convspec-manifest.json: source['m.a']: not a sha256 digest (64 lowercase hex digits)",
    ),
    manifest_case(
        "manifest_a_pipe",
        Fifo(),
        "error: {d}/out/convspec-manifest.json: not a regular file (a named pipe)",
    ),
]


# The examples, and one of each kind, run as processes (a process costs a second or two of
# imports); the other cases are variants of them, run in-process with the same assertions below.
_PROCESS = {
    "escaped_duplicate_field_drops_a_tensors_bytes",
    "escaped_duplicate_tensor_key",
    "float_dim_after_an_int_shaped_twin",
    "bool_dim_after_an_int_shaped_twin",
    "metadata_a_list",
    "tensor_named_metadata",
    "index_with_an_empty_weight_map",
    "index_a_symlink_to_a_pipe",
    "config_a_symlink_to_a_pipe",
    "shard_a_symlink_to_a_pipe",
    "side_file_a_pipe",
    "manifest_5000_digit_integer",
    "manifest_nested_100k_deep",
}
HOSTILE_CASES = [c for c in _ALL if c.name in _PROCESS]
VARIANT_CASES = [c for c in _ALL if c.name not in _PROCESS]


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=lambda c: c.name)
def test_hostile_reader_case(case: Case, tmp_path):
    check_case(case, tmp_path)


@pytest.mark.parametrize("case", VARIANT_CASES, ids=lambda c: c.name)
def test_variant_case_in_process(case: Case, tmp_path, capsys, plain):
    _write(case, tmp_path)
    refused(list(case.argv), tmp_path, case.expected, capsys)


def test_the_cases_are_distinct_and_name_their_file():
    assert len(HOSTILE_CASES) == len(_PROCESS)
    assert len({c.name for c in _ALL}) == len(_ALL)
    assert len({c.expected for c in _ALL}) == len(_ALL)
    assert all(c.expected.startswith("error: {d}/") for c in _ALL)


# ---- in-process variants: the same promises under an alarm and a tracemalloc ceiling --------------


@pytest.fixture
def plain(monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")


def refused(argv: list[str], d: Path, expected: str, capsys) -> str:
    """`convspec ARGV` in this process exits 2 with one error line holding `expected`, within the
    time and memory bounds, and writes or changes nothing under `d`."""
    before = _snapshot(d)
    capsys.readouterr()
    code = bounded(main, [a.replace("{d}", str(d)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert expected.replace("{d}", str(d)) in lines[0], lines[0]
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    assert _snapshot(d) == before
    return lines[0]


def files(d: Path, spec: dict) -> Path:
    for rel, content in spec.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    (d / "spec.yaml").write_text(RENAME)
    return d


def escape(text: str, which: list[int], upper: bool) -> str:
    """A JSON string literal of `text` with the characters at `which` written as \\uXXXX escapes."""
    out = []
    for i, ch in enumerate(text):
        if i in which:
            code = f"{ord(ch):04x}"
            out.append("\\u" + (code.upper() if upper else code))
        else:
            out.append(json.dumps(ch)[1:-1])
    return '"' + "".join(out) + '"'


@settings(max_examples=min(EXAMPLES, 25), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    target=st_.sampled_from(["tensor", "field", "metadata_key", "metadata", "index_key"]),
    which=st_.lists(st_.integers(0, 12), max_size=4),
    upper=st_.booleans(),
    same_value=st_.booleans(),
    first_escaped=st_.booleans(),
)
def test_a_key_given_twice_is_refused_however_it_is_spelled(
    tmp_path_factory, capsys, target, which, upper, same_value, first_escaped
):
    """Any key of any object given twice, in any mix of escapes, with the same or another value."""
    d = tmp_path_factory.mktemp("dup")

    def twice(name: str) -> tuple[str, str]:
        plain_, escaped = json.dumps(name), escape(name, which, upper)
        return (escaped, plain_) if first_escaped else (plain_, escaped)

    if target == "index_key":
        a, b = twice("m.a")
        other = "model.safetensors" if same_value else "x.safetensors"
        text = f'{{"weight_map": {{{a}: "model.safetensors", {b}: "{other}"}}}}'
        files(d, {"src/model.safetensors": GOOD, "src/model.safetensors.index.json": text})
        expected = "the key 'm.a' is given twice in one object"
    else:
        second = b'{"dtype": "F32", "shape": [4], "data_offsets": [%d, %d]}' % (
            (0, 16) if same_value else (16, 32)
        )
        if target == "tensor":
            a, b = twice("m.a")
            header = f"{{{a}: ".encode() + E16 + f", {b}: ".encode() + second + b"}"
            key = "m.a"
        elif target == "field":
            a, b = twice("data_offsets")
            off = "[0, 16]" if same_value else "[16, 32]"
            header = f'{{"m.a": {{"dtype": "F32", "shape": [4], {a}: [0, 16], {b}: {off}}}}}'.encode()
            key = "data_offsets"
        elif target == "metadata_key":
            a, b = twice("format")
            header = (
                f'{{"__metadata__": {{{a}: "pt", {b}: "{"pt" if same_value else "np"}"}}, "m.a": '.encode()
            )
            header += E16 + b"}"
            key = "format"
        else:
            a, b = twice("__metadata__")
            header = f'{{{a}: {{}}, {b}: {{"k": "v"}}, "m.a": '.encode() + E16 + b"}"
            key = "__metadata__"
        files(d, {"src/model.safetensors": raw(header, b"\0" * 32)})
        expected = f"header has the key {key!r} twice"
    event(target)
    refused(list(CONVERT), d, expected, capsys)


BAD_NUMBERS = [
    "4.0",
    "4e0",
    "4.5",
    "true",
    "false",
    "-0",
    "null",
    '"4"',
    "[4]",
    "{}",
    "-4",
    "18446744073709551616",
]


@pytest.mark.parametrize("bad", BAD_NUMBERS)
@pytest.mark.parametrize("where", ["dim", "offset"])
@pytest.mark.parametrize("order", ["alone", "after_a_twin", "before_a_twin"])
def test_a_bad_number_is_refused_in_any_order(bad, where, order, tmp_path):
    """A dim or an offset that is no JSON integer in range is refused whether or not an int-shaped twin
    (same dtype and value) comes before or after it."""
    if where == "dim":
        hostile = b'{"dtype": "F32", "shape": [%s], "data_offsets": [%%d, %%d]}' % bad.encode()
    else:
        hostile = b'{"dtype": "F32", "shape": [4], "data_offsets": [%s, %%d]}' % bad.encode()
    at = 0 if order in ("alone", "before_a_twin") else 16
    hostile = hostile % ((at, at + 16) if where == "dim" else (at + 16,))
    twin = b'{"dtype": "F32", "shape": [4], "data_offsets": [%d, %d]}' % ((16, 32) if at == 0 else (0, 16))
    pairs = {"alone": [(b"h", hostile)], "after_a_twin": [(b"t", twin), (b"h", hostile)]}
    pairs["before_a_twin"] = [(b"h", hostile), (b"t", twin)]
    header = b"{" + b", ".join(b'"%s": %s' % kv for kv in pairs[order]) + b"}"
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw(header, b"\0" * (16 if order == "alone" else 32)))
    err = bounded(read_header, path)
    assert isinstance(err, CheckpointError), (bad, where, order, err)
    assert f"{path}: tensor h: " in err.message, err.message


@pytest.mark.parametrize(
    "meta, accepted",
    [
        ("[]", False),
        ('["k", "v"]', False),
        ("5", False),
        ('"k"', False),
        ("true", False),
        ('{"k": 1}', False),
        ('{"k": null}', False),
        ('{"k": ["v"]}', False),
        ('{"k": {"a": "b"}}', False),
        (json.dumps(entry(offsets=(16, 32))), False),  # a tensor named __metadata__
        ("{}", True),
        ('{"format": "pt"}', True),
        ("null", True),
    ],
)
def test_metadata_must_be_an_object_of_strings(meta, accepted, tmp_path):
    """Every shape of `__metadata__`, checked alike by convspec and the safetensors library."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw(b'{"__metadata__": %s, "m.a": %s}' % (meta.encode(), E16)))
    outcome = bounded(read_header, path)
    assert isinstance(outcome, list) == accepted, outcome
    assert safetensors_accepts(path) == accepted


def test_an_index_must_agree_with_its_shards(tmp_path, capsys, plain):
    """Every way an index and its shards can disagree is refused, naming the index."""
    shards = {"src/a.safetensors": tensors("m.a"), "src/b.safetensors": tensors("n.a")}
    variants = {
        "empty": ({}, "the weight_map is empty"),
        "missing_key": (
            {"m.a": "a.safetensors", "z.a": "b.safetensors"},
            "tensor n.a of shard b.safetensors is not in the weight_map",
        ),
        "swapped": (
            {"m.a": "b.safetensors", "n.a": "a.safetensors"},
            "the weight_map puts tensor n.a in a.safetensors, but it is in b.safetensors",
        ),
        "extra_key": (
            {"m.a": "a.safetensors", "n.a": "b.safetensors", "o.a": "b.safetensors"},
            "the weight_map lists tensor o.a in b.safetensors, which has no such tensor",
        ),
    }
    for name, (weight_map, expected) in variants.items():
        d = files(tmp_path / name, {**shards, "src/model.safetensors.index.json": index(weight_map)})
        for argv in (CONVERT, ("compile", "{d}/spec.yaml", "--against", "{d}/src")):
            refused(list(argv), d, "error: {d}/src/model.safetensors.index.json: " + expected, capsys)


KINDS = ["pipe", "link_to_pipe", "directory", "link_loop", "broken_link"]


def make(path: Path, kind: str) -> None:
    """Something at `path` that is not a regular file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "pipe":
        os.mkfifo(path)
    elif kind == "link_to_pipe":  # the pipe in a subdirectory, which a conversion does not copy
        (path.parent / "pipes").mkdir()
        os.mkfifo(path.parent / "pipes" / "p")
        path.symlink_to("pipes/p")
    elif kind == "directory":
        path.mkdir()
    elif kind == "link_loop":
        path.symlink_to(path.name)
    else:
        path.symlink_to("nowhere")


ROLES = ["index", "config", "shard", "side", "manifest"]


@pytest.mark.parametrize(
    "role, kind",
    [(r, k) for r in ROLES for k in KINDS if (r, k) != ("side", "directory")],  # a subdirectory: not copied
)
def test_a_file_that_is_not_a_regular_file_is_one_error_naming_it(role, kind, tmp_path, capsys, plain):
    """Every file convspec reads from a checkpoint, when it is a pipe (or a link to one), a directory,
    a link loop or a broken link: one error naming it, exit 2, and no wait on a pipe (the alarm)."""
    d = files(tmp_path, {"src/model.safetensors": GOOD})
    argv = list(CONVERT)
    name = {
        "index": "src/model.safetensors.index.json",
        "config": "src/config.json",
        "side": "src/tokenizer.json",
        "manifest": "out/convspec-manifest.json",
        "shard": "src/model-00001.safetensors",
    }[role]
    if role == "shard":
        (d / "src/model.safetensors").unlink()
        (d / "src/model.safetensors.index.json").write_text(index({"m.a": "model-00001.safetensors"}))
    if role == "manifest":
        files(d, {"out/model.safetensors": tensors("m.b")})
        argv = list(VERIFY_MANIFEST)
    make(d / name, kind)
    line = refused(argv, d, "", capsys)
    assert line.startswith(f"error: {d}/") and Path(name).name in line, line  # a shard: named by the index


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["compile", "check", "explain"])
def test_a_config_that_is_not_a_regular_file_is_refused_by_every_command_that_reads_it(
    command, kind, tmp_path, capsys, plain
):
    """`--against DIR` reads DIR's config.json through the same check as convert: never skipped as absent."""
    d = files(tmp_path, {"src/model.safetensors": GOOD, "spec.yaml": RENAME})
    make(d / "src/config.json", kind)
    argv = [command, "{d}/spec.yaml", *(["m.a"] if command == "explain" else []), "--against", "{d}/src"]
    line = refused(argv, d, "", capsys)
    assert line.startswith(f"error: {d}/src/config.json: "), line


def test_an_unreadable_file_is_one_error_naming_it(tmp_path, capsys, plain, monkeypatch):
    """EACCES on a config, an index or a manifest: one message naming the file. Root reads any file, so
    the denial is injected into the one place side files are opened (the process case below runs it
    for real when the tests do not run as root)."""
    d = files(tmp_path, {"src/model.safetensors": GOOD, "src/config.json": "{}"})
    target = d / "src/config.json"
    real_open = os.open

    def deny(path, flags, *a, **kw):
        if Path(path) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(sidefile.os, "open", deny)
    refused(list(CONVERT), d, f"error: {target}: permission denied", capsys)
    refused(
        ["compile", "{d}/spec.yaml", "--config", str(target)],
        d,
        f"error: {target}: permission denied",
        capsys,
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000; the in-process test covers it")
def test_an_unreadable_config_for_real(tmp_path):
    case = ckpt(
        "config_unreadable",
        {"config.json": "{}", "model.safetensors": GOOD},
        "error: {d}/src/config.json: permission denied",
        kind="config",
    )
    _write(case, tmp_path)
    (tmp_path / "src/config.json").chmod(0)
    before = _snapshot(tmp_path)
    assert_refused(case, tmp_path, run_hostile(case, tmp_path), before)


# ---- class 1: side files read with a size cap, never whole ------------------------------------------

GIB = 1 << 30


def sparse(path: Path, size: int, prefix: bytes = b"") -> None:
    """A file of `size` bytes that costs no disk: `prefix`, then a hole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(prefix)
    os.truncate(path, size)


CAPS = {
    "index": (MAX_INDEX_BYTES, "checkpoint index"),
    "config": (MAX_CONFIG_BYTES, "config file"),
    "manifest": (MAX_MANIFEST_BYTES, "manifest"),
}


def oversized(role: str, size: int, tmp_path: Path) -> tuple[Case, Path, Path]:
    """A case reading a side file of `size` bytes (sparse: no disk). The file lives beside the case's
    directory, so the harness never reads it to compare; the case's directory is returned too."""
    d, big = tmp_path / "case", tmp_path / "big"
    d.mkdir()
    if role == "index":
        (big / "src").mkdir(parents=True)
        (big / "src/model.safetensors").write_bytes(GOOD)
        target = big / "src/model.safetensors.index.json"
        argv = ("convert", "{d}/spec.yaml", "{d}/../big/src", "{d}/out")
    elif role == "config":
        target = big / "config.json"
        argv = ("compile", "{d}/spec.yaml", "--config", "{d}/../big/config.json")
    else:
        (big / "out").mkdir(parents=True)
        (big / "out/model.safetensors").write_bytes(tensors("m.b"))
        target = big / "out/convspec-manifest.json"
        argv = ("verify", "{d}/spec.yaml", "{d}/src", "--converted", "{d}/../big/out", "--manifest")
    sparse(target, size, b'{"weight_map": {"m.a": "model.safetensors"}, "pad": "')
    cap, what = CAPS[role]
    expected = f"error: {{d}}/../big/{target.relative_to(big)}: {size} bytes, over the limit of {cap} bytes for a {what}"
    files = {"spec.yaml": RENAME, "src/model.safetensors": GOOD}
    return Case(f"{role}_{size}", "side file", files, argv, expected), d, big


def _state(big: Path) -> list:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in big.rglob("*"))


@pytest.mark.parametrize("role", ["index", "config"])  # the two; the manifest's cap: in-process
def test_a_side_file_of_one_and_a_half_gigabytes_is_refused_unread(role, tmp_path):
    """The issue's example, as a real process under the 1 GiB memory cap: read whole, a 1.5 GB index,
    config.json or manifest does not fit; refused by name with its cap, it costs nothing."""
    case, d, big = oversized(role, 3 * GIB // 2, tmp_path)
    before = _state(big)
    check_case(case, d)
    assert _state(big) == before


@pytest.mark.parametrize("role", sorted(CAPS))
@pytest.mark.parametrize("over", [1, 4096, 1 << 20])
def test_a_side_file_just_past_its_cap_is_refused_unread(role, over, tmp_path, capsys, plain):
    """Just past each cap, in-process under the tracemalloc ceiling (64 MiB, below every cap): nothing of
    the file is read."""
    cap = CAPS[role][0]
    case, d, big = oversized(role, cap + over, tmp_path)
    _write(case, d)
    before = _state(big)
    refused(list(case.argv), d, case.expected, capsys)
    assert _state(big) == before


@pytest.mark.parametrize("size", [0, 99, 100, 101, 4096])
def test_the_cap_is_inclusive(size, tmp_path):
    """A file of exactly the cap is read whole; one byte more is refused."""
    path = tmp_path / "f.json"
    path.write_bytes(b"x" * size)
    if size <= 100:
        assert sidefile.read_capped(path, 100) == b"x" * size
    else:
        with pytest.raises(
            sidefile.ConvspecError, match=f"{size} bytes, over the limit of 100 bytes for a file"
        ):
            sidefile.read_capped(path, 100)


def test_a_header_length_past_the_librarys_limit_is_refused_by_both(tmp_path):
    """MAX_HEADER is the safetensors library's own limit: one byte more, and both refuse (a sparse file)."""
    path = tmp_path / "big.safetensors"
    sparse(path, 8 + MAX_HEADER + 1, struct.pack("<Q", MAX_HEADER + 1) + b"{}")
    err = bounded(read_header, path)
    assert isinstance(err, CheckpointError), err
    assert err.message == f"{path}: header length {MAX_HEADER + 1} is over the limit of 100000000 bytes"
    assert not safetensors_accepts(path)


def test_a_side_file_that_grows_is_read_no_further_than_its_cap(tmp_path, monkeypatch):
    """A file whose size says it fits but that grows while read (fstat lies, e.g. /proc, or a writer
    appending) is read at most cap + 1 bytes, then refused."""
    path = tmp_path / "config.json"
    sparse(path, 10_000)
    reads = []
    real_read, real_fstat = os.read, os.fstat

    def fake_fstat(fd):
        s = real_fstat(fd)
        return os.stat_result((s.st_mode, s.st_ino, s.st_dev, s.st_nlink, s.st_uid, s.st_gid, 10, 0, 0, 0))

    def counting_read(fd, n):
        data = real_read(fd, n)
        reads.append(len(data))
        return data

    monkeypatch.setattr(sidefile.os, "read", counting_read)
    monkeypatch.setattr(sidefile.os, "fstat", fake_fstat)
    with pytest.raises(
        Exception, match=r"more than 100 bytes, over the limit of 100 bytes for a config file"
    ):
        sidefile.read_capped(path, 100, what="config file")
    assert sum(reads) == 101


# ---- class 6: manifests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A checkpoint and its conversion with a manifest: the seeds of the manifest variants."""
    d = tmp_path_factory.mktemp("conv")
    files(d, {"src/model.safetensors": tensors("m.a", "n.a")})
    assert (
        main(["convert", str(d / "spec.yaml"), str(d / "src"), str(d / "out"), "--manifest", "--quiet"]) == 0
    )
    return d


@pytest.mark.parametrize("digits", [4301, 5000])
@pytest.mark.parametrize("depth", [0, 1_000, 100_000])
@pytest.mark.parametrize("field", ["convspec_manifest", "source", "shape"])
def test_a_manifest_of_huge_numbers_or_deep_nesting_is_one_error(
    digits, depth, field, converted, tmp_path, capsys, plain
):
    """5000-digit integers and 100k-deep nesting, wherever they sit in a manifest: one error, exit 2."""
    d = tmp_path / "d"
    shutil.copytree(converted, d)
    path = d / "out" / manifest.MANIFEST
    m = json.loads(path.read_text())
    bomb = "[" * depth + "9" * digits + "]" * depth
    if field == "convspec_manifest":
        m[field] = "@"
    elif field == "source":
        m["source"]["m.a"] = "@"
    else:
        m["output"]["m.b"]["shape"] = ["@"]
    path.write_text(json.dumps(m).replace('"@"', bomb))
    argv = ["verify", "{d}/spec.yaml", "{d}/src", "--converted", "{d}/out", "--manifest"]
    line = refused(argv, d, f"error: {path}: ", capsys)
    assert "invalid JSON" in line, line


json_value = st_.recursive(
    st_.none()
    | st_.booleans()
    | st_.integers(-(2**70), 2**70)
    | st_.floats(allow_nan=False)
    | st_.text(max_size=70)
    | st_.sampled_from(["0" * 64, "F" * 64, "float32", "model.safetensors", "../x", "/"]),
    lambda c: st_.lists(c, max_size=3) | st_.dictionaries(st_.text(max_size=6), c, max_size=3),
    max_leaves=8,
)


@settings(max_examples=min(EXAMPLES, 50), deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st_.data())
def test_a_mutated_manifest_is_valid_or_one_error(converted, data):
    """Any field of a real manifest replaced, removed or added: load() gives a manifest that check() can
    use, or one ConvspecError naming the file; never another exception."""
    path = converted / "out" / manifest.MANIFEST
    good = json.loads(path.read_text())
    m = json.loads(json.dumps(good))
    for _ in range(data.draw(st_.integers(1, 3))):
        spot = data.draw(st_.sampled_from(["top", "source", "output", "entry", "drop", "add"]))
        value = data.draw(json_value)
        if spot == "top":
            m[data.draw(st_.sampled_from(sorted(manifest._FIELDS)))] = value
        elif spot in ("source", "output") and isinstance(m.get(spot), dict) and m[spot]:
            m[spot][data.draw(st_.sampled_from(sorted(m[spot])))] = value
        elif (
            spot == "entry" and isinstance(m.get("output"), dict) and isinstance(m["output"].get("m.b"), dict)
        ):
            m["output"]["m.b"][data.draw(st_.sampled_from(["sha256", "dtype", "shape", "file"]))] = value
        elif spot == "drop" and m:
            m.pop(data.draw(st_.sampled_from(sorted(m))))
        elif spot == "add":
            m[data.draw(st_.text(max_size=6))] = value
    path.write_text(json.dumps(m))
    try:
        outcome = bounded(manifest.load, converted / "out")
        if not isinstance(outcome, Exception):
            event("accepted")
            bounded(manifest.check, converted / "src", converted / "out")
        else:
            event("refused")
            assert str(path) in outcome.message, outcome.message
    finally:
        path.write_text(json.dumps(good, indent=1, sort_keys=True) + "\n")


# ---- class 9: what a manifest proves -------------------------------------------------------------------


def test_a_relabelled_or_forged_manifest_passes_verify_manifest_but_not_a_fresh_conversion(
    converted, tmp_path, capsys
):
    """docs/safety.md, section 5: a manifest is a checksum list anyone who can write the output can
    rewrite. Relabelled (another spec's name) or rewritten with the hashes of a changed output, it still
    passes `verify --manifest`; `verify --converted` (no manifest) converts again and catches it."""
    d = tmp_path / "d"
    shutil.copytree(converted, d)
    out, path = d / "out", d / "out" / manifest.MANIFEST
    m = json.loads(path.read_text())
    m["spec"] = "mixtral"  # relabelled: written by another spec, says the manifest
    path.write_text(json.dumps(m))
    assert main(["verify", "mixtral", str(d / "src"), "--converted", str(out), "--manifest"]) == 0
    f = out / m["output"]["m.b"]["file"]  # an output tensor changed, and its hash rewritten to match
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    m["spec"] = "t"
    now = manifest.digests(manifest.read_layout(out))
    m["output"] = {k: dict(v, sha256=now[k]) for k, v in m["output"].items()}
    path.write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["verify", str(d / "spec.yaml"), str(d / "src"), "--converted", str(out), "--manifest"]) == 0
    assert "match the manifest" in capsys.readouterr().out
    assert main(["verify", str(d / "spec.yaml"), str(d / "src"), "--converted", str(out)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


# ---- the differential test: never accept what the safetensors library refuses ---------------------


def safetensors_accepts(path: Path) -> bool:
    """Whether the safetensors library opens the file and can read every tensor's bytes."""
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                f.get_slice(k)
        return True
    except Exception:  # noqa: BLE001 - the library raises SafetensorError and others: all mean refused
        return False


class Raw(str):
    """JSON text written as is: `4.0`, `-0`, `"m.\\u0061"`, a duplicate key."""


def dump(value) -> str:
    """JSON text of `value`, where an object is a list of (key text, value) pairs (keys may repeat,
    and be spelled with escapes) and Raw text goes in unchanged."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Obj):
        return "{" + ", ".join(f"{k}: {dump(v)}" for k, v in value.pairs) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value)


class Obj:
    def __init__(self, pairs: list):
        self.pairs = pairs


ST_DTYPES = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "F64": 8,
}
NAMES = ["m.a", "m.b", "w", "x.y.z", "é", "", "__metadata_", "a\nb"]
ODD = [Raw(t) for t in ("4.0", "4e0", "1.5", "true", "false", "-0", "null", "-1", "18446744073709551616")]
ODD += ["4", [], {}, [1, 2, 3]]


@st_.composite
def header_files(draw):
    """A safetensors file built field by field, then mutated: escapes, duplicate keys, the type of any
    field, bool and float numbers, metadata shapes, offsets, padding. Returns (bytes, ambiguous)."""
    n = draw(st_.integers(0, 4))
    names = draw(st_.lists(st_.sampled_from(NAMES), min_size=n, max_size=n, unique=True))
    tensors_, at = [], 0
    for name in names:
        dtype = draw(st_.sampled_from(sorted(ST_DTYPES)))
        shape = draw(st_.lists(st_.integers(0, 3), max_size=3))
        size = ST_DTYPES[dtype]
        for s in shape:
            size *= s
        fields = [('"dtype"', dtype), ('"shape"', list(shape)), ('"data_offsets"', [at, at + size])]
        tensors_.append([json.dumps(name), Obj(fields)])
        at += size
    data = bytes(draw(st_.integers(0, 255)) for _ in range(min(at, 4))) + b"\1" * max(at - 4, 0)
    pairs = [tuple(t) for t in tensors_]
    meta = draw(st_.sampled_from([None, "absent", Obj([('"format"', "pt")])]))
    if meta != "absent":
        pairs.insert(draw(st_.integers(0, len(pairs))), ('"__metadata__"', meta))
    for _ in range(draw(st_.integers(0, 3))):
        kind = draw(
            st_.sampled_from(
                ["escape", "duplicate", "retype", "metadata", "offsets", "reorder", "extra", "pad", "rename"]
            )
        )
        event(kind)
        tensor_pairs = [i for i, (k, v) in enumerate(pairs) if isinstance(v, Obj) and k != '"__metadata__"']
        if kind == "escape" and pairs:  # same meaning, another spelling
            i = draw(st_.integers(0, len(pairs) - 1))
            k, v = pairs[i]
            text = json.loads(k)
            if text:
                pairs[i] = (
                    escape(text, draw(st_.lists(st_.integers(0, len(text) - 1))), draw(st_.booleans())),
                    v,
                )
        elif kind == "duplicate" and pairs:  # a key twice, here or in an entry: ambiguous
            objs = [(None, pairs)] + [(i, pairs[i][1].pairs) for i in tensor_pairs]
            _, where = draw(st_.sampled_from(objs))
            if where:
                k, v = draw(st_.sampled_from(where))
                text = json.loads(k)
                k2 = (
                    escape(text, draw(st_.lists(st_.integers(0, max(len(text) - 1, 0)))), False)
                    if text
                    else k
                )
                where.insert(draw(st_.integers(0, len(where))), (k2, v))
        elif kind == "retype" and tensor_pairs:  # any field, or one number in it, of another JSON type
            obj = pairs[draw(st_.sampled_from(tensor_pairs))][1]
            j = draw(st_.integers(0, len(obj.pairs) - 1))
            k, v = obj.pairs[j]
            if isinstance(v, list) and v and draw(st_.booleans()):
                v = list(v)
                v[draw(st_.integers(0, len(v) - 1))] = draw(st_.sampled_from(ODD))
            else:
                v = draw(st_.sampled_from([*ODD, "f32", "F33", "C64"]))
            obj.pairs[j] = (k, v)
        elif kind == "metadata":
            value = draw(
                st_.sampled_from(
                    [
                        Raw("[]"),
                        Raw("5"),
                        "s",
                        Raw("null"),
                        Obj([('"k"', Raw("1"))]),
                        Obj([('"k"', Raw("null"))]),
                    ]
                    + [Obj([('"k"', ["v"])]), Obj([]), Obj([('"a"', "b")])]
                )
            )
            pairs = [p for p in pairs if p[0] != '"__metadata__"'] + [('"__metadata__"', value)]
        elif kind == "offsets" and tensor_pairs:
            obj = pairs[draw(st_.sampled_from(tensor_pairs))][1]
            j = [i for i, (k, _) in enumerate(obj.pairs) if k == '"data_offsets"']
            if j and isinstance(obj.pairs[j[0]][1], list) and len(obj.pairs[j[0]][1]) == 2:
                a, b = obj.pairs[j[0]][1]
                if isinstance(a, int) and isinstance(b, int):
                    da, db = draw(st_.integers(-4, 4)), draw(st_.integers(-4, 4))
                    obj.pairs[j[0]] = ('"data_offsets"', [a + da, b + db])
        elif kind == "reorder":
            pairs = draw(st_.permutations(pairs))
        elif kind == "extra" and tensor_pairs:
            obj = pairs[draw(st_.sampled_from(tensor_pairs))][1]
            obj.pairs.append(('"x"', draw(st_.sampled_from([1, "s", [], Raw("null")]))))
        elif kind == "pad":
            data = data + b"\0" * draw(st_.integers(1, 8)) if draw(st_.booleans()) else data[: -1 or None]
        elif kind == "rename" and tensor_pairs:  # a tensor named __metadata__, in any spelling
            i = draw(st_.sampled_from(tensor_pairs))
            spelled = escape("__metadata__", draw(st_.lists(st_.integers(0, 11), max_size=3)), False)
            pairs[i] = (spelled, pairs[i][1])
    text = dump(Obj(pairs)).encode()
    ambiguous = _ambiguous(Obj(pairs))
    lead = draw(st_.sampled_from([b"", b" ", b"\xef\xbb\xbf"]))
    tail = draw(st_.sampled_from([b"", b"  ", b"\0", b"\n"]))
    header = lead + text + tail
    return struct.pack("<Q", len(header)) + header + data, ambiguous


def _ambiguous(obj: Obj) -> bool:
    """Whether a generated header means two things: a key given twice in any object (once decoded), or
    a tensor entry under the reserved name `__metadata__`."""
    keys = [json.loads(k) for k, _ in obj.pairs]
    if len(set(keys)) != len(keys):
        return True
    for key, (_, v) in zip(keys, obj.pairs, strict=True):
        if (
            key == "__metadata__"
            and isinstance(v, Obj)
            and {"dtype", "shape", "data_offsets"} & {json.loads(k) for k, _ in v.pairs}
        ):
            return True
        if isinstance(v, Obj) and _ambiguous(v):
            return True
    return False


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=header_files())
def test_convspec_never_accepts_what_safetensors_refuses(case, tmp_path_factory):
    """The safetensors library is the reference: a file it refuses, convspec refuses; a file whose meaning
    is ambiguous (a key given twice anywhere, a tensor named __metadata__), convspec refuses even where
    the library picks one reading; a file both accept reads as the same tensors, byte for byte."""
    data, ambiguous = case
    path = tmp_path_factory.mktemp("diff") / "x.safetensors"
    path.write_bytes(data)
    ours = bounded(read_header, path)
    theirs = safetensors_accepts(path)
    event(
        f"convspec {'accepts' if isinstance(ours, list) else 'refuses'}, safetensors {'accepts' if theirs else 'refuses'}"
    )
    if not isinstance(ours, list):
        assert isinstance(ours, CheckpointError), ours
        if theirs:  # stricter than the library: only where docs/safety.md says so
            why = next(
                (name for name, pattern in STRICTER_BECAUSE.items() if re.search(pattern, ours.message)), None
            )
            assert why, f"convspec refused a file safetensors reads, for no documented reason: {ours.message}"
            event(f"stricter: {why}")
        return
    assert theirs, f"convspec accepted a file safetensors refuses: {data[:300]!r}"
    assert not ambiguous, f"convspec accepted an ambiguous file: {data[:300]!r}"
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(e.key for e in ours)
        for e in ours:
            t = f.get_tensor(e.key)
            assert tuple(t.shape) == e.shape and t.dtype == getattr(torch, e.dtype), e
            assert bytes(t.reshape(-1).view(torch.uint8).tolist()) == data[e.start : e.end], e


# ---- where convspec is stricter than safetensors: each claim of docs/safety.md, re-run ------------

DOC = (ROOT / "docs" / "safety.md").read_text()
STRICTER = {
    "a key given twice": raw(b'{"m.a": ' + E16 + b', "m.a": ' + E16 + b"}"),
    "a key given twice in `__metadata__`": raw(
        b'{"__metadata__": {"k": "1", "k": "2"}, "m.a": ' + E16 + b"}"
    ),
    "a dim so large that the product of the non-zero dims overflows 64 bits": raw(
        b'{"m.a": {"dtype": "F32", "shape": [0, 18446744073709551615, 2], "data_offsets": [0, 0]}}', b""
    ),
    "a dtype convspec does not convert": raw(
        b'{"m.a": {"dtype": "U16", "shape": [8], "data_offsets": [0, 16]}}'
    ),
}


STRICTER_BECAUSE = {  # each documented case, by the message convspec gives for it
    "a key given twice": r"header has the key .* twice",
    "a dim so large that the product of the non-zero dims overflows 64 bits": r"more bits than 64-bit",
    "a dtype convspec does not convert": r"unknown dtype",
}


@pytest.mark.parametrize("name", sorted(STRICTER))
def test_each_stricter_case_in_the_docs_is_accepted_by_safetensors_and_refused_here(name, tmp_path):
    assert f"- {name}" in DOC, name
    path = tmp_path / "x.safetensors"
    path.write_bytes(STRICTER[name])
    assert safetensors_accepts(path), name
    assert isinstance(bounded(read_header, path), CheckpointError), name


def test_the_docs_state_each_limit_as_the_code_has_it():
    section = DOC[DOC.index("### Reading checkpoints and side files") :]
    for constant, value in [
        ("MAX_HEADER", MAX_HEADER),
        ("MAX_INDEX_BYTES", MAX_INDEX_BYTES),
        ("MAX_CONFIG_BYTES", MAX_CONFIG_BYTES),
        ("MAX_MANIFEST_BYTES", MAX_MANIFEST_BYTES),
        ("MAX_NAME_CHARS", manifest.MAX_NAME_CHARS),
    ]:
        found = re.search(rf"`{constant}` =\s+([\d,]+)", section)
        assert found, constant
        assert int(found.group(1).replace(",", "")) == value, constant
    assert set(SAFETENSORS_CODES) <= set(re.findall(r"`([A-Z0-9_]+)`", section)), "the dtypes convspec reads"

"""Bad inputs through the CLI: each exits 2 with one message naming the file and line:col (or the key),
no traceback, and nothing left behind: no destination, no temporary directory, no source file changed.
"""

from __future__ import annotations

import json
import os
import re
import resource
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from convspec.cli import main
from convspec.io.safetensors import read_layout
from convspec.spec.parse import MAX_EXPR_DEPTH, MAX_SPEC_CHARS

ROOT = Path(__file__).resolve().parent.parent

# ---- how bad inputs are made ---------------------------------------------------------------------


def st(header: dict | bytes, data: bytes = b"") -> bytes:
    """A safetensors file: a header (a dict, or raw bytes for a malformed one) and its data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def entry(dtype="F32", shape=(4,), offsets=(0, 16)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def tensors(*keys: str) -> bytes:
    """A valid file of float32[4] tensors."""
    return st({k: entry(offsets=(16 * i, 16 * i + 16)) for i, k in enumerate(keys)}, b"\0" * 16 * len(keys))


def index(weight_map) -> str:
    return json.dumps({"metadata": {}, "weight_map": weight_map})


@dataclass(frozen=True)
class Link:
    """A symlink to `target` ({d} for the case's directory)."""

    target: str


@dataclass(frozen=True)
class Fifo:
    """A named pipe: reading it would wait forever."""


GOOD = tensors("m.a")
RENAME = 'spec: t\nrules:\n  - rename: "{p:path}.a"\n    to: "{p}.b"\n'
CONVERT = ("convert", "{d}/spec.yaml", "{d}/src", "{d}/out")
ROPE = "spec t\nconvert x = {p:path}.a\n     -> {p}.y = permute_rope(x, heads=config.num_heads)\n"
SPLIT = "spec t\nconvert x = {p:path}.a\n     -> {p}.q, {p}.k = split(x, sizes=[config.n, 2])\n"
CONVERT_CSPEC = ("convert", "{d}/spec.cspec", "{d}/src", "{d}/out")
BOMB = 'spec: t\nmodel_types:\n  - &a "lol"\n' + "".join(
    f"  - &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9)
)  # 9**9 strings if aliases were expanded
DEEP = "transpose(" * (MAX_EXPR_DEPTH + 10) + "x" + ")" * (MAX_EXPR_DEPTH + 10)


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # spec, config, checkpoint (weights, headers, index), side file, option
    files: dict  # path under {d} -> text, bytes, Link or Fifo
    argv: tuple[str, ...]
    expected: str  # a fragment of stderr's first line; {d} is the fresh directory the files are written to
    process: bool = False  # run as a real process: memory and side effects count
    xfail: str | None = None  # the fix it needs, in a file this catalogue does not own


def spec(name, suffix, text, expected, extra=None, **kw) -> Case:
    """A bad spec, converting a good checkpoint."""
    files = {f"spec{suffix}": text, "src/model.safetensors": GOOD, **(extra or {})}
    return Case(name, "spec", files, ("convert", f"{{d}}/spec{suffix}", "{d}/src", "{d}/out"), expected, **kw)


def config(name, spec_text, config_text, expected, extra=None, **kw) -> Case:
    """A checkpoint whose config.json does not give what the spec's expressions need."""
    files = {"spec.cspec": spec_text, "src/model.safetensors": GOOD, "src/config.json": config_text}
    files.update(extra or {})
    return Case(name, "config", files, CONVERT_CSPEC, expected, **kw)


def ckpt(name, files, expected, argv=CONVERT, kind="checkpoint", **kw) -> Case:
    """A bad checkpoint under {d}/src (a path starting '../' is beside it), converted with a good spec."""
    return Case(
        name, kind, {"spec.yaml": RENAME, **{f"src/{k}": v for k, v in files.items()}}, argv, expected, **kw
    )


CASES = [
    # ---- specs: syntax, both front ends --------------------------------------------------------
    spec(
        "yaml_syntax",
        ".yaml",
        'spec: t\nrules:\n  - rename: "{p:path}.a"\n     to: "{p}.b"\n',
        "{d}/spec.yaml:4:6: error: invalid YAML: expected <block end>",
    ),
    spec(
        "cspec_syntax",
        ".cspec",
        "spec t\nrename {p:path}.a => {p}.b\n",
        "{d}/spec.cspec:2:19: error: unexpected '=>' in spec",
    ),
    spec(
        "cspec_ends_early",
        ".cspec",
        "spec t\nconvert x = {p:path}.x\n",
        "{d}/spec.cspec:2:23: error: spec ends too early",
    ),
    spec(
        "yaml_expression_syntax",
        ".yaml",
        'spec: t\nrules:\n  - convert:\n      x: "{p:path}.x.{e:int}"\n    to:\n      "{p}.y": stack(x over=e)\n',
        "{d}/spec.yaml:6:24: error: unexpected 'over' in expression",
    ),
    # ---- specs: wrong types --------------------------------------------------------------------
    spec(
        "yaml_rules_not_a_list",
        ".yaml",
        "spec: t\nrules: {a: 1}\n",
        "{d}/spec.yaml:2:8: error: 'rules' must be a list, not a mapping",
    ),
    spec(
        "yaml_template_not_a_string",
        ".yaml",
        "spec: t\nrules:\n  - drop: 12\n",
        "{d}/spec.yaml:3:11: error: a drop template must be a string, got '12'",
    ),
    spec(
        "yaml_inputs_not_a_mapping",
        ".yaml",
        'spec: t\nrules:\n  - convert: "x"\n    to: "{p}.y"\n',
        "{d}/spec.yaml:3:14: error: 'convert' (the inputs) must be a mapping, not a scalar",
    ),
    spec(
        "cspec_parameter_type",
        ".cspec",
        'spec t\nconvert x = {p:path}.a\n     -> {p}.y = transpose(x, dim0="a")\n',
        "{d}/spec.cspec:3:35: error: rule 1 (convert): parameter dim0 of transpose must be an integer, got 'a'",
    ),
    # ---- specs: unknown ops and rules, capture types ------------------------------------------
    spec(
        "cspec_unknown_op",
        ".cspec",
        "spec t\nconvert x = {p:path}.x.{e:int}\n     -> {p}.y = stak(x, over=e)\n",
        "{d}/spec.cspec:3:17: error: rule 1 (convert): unknown op 'stak'",
    ),
    spec(
        "yaml_unknown_op",
        ".yaml",
        'spec: t\nrules:\n  - convert:\n      x: "{p:path}.a"\n    to:\n      "{p}.y": frob(x)\n',
        "{d}/spec.yaml:6:16: error: rule 1 (convert): unknown op 'frob'",
    ),
    spec(
        "yaml_unknown_rule",
        ".yaml",
        'spec: t\nrules:\n  - frobnicate: "{p:path}.a"\n',
        "{d}/spec.yaml:3:5: error: a rule needs exactly one of 'rename', 'alias', 'convert', 'drop', 'include'",
    ),
    spec(
        "cspec_unknown_statement",
        ".cspec",
        "spec t\nfrobnicate {p:path}.a\n",
        "{d}/spec.cspec:2:1: error: unexpected 'frobnicate' in spec",
    ),
    spec(
        "yaml_capture_type",
        ".yaml",
        'spec: t\nrules:\n  - drop: "{p:float}.a"\n',
        "{d}/spec.yaml:3:15: error: unknown capture type 'float' for {p}",
    ),
    spec(
        "cspec_capture_type",
        ".cspec",
        "spec t\nrename {p:paht}.a -> {p}.b\n",
        "{d}/spec.cspec:2:11: error: unknown capture type 'paht' for {p}",
    ),
    spec(
        "cspec_capture_without_type",
        ".cspec",
        "spec t\ndrop {p:}.a\n",
        "{d}/spec.cspec:2:9: error: unexpected '}' in key template",
    ),
    # ---- specs: includes, renames, converts that cannot all hold -------------------------------
    spec(
        "yaml_circular_include",
        ".yaml",
        "spec: spec\nrules:\n  - include: other\n",
        "{d}/other.yaml:3:5: error: include spec is circular (spec -> other -> spec)",
        extra={"other.yaml": "spec: other\nrules:\n  - include: spec\n"},
    ),
    spec(
        "cspec_includes_itself",
        ".cspec",
        "spec spec\ninclude spec\n",
        "{d}/spec.cspec:2:1: error: include spec is circular (spec -> spec)",
    ),
    spec(
        "renames_collide_at_bind_time",
        ".cspec",
        "spec t\nrename {p:path}.a -> {p}.c\nrename {p:path}.b -> {p}.c\n",
        "error: two sources map to the key m.c: m.a and m.b",
        extra={"src/model.safetensors": tensors("m.a", "m.b")},
    ),
    spec(
        "yaml_overlapping_converts",
        ".yaml",
        "spec: t\nrules:\n"
        '  - convert:\n      x: "{p:path}.w1.weight"\n    to: "{p}.a"\n    ops: [transpose()]\n'
        '  - convert:\n      y: "model.{q:path}.weight"\n    to: "{q}.b"\n    ops: [transpose()]\n',
        "{d}/spec.yaml:7:5: error: rules 1 and 2 can both claim the key 'model.w1.weight'",
    ),
    spec(
        "cspec_overlapping_converts",
        ".cspec",
        "spec t\nconvert a = {p:path}.w\n     -> {p}.c = transpose(a)\n"
        "convert b = model.{q:path}\n     -> {q}.d = transpose(b)\n",
        "{d}/spec.cspec:4:1: error: rules 1 and 2 can both claim the key 'model.w'",
    ),
    # ---- specs: hostile sizes, nesting, tags and bytes ---------------------------------------
    spec(
        "yaml_too_large",
        ".yaml",
        "spec: t\n" + "#" * MAX_SPEC_CHARS + "\nrules: []\n",
        f"{{d}}/spec.yaml:1:1: error: spec is larger than {MAX_SPEC_CHARS} characters",
    ),
    spec(
        "cspec_too_large",
        ".cspec",
        "spec t\n" + "#" * MAX_SPEC_CHARS + "\n",
        f"{{d}}/spec.cspec:1:1: error: spec is larger than {MAX_SPEC_CHARS} characters",
    ),
    spec(
        "cspec_expression_too_deep",
        ".cspec",
        f"spec t\nconvert x = {{p:path}}.a\n     -> {{p}}.y = {DEEP}\n",
        f"{{d}}/spec.cspec:3:{17 + 10 * (MAX_EXPR_DEPTH + 1)}: error: expression nested deeper than "
        f"{MAX_EXPR_DEPTH} levels",
    ),
    spec(
        "yaml_expression_too_deep",
        ".yaml",
        f'spec: t\nrules:\n  - convert:\n      x: "{{p:path}}.a"\n    to:\n      "{{p}}.y": {DEEP}\n',
        f"{{d}}/spec.yaml:6:{16 + 10 * (MAX_EXPR_DEPTH + 1)}: error: expression nested deeper than "
        f"{MAX_EXPR_DEPTH} levels",
    ),
    spec(
        "yaml_nested_too_deep",
        ".yaml",
        "spec: t\nrules: " + "[" * 5000 + "]" * 5000 + "\n",
        "{d}/spec.yaml:2:71: error: YAML nested deeper than 64 levels",
    ),
    spec(
        "yaml_billion_laughs",
        ".yaml",
        BOMB + 'rules:\n  - drop: "{p:path}.a"\n',
        "{d}/spec.yaml:4:5: error: a model type must be a string, not a list",
        process=True,
    ),
    spec(
        "yaml_python_tag_on_a_value",
        ".yaml",
        'spec: !!python/object/apply:os.system ["touch {d}/PWNED"]\nrules: []\n',
        "{d}/spec.yaml:1:7: error: unsupported YAML tag '!!python/object/apply:os.system'",
        process=True,
    ),
    spec(
        "yaml_python_name_tag",
        ".yaml",
        'spec: !!python/name:os.system t\nrules:\n  - drop: "{p:path}.a"\n',
        "{d}/spec.yaml:1:7: error: unsupported YAML tag '!!python/name:os.system'",
    ),
    spec(
        "yaml_python_tag_on_a_rule",
        ".yaml",
        'spec: t\nrules:\n  - !!python/object/new:os.system {drop: "{p:path}.a"}\n',
        "{d}/spec.yaml:3:5: error: unsupported YAML tag '!!python/object/new:os.system'",
    ),
    spec(
        "yaml_python_tag_on_the_document",
        ".yaml",
        '!!python/object:os.system\nspec: t\nrules:\n  - drop: "{p:path}.a"\n',
        "{d}/spec.yaml:1:1: error: unsupported YAML tag '!!python/object:os.system'",
    ),
    spec(
        "yaml_not_utf8",
        ".yaml",
        b'spec: t\nrules:\n  - drop: "\xff"\n',
        "{d}/spec.yaml:3:12: error: the file is not UTF-8 text (byte 0xff)",
    ),
    spec(
        "cspec_not_utf8",
        ".cspec",
        b"spec t\nrename {p:path}.\xe9 -> {p}.b\n",
        "{d}/spec.cspec:2:17: error: the file is not UTF-8 text (byte 0xe9)",
    ),
    # ---- configs ------------------------------------------------------------------------------
    config(
        "config_lacks_a_field",
        ROPE,
        "{}",
        "{d}/spec.cspec:3:39: error: rule 1 (convert): the config has no field config.num_heads",
    ),
    config(
        "config_string_for_an_int",
        ROPE,
        '{"num_heads": "4"}',
        "{d}/spec.cspec:3:39: error: rule 1 (convert): parameter heads of permute_rope must be an integer, "
        "got '4'",
    ),
    config(
        "config_string_in_a_list_of_ints",
        SPLIT,
        '{"n": "2"}',
        "{d}/spec.cspec:3:39: error: rule 1 (convert): parameter sizes of split must be a list of integers",
    ),
    config("config_not_json", ROPE, '{"num_heads": ', "error: {d}/src/config.json:1:15: invalid JSON"),
    config("config_not_an_object", ROPE, "[4]", "error: {d}/src/config.json: a config must be a JSON object"),
    config(
        "config_links_outside",
        ROPE,
        Link("{d}/secret.json"),
        "error: {d}/src/config.json: a symlink to {d}/secret.json, outside the checkpoint directory",
        extra={"secret.json": '{"num_heads": 2}'},
    ),
    # ---- checkpoints: one file's bytes --------------------------------------------------------
    ckpt(
        "truncated_data",
        {"model.safetensors": GOOD[:-4]},
        "error: {d}/src/model.safetensors: tensor m.a: data offsets [0, 16] are outside the file "
        "(12 bytes of data)",
    ),
    ckpt(
        "truncated_header",
        {"model.safetensors": GOOD[:20]},
        f"error: {{d}}/src/model.safetensors: header length {len(GOOD) - 24} is larger than the file "
        "(20 bytes): truncated, or not a safetensors file",
    ),
    ckpt(
        "shorter_than_8_bytes",
        {"model.safetensors": b"\x01\x02"},
        "error: {d}/src/model.safetensors: not a safetensors file (shorter than 8 bytes)",
    ),
    ckpt(
        "header_length_past_the_end",
        {"model.safetensors": struct.pack("<Q", 2**63) + b"{}"},
        f"error: {{d}}/src/model.safetensors: header length {2**63} is larger than the file (10 bytes)",
    ),
    ckpt(
        "header_not_json",
        {"model.safetensors": st(b"{not json}")},
        "error: {d}/src/model.safetensors: header is not valid JSON",
    ),
    ckpt(
        "header_not_an_object",
        {"model.safetensors": st(b"[1, 2]")},
        "error: {d}/src/model.safetensors: header is not a JSON object",
    ),
    ckpt(
        "header_nested_too_deep",
        {"model.safetensors": st(b"[" * 100_000 + b"]" * 100_000)},
        "error: {d}/src/model.safetensors: header JSON is nested too deeply",
    ),
    ckpt(
        "header_gives_a_key_twice",
        {
            "model.safetensors": st(
                b'{"__metadata__": {}, "m.a": %s, "m.a": %s}' % ((json.dumps(entry()).encode(),) * 2),
                b"\0" * 16,
            )
        },
        "error: {d}/src/model.safetensors: header has the key 'm.a' twice",
    ),
    ckpt(
        "entry_not_an_object",
        {"model.safetensors": st({"m.a": 5})},
        "error: {d}/src/model.safetensors: tensor m.a: malformed header entry (not a JSON object)",
    ),
    ckpt(
        "entry_lacks_dtype",
        {"model.safetensors": st({"m.a": {"shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)},
        "error: {d}/src/model.safetensors: tensor m.a: header entry lacks 'dtype'",
    ),
    ckpt(
        "overlapping_offsets",
        {"model.safetensors": st({"m.a": entry(), "m.b": entry(offsets=(8, 24))}, b"\0" * 24)},
        "error: {d}/src/model.safetensors: tensors m.a and m.b overlap in the file",
    ),
    ckpt(
        "offsets_out_of_bounds",
        {"model.safetensors": st({"m.a": entry(offsets=(1000, 1016))}, b"\0" * 16)},
        "error: {d}/src/model.safetensors: tensor m.a: data offsets [1000, 1016] are outside the file",
    ),
    ckpt(
        "offsets_reversed",
        {"model.safetensors": st({"m.a": entry(offsets=(16, 0))}, b"\0" * 16)},
        "error: {d}/src/model.safetensors: tensor m.a: data offsets [16, 0] are outside the file",
    ),
    ckpt(
        "offsets_not_integers",
        {"model.safetensors": st({"m.a": entry(offsets=("0", "16"))}, b"\0" * 16)},
        "error: {d}/src/model.safetensors: tensor m.a: data_offsets ['0', '16'] are not two integers",
    ),
    ckpt(
        "offsets_disagree_with_shape_and_dtype",
        {"model.safetensors": st({"m.a": entry(offsets=(0, 8))}, b"\0" * 16)},
        "error: {d}/src/model.safetensors: tensor m.a: 8 bytes of data for shape [4] float32",
    ),
    ckpt(
        "unknown_dtype",
        {"model.safetensors": st({"m.a": entry(dtype="F33")}, b"\0" * 16)},
        "error: {d}/src/model.safetensors: tensor m.a: unknown dtype 'F33'",
    ),
    ckpt(
        "negative_dim",
        {"model.safetensors": st({"m.a": entry(shape=(-4,), offsets=(0, 0))})},
        "error: {d}/src/model.safetensors: tensor m.a: negative dim in shape [-4]",
    ),
    ckpt(
        "fractional_dim",
        {"model.safetensors": st({"m.a": entry(shape=(4.0,))}, b"\0" * 16)},
        "error: {d}/src/model.safetensors: tensor m.a: shape [4.0] is not a list of integers",
    ),
    ckpt(
        "shape_a_string",
        {"model.safetensors": st({"m.a": entry(shape="4")}, b"\0" * 16)},
        "error: {d}/src/model.safetensors: tensor m.a: shape ['4'] is not a list of integers",
    ),
    # ---- checkpoints: the directory, shards and the index -------------------------------------
    ckpt(
        "key_in_two_shards",
        {"a.safetensors": GOOD, "b.safetensors": GOOD},
        "error: tensor m.a appears in both {d}/src/a.safetensors and {d}/src/b.safetensors",
    ),
    ckpt(
        "index_names_a_missing_shard",
        {
            "model.safetensors.index.json": index({"m.a": "model-00002.safetensors"}),
            "model.safetensors": GOOD,
        },
        "error: {d}/src/model.safetensors.index.json: shard model-00002.safetensors is listed but missing",
    ),
    ckpt(
        "index_names_a_parent_path",
        {"model.safetensors.index.json": index({"m.a": "../x.safetensors"}), "../x.safetensors": GOOD},
        "error: {d}/src/model.safetensors.index.json: shard '../x.safetensors' is outside the checkpoint "
        "directory",
    ),
    ckpt(
        "index_names_an_absolute_path",
        {"model.safetensors.index.json": index({"m.a": "/etc/hostname"})},
        "error: {d}/src/model.safetensors.index.json: shard '/etc/hostname' is outside the checkpoint directory",
    ),
    ckpt(
        "index_names_a_symlink_out",
        {
            "model.safetensors.index.json": index({"m.a": "model.safetensors"}),
            "model.safetensors": Link("{d}/elsewhere/model.safetensors"),
            "../elsewhere/model.safetensors": GOOD,
        },
        "error: {d}/src/model.safetensors.index.json: shard 'model.safetensors' is a symlink to "
        "{d}/elsewhere/model.safetensors, outside the checkpoint directory",
    ),
    ckpt(
        "index_links_out",
        {
            "model.safetensors.index.json": Link("{d}/elsewhere/index.json"),
            "../elsewhere/index.json": index({"m.a": "model.safetensors"}),
            "model.safetensors": GOOD,
        },
        "error: {d}/src/model.safetensors.index.json: a symlink to {d}/elsewhere/index.json, outside the "
        "checkpoint directory",
    ),
    ckpt(
        "shard_links_out",
        {
            "model.safetensors": Link("{d}/elsewhere/model.safetensors"),
            "../elsewhere/model.safetensors": GOOD,
        },
        "error: {d}/src/model.safetensors: a symlink to {d}/elsewhere/model.safetensors, outside the "
        "checkpoint directory",
    ),
    ckpt(
        "shard_links_to_itself",
        {"model.safetensors": Link("model.safetensors")},
        "error: {d}/src/model.safetensors: cannot follow it (Too many levels of symbolic links)",
    ),
    ckpt(
        "index_not_json",
        {"model.safetensors.index.json": '{"weight_map": {', "model.safetensors": GOOD},
        "error: {d}/src/model.safetensors.index.json:1:17: invalid JSON",
    ),
    ckpt(
        "index_not_an_object",
        {"model.safetensors.index.json": "[]", "model.safetensors": GOOD},
        "error: {d}/src/model.safetensors.index.json: an index must be a JSON object, not list",
    ),
    ckpt(
        "index_weight_map_a_list",
        {"model.safetensors.index.json": '{"weight_map": ["model.safetensors"]}', "model.safetensors": GOOD},
        "error: {d}/src/model.safetensors.index.json: an index needs a weight_map object",
    ),
    ckpt(
        "index_shard_not_a_name",
        {"model.safetensors.index.json": index({"m.a": 5}), "model.safetensors": GOOD},
        "error: {d}/src/model.safetensors.index.json: key m.a: shard 5 is not a file name",
    ),
    ckpt(
        "index_not_utf8",
        {"model.safetensors.index.json": b'{"weight_map": {"\xff": 1}}', "model.safetensors": GOOD},
        "error: {d}/src/model.safetensors.index.json: not UTF-8 text (byte 17)",
    ),
    ckpt(
        "random_bytes_named_safetensors",
        {"model.safetensors": bytes(range(7, 256)) * 4},
        f"error: {{d}}/src/model.safetensors: header length {int.from_bytes(bytes(range(7, 15)), 'little')} is "
        "larger than the file (996 bytes)",
    ),
    ckpt(
        "a_text_file",
        {"notes.txt": "these are not weights\n"},
        f"error: {{d}}/src/notes.txt: header length {int.from_bytes(b'these ar', 'little')} is larger than "
        "the file (22 bytes): "
        "truncated, or not a safetensors file",
        argv=("convert", "{d}/spec.yaml", "{d}/src/notes.txt", "{d}/out"),
    ),
    ckpt(
        "a_directory_named_safetensors",
        {"model.safetensors/x": "x"},
        "error: {d}/src/model.safetensors: is a directory, not a safetensors file",
    ),
    ckpt(
        "a_named_pipe",
        {"model.safetensors": Fifo()},
        "error: {d}/src/model.safetensors: not a regular file",
    ),
    ckpt(
        "empty_directory",
        {},
        "error: {d}/src: no .safetensors files (and no model.safetensors.index.json)",
    ),
    ckpt(
        "no_such_directory",
        {},
        "error: {d}/nothing: no such file or directory",
        argv=("convert", "{d}/spec.yaml", "{d}/nothing", "{d}/out"),
    ),
    ckpt(
        "pickle_directory",
        {"pytorch_model.bin": b"PK\x03\x04 a torch.save zip", "config.json": "{}"},
        "error: {d}/src/pytorch_model.bin: a pickle checkpoint: pickle files are not read",
    ),
    ckpt(
        "pickle_shards_with_their_index",
        {
            "pytorch_model.bin.index.json": index({"m.a": "pytorch_model-00001-of-00002.bin"}),
            "pytorch_model-00001-of-00002.bin": b"\x80\x04 a pickle",
            "pytorch_model-00002-of-00002.bin": b"\x80\x04 a pickle",
        },
        "error: {d}/src/pytorch_model-00001-of-00002.bin: a pickle checkpoint: pickle files are not read",
    ),
    ckpt(
        "pickle_file",
        {"model.pt": b"\x80\x04 a pickle"},
        "error: {d}/src/model.pt: a pickle checkpoint: pickle files are not read",
        argv=("convert", "{d}/spec.yaml", "{d}/src/model.pt", "{d}/out"),
    ),
    ckpt(
        "side_file_links_out",
        {"model.safetensors": GOOD, "tokenizer.json": Link("{d}/secret.txt"), "../secret.txt": "a secret"},
        "error: {d}/src/tokenizer.json: a symlink to {d}/secret.txt, outside the checkpoint directory",
        kind="side file",
    ),
    # ---- options -------------------------------------------------------------------------------
    ckpt(
        "unknown_output_dtype",
        {"model.safetensors": GOOD},
        "error: unknown dtype 'float99'",
        argv=(*CONVERT, "--dtype", "float99"),
        kind="option",
    ),
    ckpt(
        "meta_device",
        {"model.safetensors": GOOD},
        "error: device 'meta' holds shapes, not data, and convert writes the data",
        argv=(*CONVERT, "--device", "meta"),
        kind="option",
    ),
    ckpt(
        "unknown_device",
        {"model.safetensors": GOOD},
        "error: unknown device 'gpu'",
        argv=(*CONVERT, "--device", "gpu"),
        kind="option",
    ),
    ckpt(
        "absent_device",  # no machine has 100 GPUs: absent with or without CUDA
        {"model.safetensors": GOOD},
        "error: device 'cuda:99' ",
        argv=(*CONVERT, "--device", "cuda:99"),
        kind="option",
    ),
    ckpt(
        "bad_shard_size",
        {"model.safetensors": GOOD},
        "error: cannot read the size 'abc'",
        argv=(*CONVERT[:-1], "{d}/new/deeper/out", "--max-shard-size", "abc"),
        kind="option",
    ),
]


def _params(cases):
    return [
        pytest.param(
            c,
            id=c.name,
            marks=[pytest.mark.xfail(reason=c.xfail, strict=True)] if c.xfail else [],
        )
        for c in cases
    ]


# ---- running a case --------------------------------------------------------------------------


def _write(case: Case, d: Path) -> None:
    for rel, content in case.files.items():
        path = Path(os.path.normpath(d / rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Link):
            path.symlink_to(content.target.replace("{d}", str(d)))
        elif isinstance(content, Fifo):
            os.mkfifo(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{d}", str(d)))
    (d / "src").mkdir(exist_ok=True)


def _snapshot(d: Path) -> dict[str, object]:
    """Every path under `d` and what it holds (never opening a pipe): any change is output left behind."""
    out: dict[str, object] = {}
    for path in sorted(d.rglob("*")):
        rel = str(path.relative_to(d))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = "dir"
        elif path.is_file():
            out[rel] = path.read_bytes()
        else:
            out[rel] = "special"
    return out


def _limit_memory() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def _run(case: Case, d: Path, capsys, extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
    argv = [a.replace("{d}", str(d)) for a in case.argv] + list(extra)
    if case.process:
        p = subprocess.run(
            [sys.executable, "-m", "convspec.cli", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            preexec_fn=_limit_memory,
        )
        return p.returncode, p.stdout, p.stderr
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def plain(monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")


# ---- the tests -------------------------------------------------------------------------------


def test_the_catalogue_is_large_distinct_and_covers_every_kind():
    assert len({c.name for c in CASES}) == len(CASES) >= 40
    assert len({c.expected for c in CASES if not c.xfail}) == len([c for c in CASES if not c.xfail])
    assert {c.kind for c in CASES} == {"spec", "config", "checkpoint", "side file", "option"}
    assert {Path(c.argv[1]).suffix for c in CASES if c.kind == "spec"} == {".yaml", ".cspec"}


def test_every_expected_message_names_a_file_or_a_key():
    """The location is part of each expected fragment: file:line:col for a spec, the file or key else."""
    for c in CASES:
        if c.xfail or c.kind == "option":
            continue
        if c.kind == "spec" and " key " not in c.expected:
            assert re.match(r"\{d\}/\w+\.(yaml|cspec):\d+:\d+: error: ", c.expected), c.name
        else:
            assert "{d}/" in c.expected or " key " in c.expected, c.name


@pytest.mark.parametrize("case", _params(CASES))
def test_bad_input_exits_2_with_one_located_message_and_leaves_nothing(case: Case, tmp_path, capsys, plain):
    _write(case, tmp_path)
    before = _snapshot(tmp_path)
    code, out, err = _run(case, tmp_path, capsys)
    assert "Traceback" not in out + err
    assert code == 2, err
    assert out == ""
    first = err.splitlines()[0]
    assert case.expected.replace("{d}", str(tmp_path)) in first
    assert sum(line.startswith("error: ") or ": error: " in line for line in err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary directory
    assert _snapshot(tmp_path) == before  # nothing written, nothing of the source changed
    assert not (tmp_path / "PWNED").exists()  # no code ran from the spec's data


@pytest.mark.parametrize("case", _params(CASES))
def test_with_json_the_error_is_one_document_with_the_same_location(case: Case, tmp_path, capsys, plain):
    _write(case, tmp_path)
    code, out, err = _run(case, tmp_path, capsys, ("--json",))
    assert code == 2 and out == ""
    error = json.loads(err)["error"]
    assert error["type"].endswith("Error")
    where = f"{error['file']}:{error['line']}:{error['col']}: " if error.get("file") else ""
    assert case.expected.replace("{d}", str(tmp_path)) in f"{where}error: {error['message']}"
    assert not (tmp_path / "out").exists()


CHECKPOINT_CASES = [c for c in CASES if c.kind == "checkpoint" and c.argv == CONVERT]


@pytest.mark.parametrize(
    "command",
    [
        ("verify", "{d}/spec.yaml", "{d}/src"),
        ("compile", "{d}/spec.yaml", "--against", "{d}/src"),
        ("explain", "{d}/spec.yaml", "m.a", "--against", "{d}/src"),
        ("check", "{d}/spec.yaml", "--against", "{d}/src"),
    ],
    ids=lambda c: c[0],
)
def test_every_command_that_reads_a_checkpoint_refuses_it_the_same_way(command, tmp_path, capsys, plain):
    """One reader of headers and indexes serves every command, so each refuses a bad checkpoint alike."""
    assert len(CHECKPOINT_CASES) >= 25
    for case in CHECKPOINT_CASES:
        d = tmp_path / case.name
        d.mkdir()
        _write(case, d)
        before = _snapshot(d)
        code = main([a.replace("{d}", str(d)) for a in command])
        captured = capsys.readouterr()
        assert code == 2, (case.name, captured.err)
        assert "Traceback" not in captured.out + captured.err
        assert case.expected.replace("{d}", str(d)) in captured.err.splitlines()[0], case.name
        assert _snapshot(d) == before, case.name


# ---- what must still load ------------------------------------------------------------------------


def _hub_snapshot(root: Path, sharded: bool) -> Path:
    """A Hugging Face hub cache entry: snapshot files are relative symlinks into the repo's blobs."""
    repo = root / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    files = {"config.json": b"{}"}
    if sharded:
        files["model-00001-of-00002.safetensors"] = tensors("m.a")
        files["model-00002-of-00002.safetensors"] = tensors("n.a")
        files["model.safetensors.index.json"] = index(
            {"m.a": "model-00001-of-00002.safetensors", "n.a": "model-00002-of-00002.safetensors"}
        ).encode()
    else:
        files["model.safetensors"] = tensors("m.a", "n.a")
    for i, (name, data) in enumerate(files.items()):
        (blobs / f"{i:040x}").write_bytes(data)
        (snap / name).symlink_to(f"../../blobs/{i:040x}")
    return snap


@pytest.mark.parametrize("sharded", [False, True], ids=["one_file", "sharded"])
def test_a_hub_cache_snapshot_of_symlinks_into_blobs_converts(sharded, tmp_path, capsys):
    snap = _hub_snapshot(tmp_path, sharded)
    (tmp_path / "spec.yaml").write_text(RENAME)
    assert main(["convert", str(tmp_path / "spec.yaml"), str(snap), str(tmp_path / "out")]) == 0
    assert "wrote 2 tensors" in capsys.readouterr().out
    out = tmp_path / "out"
    assert (out / "config.json").read_bytes() == b"{}" and not (out / "config.json").is_symlink()
    assert sorted(read_layout(out)) == ["m.b", "n.b"]
    assert main(["compile", str(tmp_path / "spec.yaml"), "--against", str(snap)]) == 0


def test_a_hub_snapshot_linking_into_another_repos_blobs_is_refused(tmp_path, capsys):
    """Only the snapshot's own repo's blobs are allowed, not any folder that happens to be named blobs."""
    snap = _hub_snapshot(tmp_path / "a", sharded=False)
    other = _hub_snapshot(tmp_path / "b", sharded=False).parent.parent / "blobs"
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(other / f"{1:040x}")
    (tmp_path / "spec.yaml").write_text(RENAME)
    assert main(["convert", str(tmp_path / "spec.yaml"), str(snap), str(tmp_path / "out")]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first == (
        f"error: {snap}/model.safetensors: a symlink to {other}/{1:040x}, outside the checkpoint directory"
    )
    assert not (tmp_path / "out").exists()


def test_symlinks_that_stay_inside_the_checkpoint_directory_are_fine(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "weights").mkdir(parents=True)
    (src / "weights" / "real.safetensors").write_bytes(tensors("m.a"))
    (src / "model.safetensors").symlink_to("weights/real.safetensors")
    (src / "config.json").symlink_to(src / "weights" / "config.json")
    (src / "weights" / "config.json").write_text("{}")
    (tmp_path / "spec.yaml").write_text(RENAME)
    assert main(["convert", str(tmp_path / "spec.yaml"), str(src), str(tmp_path / "out")]) == 0
    assert "wrote 1 tensors" in capsys.readouterr().out


def test_a_file_passed_itself_may_live_anywhere(tmp_path, capsys):
    """The containment rule is for the files a directory brings along; a file named outright is meant."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "w.safetensors").write_bytes(tensors("m.a"))
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "elsewhere" / "w.safetensors")
    (tmp_path / "spec.yaml").write_text(RENAME)
    argv = ["convert", str(tmp_path / "spec.yaml"), str(tmp_path / "link.safetensors"), str(tmp_path / "out")]
    assert main(argv) == 0
    assert "wrote 1 tensors" in capsys.readouterr().out

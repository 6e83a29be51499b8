"""The GGUF reader and writer (issue 18, part 1): headers read as gguf-py reads them, files written as
gguf-py writes them (byte for byte), block types decoded on read, one atomic file out, and every
hostile header one clear error; the header reader fuzzed like the safetensors one."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_fuzz import FUZZ, bounded

import convspec
from convspec.cli import main
from convspec.io.gguf import MAX_STRING, read_header
from convspec.io.gguf_checkpoint import METADATA_FILE, GgufCheckpoint
from convspec.io.safetensors import CheckpointError

gguf = pytest.importorskip("gguf", reason="the GGUF tests need gguf-py: pip install 'convspec[gguf]'")
np = pytest.importorskip("numpy")
T = gguf.GGMLQuantizationType

# A spec of one's own over a GGUF file of an architecture no GGUF mapping knows: names and a rope
# permutation, as a llama-family spec has them
TOY = """\
spec: gguf_toy
doc: a toy GGUF layout
model_types: []
rules:
  - rename: token_embd.weight
    to: model.embed_tokens.weight
  - rename: blk.{i:int}.attn_norm.weight
    to: model.layers.{i}.input_layernorm.weight
  - convert:
      q: blk.{i:int}.attn_q.weight
    to:
      model.layers.{i}.self_attn.q_proj.weight: permute_rope(q, heads=2)
"""


def write_toy(path: Path, quantized: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """A toy GGUF file written by gguf-py, metadata of every type included; its tensors by name."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "toy")
    w.add_block_count(2)
    w.add_string("toy.text", "héllo wörld")
    w.add_float32("toy.eps", 1e-5)
    w.add_float64("toy.big", 1e300)
    w.add_bool("toy.flag", True)
    w.add_uint64("toy.u64", 2**40)
    w.add_int8("toy.i8", -3)
    w.add_array("toy.ints", [1, -2, 3])
    w.add_array("toy.floats", [0.5, 1.5])
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b", "ü"])
    tensors = {"token_embd.weight": rng.standard_normal((16, 32)).astype(np.float16)}
    for i in range(2):
        tensors[f"blk.{i}.attn_norm.weight"] = rng.standard_normal(32).astype(np.float32)
        tensors[f"blk.{i}.attn_q.weight"] = rng.standard_normal((32, 32)).astype(np.float32)
    for name, a in tensors.items():
        if quantized and name == "blk.1.attn_q.weight":
            q = gguf.quants.quantize(a, T.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=T.Q8_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    (tmp_path / "toy.yaml").write_text(TOY)
    return tmp_path


def test_header_reads_as_gguf_py_reads_it(tmp_path: Path):
    """Every metadata value, tensor shape (torch order), type and data offset as gguf-py's reader has them."""
    path = tmp_path / "toy.gguf"
    write_toy(path, quantized=True)
    ours, theirs = read_header(path), gguf.GGUFReader(str(path))
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        got = ours.metadata[key][1]
        want = field.contents()
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, key
    assert ours.metadata["toy.u64"] == ("u64", 2**40)
    assert ours.metadata["toy.ints"] == ("arr:i32", [1, -2, 3])
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.start == t.data_offset and mine.ggml_type == int(t.tensor_type)
        assert mine.stored.shape == tuple(t.data.shape), t.name
        assert mine.shape == tuple(int(n) for n in reversed(t.shape)), t.name


def test_block_types_decode_on_read(tmp_path: Path):
    """A Q8_0 tensor reads as gguf-py's dequantization of it; plain ones as their bytes."""
    path = tmp_path / "toy.gguf"
    tensors = write_toy(path, quantized=True)
    ckpt = GgufCheckpoint(path)
    assert ckpt.decoded == {"blk.1.attn_q.weight": int(T.Q8_0)}
    assert ckpt.layout["blk.1.attn_q.weight"] == ((32, 32), "float32")
    q = gguf.quants.quantize(tensors["blk.1.attn_q.weight"], T.Q8_0)
    want = torch.from_numpy(gguf.quants.dequantize(q, T.Q8_0))
    assert torch.equal(ckpt.get("blk.1.attn_q.weight"), want)
    assert torch.equal(ckpt.get("token_embd.weight"), torch.from_numpy(tensors["token_embd.weight"]))


def _rope(a: np.ndarray, heads: int) -> np.ndarray:
    """transformers' LlamaTensorProcessor._reverse_permute_weights (GGUF -> HF)."""
    dim = a.shape[0] // heads // 2
    return a.reshape(heads, dim, 2, *a.shape[1:]).swapaxes(2, 1).reshape(a.shape)


def test_gguf_to_safetensors_and_back_is_byte_identical(toy: Path):
    """GGUF -> safetensors (renamed, rope rows permuted) -> GGUF gives back the file gguf-py wrote, byte
    for byte: metadata and tensor order kept beside the weights, padding as gguf-py pads."""
    tensors = write_toy(toy / "toy.gguf")
    r = convspec.convert(toy / "toy.yaml", toy / "toy.gguf", toy / "hf")
    assert r.files == ["model.safetensors"] and (toy / "hf" / METADATA_FILE).is_file()
    sd = load_file(toy / "hf" / "model.safetensors")
    assert torch.equal(sd["model.embed_tokens.weight"], torch.from_numpy(tensors["token_embd.weight"]))
    want = _rope(tensors["blk.1.attn_q.weight"], 2)
    assert torch.equal(sd["model.layers.1.self_attn.q_proj.weight"], torch.from_numpy(want))
    back = convspec.convert(toy / "toy.yaml", toy / "hf", toy / "back.gguf")  # the reverse is implied
    assert back.files == ["back.gguf"]
    assert (toy / "back.gguf").read_bytes() == (toy / "toy.gguf").read_bytes()
    assert not [p for p in toy.iterdir() if ".convspec-" in p.name]


def test_quantized_output_is_what_gguf_py_quantizes(toy: Path):
    """--gguf-type q8_0: 2-D tensors quantized as gguf-py quantizes them, 1-D ones F32, the file type
    set; a Q8_0 tensor read, dequantized and quantized again comes back byte for byte."""
    tensors = write_toy(toy / "toy.gguf", quantized=True)
    convspec.convert(toy / "toy.yaml", toy / "toy.gguf", toy / "hf")
    assert (
        main(["convert", str(toy / "toy.yaml"), str(toy / "hf"), str(toy / "q.gguf"), "--gguf-type", "q8_0"])
        == 0
    )
    r = gguf.GGUFReader(str(toy / "q.gguf"))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_norm.weight"] == T.F32 and types["blk.0.attn_q.weight"] == T.Q8_0
    assert r.fields["general.file_type"].contents() == 7  # llama.cpp's MOSTLY_Q8_0
    data = {t.name: np.asarray(t.data) for t in r.tensors}
    emb = tensors["token_embd.weight"].astype(np.float32)
    assert np.array_equal(data["token_embd.weight"], gguf.quants.quantize(emb, T.Q8_0))
    original = gguf.quants.quantize(tensors["blk.1.attn_q.weight"], T.Q8_0)
    assert np.array_equal(data["blk.1.attn_q.weight"], original)


def test_f16_output_keeps_1d_tensors_f32(toy: Path):
    write_toy(toy / "toy.gguf")
    convspec.convert(toy / "toy.yaml", toy / "toy.gguf", toy / "hf")
    convspec.convert(toy / "toy.yaml", toy / "hf", toy / "h.gguf", gguf_type="f16")
    r = gguf.GGUFReader(str(toy / "h.gguf"))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == T.F16 and types["blk.0.attn_norm.weight"] == T.F32
    sd = load_file(toy / "hf" / "model.safetensors")
    got = {t.name: np.asarray(t.data) for t in r.tensors}["blk.0.attn_q.weight"]
    # the way back permutes rope rows to llama.cpp's order, then casts as numpy does (round to nearest)
    hf = sd["model.layers.0.self_attn.q_proj.weight"].numpy()
    dim = hf.shape[0] // 2 // 2
    want = hf.reshape(2, 2, dim, 32).swapaxes(1, 2).reshape(hf.shape).astype(np.float16)
    assert np.array_equal(got, want)


def test_failed_write_leaves_nothing(toy: Path, monkeypatch):
    """A failure after the first tensor: no output file, no temporary, the source untouched."""
    from convspec.io import gguf_writer

    write_toy(toy / "toy.gguf")
    convspec.convert(toy / "toy.yaml", toy / "toy.gguf", toy / "hf")
    calls, real = [], gguf_writer.stored_as

    def boom(t, ggml_type):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(t, ggml_type)

    monkeypatch.setattr(gguf_writer, "stored_as", boom)
    with pytest.raises(CheckpointError, match="no space is left"):
        convspec.convert(toy / "toy.yaml", toy / "hf", toy / "out.gguf", gguf_type="f32")
    assert calls and not [p for p in toy.iterdir() if p.name.startswith((".out", "out"))]


def test_existing_output_needs_overwrite(toy: Path, capsys):
    write_toy(toy / "toy.gguf")
    convspec.convert(toy / "toy.yaml", toy / "toy.gguf", toy / "hf")
    (toy / "out.gguf").write_bytes(b"old")
    argv = ["convert", str(toy / "toy.yaml"), str(toy / "hf"), str(toy / "out.gguf")]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err and (toy / "out.gguf").read_bytes() == b"old"
    assert main([*argv, "--overwrite"]) == 0
    assert (toy / "out.gguf").read_bytes() == (toy / "toy.gguf").read_bytes()


@pytest.mark.parametrize(
    ("extra", "dst", "expected"),
    [
        (["--gguf-type", "q3_k"], "out.gguf", "unknown GGUF type 'q3_k'"),
        (["--gguf-type", "f16"], "out", "--gguf-type f16 needs a .gguf output"),
        (["--workers", "2"], "out.gguf", "a GGUF output is one file written by one process: --workers"),
        (["--manifest"], "out.gguf", "--manifest cannot apply"),
        (["--dtype", "float8_e4m3fn"], "out.gguf", "a float8_e4m3fn tensor cannot be stored in GGUF"),
    ],
)
def test_options_a_gguf_output_cannot_honour(toy: Path, capsys, extra, dst, expected):
    """One message, exit 2, nothing written."""
    write_toy(toy / "toy.gguf")
    convspec.convert(toy / "toy.yaml", toy / "toy.gguf", toy / "hf")
    before = sorted(p.name for p in toy.iterdir())
    assert main(["convert", str(toy / "toy.yaml"), str(toy / "hf"), str(toy / dst), *extra]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert sorted(p.name for p in toy.iterdir()) == before


# ---- hostile files -----------------------------------------------------------------------------


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    raw = key.encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<I", vtype) + payload


def _tensor(name: str, ne: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    raw = name.encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, offset)


def _file(kvs: list[bytes], tensors: list[bytes], data: bytes = b"", version: int = 3) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % 32) + data


ARCH = _kv("general.architecture", 8, struct.pack("<Q", 3) + b"toy")
ONE = _tensor("token_embd.weight", (4, 2), 0, 0)  # f32 [2, 4]: 32 bytes
GOOD = _file([ARCH], [ONE], b"\0" * 32)

HOSTILE = {
    "bad-magic": (b"GGML" + GOOD[4:], "not a GGUF file: it starts with b'GGML'"),
    "empty": (b"", "not a GGUF file: it starts with b''"),
    "version-1": (_file([ARCH], [ONE], b"\0" * 32, version=1), "version 1 is not supported"),
    "big-endian": (GOOD[:4] + struct.pack(">I", 3) + GOOD[8:], "a big-endian file is not supported"),
    "truncated-header": (GOOD[:40], "the file ends at byte 40"),
    "truncated-data": (GOOD[:-8], "runs past the end of the file"),
    "data-past-end": (
        _file([ARCH], [_tensor("t", (4, 2), 0, 64)], b"\0" * 32),
        "runs past the end of the file",
    ),
    "absurd-tensor-count": (b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0), "claims 4611686018427387904 tensors"),
    "absurd-kv-count": (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**63), "claims 9223372036854775808 metadata"),
    "string-2^60": (
        _file([b"\0" * 0 + struct.pack("<Q", 2**60) + b"x"], [], b""),
        f"claims {2**60} bytes (at most {MAX_STRING} are read)",
    ),
    "array-2^60": (
        _file([_kv("a", 9, struct.pack("<IQ", 4, 2**60))], []),
        "an array of 1152921504606846976 elements",
    ),
    "misaligned-offset": (
        _file([ARCH], [_tensor("t", (4, 2), 0, 4)], b"\0" * 64),
        "not a multiple of the alignment",
    ),
    "overlapping": (
        _file([ARCH], [_tensor("a", (8,), 0, 0), _tensor("b", (8,), 0, 0)], b"\0" * 64),
        "overlap in the file",
    ),
    "duplicate-tensor": (_file([ARCH], [ONE, ONE], b"\0" * 64), "appears twice"),
    "duplicate-key": (
        _file([ARCH, ARCH], [ONE], b"\0" * 32),
        "metadata key 'general.architecture' appears twice",
    ),
    "five-dims": (_file([ARCH], [_tensor("t", (1, 1, 1, 1, 1), 0, 0)], b"\0" * 32), "has 5 dims"),
    "unknown-type": (_file([ARCH], [_tensor("t", (4,), 99, 0)], b"\0" * 32), "GGML type 99"),
    "unknown-value-type": (_file([_kv("k", 77, b"")], []), "unknown value type 77"),
    "ragged-blocks": (_file([ARCH], [_tensor("t", (33,), 8, 0)], b"\0" * 64), "not whole q8_0 blocks of 32"),
    "bad-alignment": (
        _file([_kv("general.alignment", 4, struct.pack("<I", 24))], []),
        "must be a u32 power of two",
    ),
    "bad-utf8": (_file([_kv("k", 8, struct.pack("<Q", 2) + b"\xff\xfe")], []), "is not UTF-8"),
    "nested-arrays": (
        _file(
            [_kv("k", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0))], []
        ),
        "nests arrays more than 2 deep",
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_gguf_is_one_clear_error(name: str, toy: Path, capsys):
    """Exit 2, one error line naming the file and what is wrong, nothing written."""
    data, expected = HOSTILE[name]
    (toy / "bad.gguf").write_bytes(data)
    before = sorted(p.name for p in toy.iterdir())
    assert main(["convert", str(toy / "toy.yaml"), str(toy / "bad.gguf"), str(toy / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert str(toy / "bad.gguf") in first and expected in first, first
    assert sorted(p.name for p in toy.iterdir()) == before


def test_huge_claims_allocate_nothing(tmp_path: Path):
    """A 2^60-byte string or array and 2^62 tensors are refused before any buffer that size exists."""
    import tracemalloc

    for name in ("string-2^60", "array-2^60", "absurd-tensor-count"):
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(HOSTILE[name][0])
        tracemalloc.start()
        try:
            with pytest.raises(CheckpointError):
                read_header(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20, (name, peak)


def test_every_prefix_of_a_real_file_is_an_error(tmp_path: Path):
    """A file cut anywhere reads as an error naming it, never as a smaller model."""
    path = tmp_path / "toy.gguf"
    write_toy(path, quantized=True)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in range(0, len(data), 7):
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=str(cut)):
            read_header(cut)


# ---- fuzzing (the header readers' fuzzing, test_fuzz.py, covers this reader too) ---------------


def read_checked(path: Path):
    """read_header's tensors, checked against the file, or the CheckpointError it raised."""
    got = bounded(read_header, path)
    if isinstance(got, CheckpointError):
        assert str(path) in got.message
        return got
    size = path.stat().st_size
    spans = sorted((t.start, t.end) for t in got.tensors.values())
    for t in got.tensors.values():
        assert got.data_start <= t.start <= t.end <= size and (t.start - got.data_start) % got.alignment == 0
        assert 1 <= len(t.shape) <= 4 and all(s >= 0 for s in t.shape)
    assert all(a <= b for (_, a), (b, _) in zip(spans, spans[1:], strict=False))
    return got


@FUZZ
@given(
    data=st.binary(max_size=512).map(lambda b: b"GGUF" + struct.pack("<I", 3) + b) | st.binary(max_size=256)
)
@example(data=GOOD)
def test_read_header_random_bytes(data: bytes, tmp_path_factory):
    path = tmp_path_factory.mktemp("g") / "random.gguf"
    path.write_bytes(data)
    read_checked(path)


@FUZZ
@given(data=st.data())
def test_read_header_mutated(data, tmp_path_factory):
    """A real file (gguf-py's) with bytes flipped, cut, deleted or overwritten by large integers."""
    d = tmp_path_factory.mktemp("g")
    seed = d / "seed.gguf"
    write_toy(seed, quantized=True)
    out = bytearray(seed.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(out) - 1))
        kind = data.draw(st.sampled_from(["flip", "cut", "delete", "int"]))
        if kind == "flip":
            out[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del out[pos:]
        elif kind == "delete":
            del out[pos : pos + data.draw(st.integers(1, 16))]
        else:
            big = data.draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**60, 2**63, 2**64 - 1]))
            out[pos : pos + 8] = struct.pack("<Q", big)
        if not out:
            break
    path = d / "mutant.gguf"
    path.write_bytes(bytes(out))
    got = read_checked(path)
    if not isinstance(got, CheckpointError):  # a mutant that still reads converts or is refused cleanly
        ckpt = GgufCheckpoint(path)
        for key in list(ckpt.entries)[:3]:
            try:
                ckpt.get(key)
            except convspec.ConvspecError:
                pass
        ckpt.close()


def test_source_file_is_never_written(toy: Path):
    write_toy(toy / "toy.gguf")
    before = (toy / "toy.gguf").read_bytes(), os.stat(toy / "toy.gguf").st_mtime_ns
    convspec.convert(toy / "toy.yaml", toy / "toy.gguf", toy / "hf")
    assert ((toy / "toy.gguf").read_bytes(), os.stat(toy / "toy.gguf").st_mtime_ns) == before


def test_a_key_with_no_gguf_name_is_refused(toy: Path, capsys):
    """A tensor no rule claims would reach the GGUF file under its Hugging Face name: refused, naming it."""
    from convspec.io.writer import write_file

    write_toy(toy / "toy.gguf")
    convspec.convert(toy / "toy.yaml", toy / "toy.gguf", toy / "hf")
    write_file(toy / "hf" / "extra.safetensors", {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)})
    assert main(["convert", str(toy / "toy.yaml"), str(toy / "hf"), str(toy / "out.gguf")]) == 2
    err = capsys.readouterr().err
    assert (
        "1 tensor(s) of" in err
        and "have no GGUF name in spec gguf_toy: model.layers.0.mlp.up_proj.weight" in err
    )
    assert not (toy / "out.gguf").exists()


def test_explain_says_a_block_typed_key_is_decoded(toy: Path, capsys):
    write_toy(toy / "toy.gguf", quantized=True)
    assert (
        main(["explain", str(toy / "toy.yaml"), "blk.1.attn_q.weight", "--against", str(toy / "toy.gguf")])
        == 0
    )
    out = capsys.readouterr().out
    assert (
        f"note: stored as q8_0 blocks in {toy / 'toy.gguf'}: read through dequant_ggml, which is lossy" in out
    )
    assert (
        main(["explain", str(toy / "toy.yaml"), "blk.0.attn_q.weight", "--against", str(toy / "toy.gguf")])
        == 0
    )
    assert "dequant_ggml" not in capsys.readouterr().out


def test_spec_names_resolve_to_gguf_specs(tmp_path: Path):
    """`llama`, a transformers model type, and `gguf` (the file's own architecture) name GGUF specs
    when a side is a .gguf file; a .gguf output from a folder runs the spec in reverse; GGUF to GGUF
    keeps the names and changes the types."""
    from convspec.api import gguf_spec
    from convspec.io.checkpoint import Checkpoint

    hf = tmp_path / "hf"
    hf.mkdir()
    from convspec.io.writer import write_file

    write_file(hf / "model.safetensors", {"model.embed_tokens.weight": torch.ones(4, 32)})
    (hf / "config.json").write_text('{"model_type": "llama"}')
    spec, reverse = gguf_spec("llama", Checkpoint(hf), tmp_path / "x.gguf", False)
    assert (spec.name, reverse) == ("gguf_llama", True)
    assert gguf_spec("qwen2_moe", Checkpoint(hf), tmp_path / "x.gguf", False)[0].name == "gguf_qwen2moe"
    assert gguf_spec("gguf", Checkpoint(hf), tmp_path / "x.gguf", False)[0].name == "gguf_llama"
    assert gguf_spec("llama", Checkpoint(hf), tmp_path / "out", False) == ("llama", False)
    path = tmp_path / "toy.gguf"
    write_toy(path)
    assert gguf_spec("gguf", GgufCheckpoint(path), tmp_path / "out", False) == ("gguf_toy", False)
    assert gguf_spec("llama", GgufCheckpoint(path), tmp_path / "out", False) == ("gguf_llama", False)
    assert gguf_spec("llama", GgufCheckpoint(path), tmp_path / "y.gguf", False) == ("identity", False)
    r = convspec.convert("llama", path, tmp_path / "q.gguf", gguf_type="q8_0")
    got = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    assert r.tensors == 5 and {t.name for t in got.tensors} == set(read_header(path).tensors)
    assert {t.name: t.tensor_type for t in got.tensors}["blk.0.attn_q.weight"] == T.Q8_0


def test_a_killed_runs_temporary_file_is_removed(toy: Path, capsys):
    """A GGUF temporary a dead run left beside the destination (its pid gone) is removed and named."""
    write_toy(toy / "toy.gguf")
    convspec.convert(toy / "toy.yaml", toy / "toy.gguf", toy / "hf")
    stale = toy / ".out.gguf.convspec-tmp-4194303"  # above any pid this machine gives
    stale.write_bytes(b"GGUF half")
    assert main(["convert", str(toy / "toy.yaml"), str(toy / "hf"), str(toy / "out.gguf")]) == 0
    assert not stale.exists() and (toy / "out.gguf").read_bytes() == (toy / "toy.gguf").read_bytes()
    assert f"removed {stale.name}" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL: Linux")
def test_a_killed_gguf_convert_leaves_nothing_or_the_whole_file(tmp_path: Path):
    """SIGKILLed at seeded points over a run, a .gguf output is absent (and the same command again
    writes it, removing the dead run's temporary) or byte for byte the uninterrupted one."""
    import random
    import time

    from test_kill import _delays, _kill_after

    from convspec.io.writer import write_file

    hf = tmp_path / "hf"
    hf.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(4096, 512, generator=g)}
    for i in range(8):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"model.layers.{i}.self_attn.{name}.weight"] = torch.randn(512, 512, generator=g)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(512, generator=g)
    write_file(hf / "model.safetensors", tensors)  # 42 MB
    config = {"model_type": "llama", "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 8, "vocab_size": 4096, "intermediate_size": 1024, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 128, "tie_word_embeddings": True}  # fmt: skip
    (hf / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "out.gguf"
    argv = ["convert", "llama", str(hf), str(dst), "--quiet", "--gguf-type", "f16"]
    t0 = time.monotonic()
    assert main(argv) == 0
    duration = max(time.monotonic() - t0, 1.0) + 1.0  # a child also imports torch
    reference = dst.read_bytes()
    dst.unlink()

    def temporaries() -> list[str]:
        return [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.gguf.")]

    outcomes = {"absent": 0, "complete": 0}
    for delay in _delays(8, duration, random.Random(18)):
        _kill_after(argv, delay)
        if dst.exists():
            assert dst.read_bytes() == reference and not temporaries(), f"killed at {delay:.2f}s"
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
            assert main(argv) == 0 and dst.read_bytes() == reference
            assert not temporaries(), f"a rerun after a kill at {delay:.2f}s left {temporaries()}"
        dst.unlink()
    assert outcomes["absent"] >= 1  # the kill at once, on any machine


@pytest.mark.parametrize("dst", ["out.gguf", "out"])
def test_a_huge_gguf_type_is_shown_cut_short(toy: Path, capsys, dst):
    """A 100,000-character --gguf-type is one short line, whatever the output, and nothing is written."""
    write_toy(toy / "toy.gguf")
    convspec.convert(toy / "toy.yaml", toy / "toy.gguf", toy / "hf")
    assert (
        main(
            ["convert", str(toy / "toy.yaml"), str(toy / "hf"), str(toy / dst), "--gguf-type", "x" * 100_000]
        )
        == 2
    )
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("error: unknown GGUF type 'xxx") and len(first) < 200
    assert not (toy / dst).exists()


def test_kept_metadata_nested_past_what_the_reader_reads_is_refused(toy: Path, capsys):
    """gguf_metadata.json may hold an array of arrays (the reader reads those back), not deeper."""
    write_toy(toy / "toy.gguf")
    convspec.convert(toy / "toy.yaml", toy / "toy.gguf", toy / "hf")
    kept = toy / "hf" / METADATA_FILE
    kept.write_text(json.dumps({"metadata": [["k", "arr:arr:u8", [[1], [2, 3]]]], "tensors": []}))
    assert main(["convert", str(toy / "toy.yaml"), str(toy / "hf"), str(toy / "a.gguf")]) == 0
    assert read_header(toy / "a.gguf").metadata["k"] == ("arr:arr:u8", [[1], [2, 3]])
    kept.write_text(json.dumps({"metadata": [["k", "arr:arr:arr:u8", [[[1]]]]], "tensors": []}))
    assert main(["convert", str(toy / "toy.yaml"), str(toy / "hf"), str(toy / "b.gguf")]) == 2
    assert "not a GGUF metadata file" in capsys.readouterr().err and not (toy / "b.gguf").exists()

"""`convspec infer`: specs synthesized from two layouts, each proved by binding it both ways, what is
left unexplained reported (never a wrong guess), and the command line. The count over every model
type of the conformance run is bench/synthesis.py's (docs/synthesis.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import convspec
from convspec.cli import main
from convspec.errors import ConvspecError

ROOT = Path(__file__).resolve().parent.parent
F = "float32"


def mixtral_pair(layers: int = 2, experts: int = 3) -> tuple[dict, dict]:
    src, dst = {}, {}
    for i in range(layers):
        src[f"model.layers.{i}.block_sparse_moe.gate.weight"] = ((experts, 16), F)
        dst[f"model.layers.{i}.mlp.gate.weight"] = ((experts, 16), F)
        src[f"model.layers.{i}.self_attn.q_proj.weight"] = dst[
            f"model.layers.{i}.self_attn.q_proj.weight"
        ] = ((16, 16), F)
        for e in range(experts):
            for w, shape in {"w1": (8, 16), "w2": (16, 8), "w3": (8, 16)}.items():
                src[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"] = (shape, F)
        dst[f"model.layers.{i}.mlp.experts.gate_up_proj"] = ((experts, 16, 16), F)
        dst[f"model.layers.{i}.mlp.experts.down_proj"] = ((experts, 16, 8), F)
    return src, dst


def gqa_pair() -> tuple[dict, dict]:
    """A fused qkv of 4 query and 2 key/value heads of 4 rows, and its parts, in 2 layers."""
    fused = {f"layers.{i}.attn.qkv_proj.weight": ((32, 16), F) for i in range(2)}
    parts = {}
    for i in range(2):
        parts[f"layers.{i}.attn.q_proj.weight"] = ((16, 16), F)
        parts[f"layers.{i}.attn.k_proj.weight"] = ((8, 16), F)
        parts[f"layers.{i}.attn.v_proj.weight"] = ((8, 16), F)
    return fused, parts


def test_mixtral_layouts_give_renames_stacks_and_a_cat_of_stacks():
    src, dst = mixtral_pair()
    r = convspec.infer(src, dst)
    assert r.ok and r.proof.ok
    assert [rule.kind for rule in r.found.rules] == ["rename", "stack", "stack"]
    assert "cat(stack(x0, over=e), stack(x1, over=e), dim=1, equal=true)" in r.spec
    assert "x0: model.layers.{i:int}.block_sparse_moe.experts.{e:int}.w1.weight" in r.spec
    assert r.found.unchanged == 2  # q_proj: the same key and shape on both sides
    assert len(r.found.questions) == 1 and "only data can confirm" in r.found.questions[0]


def test_the_synthesized_spec_converts_a_checkpoint_as_the_builtin_spec_does(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_tiny_mixtral.py"), str(tmp_path / "m")], check=True
    )
    spec = tmp_path / "inferred.yaml"
    config = str(tmp_path / "m" / "config.json")
    argv = ["infer", str(tmp_path / "m"), "mixtral", "--config", config, "-o", str(spec)]
    assert main(argv) == 0
    assert main(["check", str(spec)]) == 0
    convspec.convert(str(spec), tmp_path / "m", tmp_path / "ours")
    convspec.convert("mixtral", tmp_path / "m", tmp_path / "builtin")
    ours, builtin = (tmp_path / d / "model.safetensors" for d in ("ours", "builtin"))
    assert ours.read_bytes() == builtin.read_bytes()


def test_a_fused_qkv_of_gqa_sizes_is_cut_and_joined_with_its_sizes():
    fused, parts = gqa_pair()
    cut = convspec.infer(fused, parts)
    assert cut.ok and "split(x, dim=0, sizes=[16, 8, 8])" in cut.spec
    assert (
        "layers.{i}.attn.q_proj.weight, layers.{i}.attn.k_proj.weight, layers.{i}.attn.v_proj.weight"
        in cut.spec
    )
    joined = convspec.infer(parts, fused)
    assert joined.ok and "cat(x0, x1, x2, dim=0, sizes=[16, 8, 8])" in joined.spec
    # the sizes differ: q first, then k and v as the name says; but the heads of each key/value group
    # held together (Megatron's layout) fit the same shapes, so that is asked, both ways
    for r in (cut, joined):
        assert len(r.found.questions) == 1 and "Megatron's fused QKV" in r.found.questions[0]


def test_a_transpose_is_found_where_the_shape_says_so_and_asked_where_square():
    src = {"h.0.c_fc.weight": ((16, 64), F), "h.0.c_proj.weight": ((64, 64), F)}
    dst = {"h.0.c_fc.w": ((64, 16), F), "h.0.c_proj.w": ((64, 64), F)}
    r = convspec.infer(src, dst)
    assert "transpose(x, dim0=0, dim1=1)" in r.spec
    # the square one binds as a plain rename (its transpose would too): asked, only data can tell
    assert r.ok and any("h.{i}.c_proj.weight: square" in q for q in r.found.questions)


def test_unrelated_layouts_stay_unexplained_quickly():
    src = {f"encoder.block{i}.conv.weight": ((3 + i, 5), F) for i in range(200)}
    dst = {f"vocab_head.table_{i}": ((5, 3 + i), F) for i in range(200)}
    start = time.perf_counter()
    r = convspec.infer(src, dst)
    assert time.perf_counter() - start < 30  # a bound against a hang, not a speed figure
    assert not r.ok and not r.found.rules
    assert len(r.found.unexplained_source) == 200 and len(r.found.unexplained_target) == 200


@pytest.mark.parametrize("n", [3000])
def test_thousands_of_unrelated_names_of_one_shape_are_compared_by_family_and_within_a_budget(n):
    """Names that differ only in numbers (`block0` .. `block2999`) are one family, compared once;
    thousands of unrelated names without numbers spend the comparison budget and say so. Either way
    every key is left unexplained, in seconds rather than the n^2 ratios a pairwise search would take."""
    import random
    import string

    from convspec.synthesis import MAX_NAME_PAIRS

    numbered = convspec.infer(
        {f"encoder.block{i}.conv.weight": ((8, 8), F) for i in range(n)},
        {f"vocab_head.table_{i}.w": ((8, 8), F) for i in range(n)},
    )
    assert not numbered.found.rules and len(numbered.found.unexplained_source) == n
    rnd = random.Random(0)

    def word() -> str:
        return "".join(rnd.choice(string.ascii_lowercase) for _ in range(rnd.randint(3, 9)))

    m = 1000  # 10^6 pairs of names: over the budget
    start = time.perf_counter()
    r = convspec.infer(
        {f"{word()}.{word()}.weight": ((8, 8), F) for _ in range(m)},
        {f"{word()}_{word()}.{word()}": ((8, 8), F) for _ in range(m)},
    )
    assert time.perf_counter() - start < 60  # a bound against a hang, not a speed figure
    assert not r.found.rules and len(r.found.unexplained_target) == m  # no pair of random names by chance
    assert any(f"more than {MAX_NAME_PAIRS:,} pairs of names" in q for q in r.found.questions)


def test_shapes_alone_pair_only_what_is_unique_once_names_explain_most():
    src, dst = mixtral_pair()
    src["zz.q"], dst["lm_head.weight"] = ((64, 16), F), ((64, 16), F)  # names nothing alike
    r = convspec.infer(src, dst)
    assert r.ok and "rename: zz.q" in r.spec
    assert any("paired by shape alone" in q for q in r.found.questions)


# each a step of the search: stacks and joins; a fused qkv; transposes; module paths folded
# (mistral3); numbers moved (inkling2); paths read into later names (radio, sapiens2); in_proj cuts
@pytest.mark.parametrize(
    "key",
    [
        "mixtral",
        "qwen2_moe",
        "phi3",
        "gpt_oss",
        "mistral3",
        "inkling2",
        "radio",
        "sapiens2",
        "Tipsv2TextModel",
    ],
)
def test_conformance_pairs_from_transformers_bind_exactly(key):
    from convspec.hf.mapping import applied, meta_model, observe

    o = observe(applied(meta_model(key)))
    r = convspec.infer(dict(o.original), dict(o.converted))
    assert r.ok, (key, r.found.unexplained_source, r.proof)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "a layout is a JSON object"),
        ('{"a.weight": [[2, 2]]}', "is not [shape, dtype]"),
        ('{"a.weight": [[2, -1], "float32"]}', "is not [shape, dtype]"),
        ('{"a.weight": [[2, 2], "float33"]}', "is not [shape, dtype]"),
        ("{not json", "layout"),
    ],
)
def test_a_bad_layout_file_is_one_error(tmp_path, capsys, text, message):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    good = tmp_path / "good.json"
    good.write_text('{"a.weight": [[2, 2], "float32"]}')
    assert main(["infer", str(bad), str(good)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_infer_reports_and_exits_1_when_keys_are_left(tmp_path, capsys):
    src, dst = mixtral_pair()
    dst["model.extra.weight"] = ((7, 7), F)
    for name, layout in (("src", src), ("dst", dst)):
        (tmp_path / f"{name}.json").write_text(json.dumps({k: [list(s), d] for k, (s, d) in layout.items()}))
    assert main(["infer", str(tmp_path / "src.json"), str(tmp_path / "dst.json"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["unexplained_target"][0]["first"] == "model.extra.weight"
    assert [r["kind"] for r in report["rules"]] == ["rename", "stack", "stack"]
    from safetensors.torch import save_file

    (tmp_path / "ckpt").mkdir()
    save_file({"a.weight": torch.zeros(2, 2)}, str(tmp_path / "ckpt" / "model.safetensors"))
    inside = str(tmp_path / "ckpt" / "s.yaml")  # never written into what it reads
    assert main(["infer", str(tmp_path / "ckpt"), str(tmp_path / "dst.json"), "-o", inside]) == 2
    assert "is inside the source" in capsys.readouterr().err and not (tmp_path / "ckpt" / "s.yaml").exists()
    assert main(["infer", str(tmp_path / "src.json"), "not-a-model-type"]) == 2
    assert "not a checkpoint, a layout .json, or a transformers model type" in capsys.readouterr().err
    with pytest.raises(ConvspecError, match="no such file"):
        convspec.infer(src, tmp_path / "missing")


def test_a_checkpoint_pair_decides_what_shapes_cannot(tmp_path):
    """Both sides checkpoints: the order of parts of one size and a square transpose are tried on one
    group's tensors, and the choice that gives the target bit for bit is kept."""
    import torch

    from convspec.io.writer import write_file

    g = torch.Generator().manual_seed(0)
    src = {
        f"layers.{i}.experts.{e}.{w}.weight": torch.randn(4, 6, generator=g)
        for i in range(2)
        for e in range(3)
        for w in ("w1", "w3")
    }
    src.update({f"layers.{i}.proj.weight": torch.randn(6, 6, generator=g) for i in range(2)})
    dst = {}
    for i in range(2):  # up (w3) first: not the order the names suggest
        up = torch.stack([src[f"layers.{i}.experts.{e}.w3.weight"] for e in range(3)])
        gate = torch.stack([src[f"layers.{i}.experts.{e}.w1.weight"] for e in range(3)])
        dst[f"layers.{i}.mlp.gate_up_proj"] = torch.cat([up, gate], dim=1)
        dst[f"layers.{i}.mlp.proj.weight"] = src[f"layers.{i}.proj.weight"].T.contiguous()
        dst[f"layers.{i}.mlp.fc.weight"] = torch.randn(5, 6, generator=g)  # a transpose beside it
        src[f"layers.{i}.fc.weight"] = dst[f"layers.{i}.mlp.fc.weight"].T.contiguous()
    for name, tensors in (("a", src), ("b", dst)):
        (tmp_path / name).mkdir()
        write_file(tmp_path / name / "model.safetensors", tensors)
    r = convspec.infer(tmp_path / "a", tmp_path / "b")
    assert r.ok and not r.found.questions, r.found.questions
    assert len(r.found.decided) == 2
    assert "cat(stack(x1, over=e), stack(x0, over=e), dim=1, equal=true)" in r.spec
    assert r.spec.count("transpose(x, dim0=0, dim1=1)") == 2
    spec = tmp_path / "s.yaml"
    spec.write_text(r.spec)
    convspec.convert(str(spec), tmp_path / "a", tmp_path / "c")
    from safetensors.torch import load_file

    got = load_file(tmp_path / "c" / "model.safetensors")
    assert got.keys() == dst.keys() and all(torch.equal(got[k], dst[k]) for k in dst)


def test_against_spec_compares_behaviour_not_text(tmp_path, capsys):
    """The same behaviour as the built-in spec on every source key, though the texts differ; parts
    joined in the other order are named, byte range by byte range."""
    from convspec.synthesis import compare

    src, dst = mixtral_pair()
    r = convspec.infer(src, dst)
    assert compare(r.spec, convspec.compile("mixtral"), src) == []
    swapped = r.spec.replace(
        "cat(stack(x0, over=e), stack(x1, over=e)", "cat(stack(x1, over=e), stack(x0, over=e)"
    )
    diffs = compare(swapped, convspec.compile("mixtral"), src)
    assert len(diffs) == 2 * 3 * 2  # w1 and w3 of every expert of both layers
    assert (
        "experts.0.w1.weight: inferred -> model.layers.0.mlp.experts.gate_up_proj[bytes 512..1024]; the spec -> model.layers.0.mlp.experts.gate_up_proj[bytes 0..512]"
        in diffs[0]
    )
    for name, layout in (("src", src), ("dst", dst)):
        (tmp_path / f"{name}.json").write_text(json.dumps({k: [list(s), d] for k, (s, d) in layout.items()}))
    argv = [
        "infer",
        str(tmp_path / "src.json"),
        str(tmp_path / "dst.json"),
        "--against-spec",
        "qwen2_moe",
        "--json",
    ]
    assert main(argv) == 1
    report = json.loads(capsys.readouterr().out)
    assert (
        report["against_spec"] and "the spec -> model.layers.0.block_sparse_moe" in report["against_spec"][0]
    )


def test_a_meta_order_llama_pair_finds_its_rope_permutation_in_the_data(tmp_path):
    """Meta's q/k rows are rope pairs interleaved per head; transformers' are halves: a rename whose
    values differ is tried with the row permutations a checkpoint may hold, and the head count that
    gives the target bit for bit is found (here 4 query heads, 2 key/value heads)."""
    import torch
    from safetensors.torch import load_file

    from convspec.io.writer import write_file
    from convspec.ops import OPS

    g = torch.Generator().manual_seed(1)
    h, kv = 16, 8
    meta, hf = {}, {}
    for i in range(2):
        wq, wk, wv = (
            torch.randn(h, h, generator=g),
            torch.randn(kv, h, generator=g),
            torch.randn(kv, h, generator=g),
        )
        meta.update({f"layers.{i}.attention.wq.weight": wq, f"layers.{i}.attention.wk.weight": wk})
        meta[f"layers.{i}.attention.wv.weight"] = wv
        p = f"model.layers.{i}.self_attn"
        hf[f"{p}.q_proj.weight"] = OPS["permute_rope"].apply({"heads": 4}, [wq])[0]
        hf[f"{p}.k_proj.weight"] = OPS["permute_rope"].apply({"heads": 2}, [wk])[0]
        hf[f"{p}.v_proj.weight"] = wv
    for name, tensors in (("meta", meta), ("hf", hf)):
        (tmp_path / name).mkdir()
        write_file(tmp_path / name / "model.safetensors", tensors)
    r = convspec.infer(tmp_path / "meta", tmp_path / "hf")
    assert r.ok and not r.found.questions, r.found.questions
    assert "permute_rope(x, heads=4)" in r.spec and "permute_rope(x, heads=2)" in r.spec
    spec = tmp_path / "s.yaml"
    spec.write_text(r.spec)
    convspec.convert(str(spec), tmp_path / "meta", tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == hf.keys() and all(torch.equal(got[k], hf[k]) for k in hf)


def test_numbers_moved_by_a_constant_are_a_rename_that_writes_the_offset():
    """`attn_queries.0` .. `.5` are `layers.1` .. `.6` (inkling2): the members agree once one number
    moves by +1, and the shapes, which vary, agree only there: settled, no question."""
    src = {f"llm.attn_queries.{i}": (((3, 8) if i % 4 == 3 else (8,)), F) for i in range(6)}
    dst = {f"llm.layers.{i + 1}.query": (((3, 8) if i % 4 == 3 else (8,)), F) for i in range(6)}
    r = convspec.infer(src, dst)
    assert r.ok and not r.found.questions, r.found.questions
    assert "to: llm.layers.{n+1}.query" in r.spec


def test_a_renamed_module_path_is_read_into_later_names():
    """Renames that settle show `vit.blocks.#` -> `encoder.layer.#`; the fused `attn.qkv` under the old
    path is then compared as if it were there, and cut into q, k, v (radio's layout), not left."""
    src, dst = {}, {}
    for i in range(2):
        for leaf in ("norm1", "norm2"):
            for kind in ("weight", "bias"):
                src[f"vit.blocks.{i}.{leaf}.{kind}"] = dst[f"encoder.layer.{i}.{leaf}.{kind}"] = ((16,), F)
        src[f"vit.blocks.{i}.attn.qkv.bias"] = ((48,), F)
        src[f"vit.blocks.{i}.attn.proj.bias"] = ((16,), F)
        for p in ("q", "k", "v", "o"):
            dst[f"encoder.layer.{i}.attention.{p}_proj.bias"] = ((16,), F)
    r = convspec.infer(src, dst)
    assert r.ok, (r.found.unexplained_source, r.proof)
    assert (
        "encoder.layer.{i}.attention.q_proj.bias, encoder.layer.{i}.attention.k_proj.bias, "
        "encoder.layer.{i}.attention.v_proj.bias" in r.spec.replace("\n        ", " ")
    )
    assert "rename: vit.blocks.{i:int}.attn.proj.bias" in r.spec and "o_proj.bias" in r.spec


def test_a_whole_that_names_its_parts_is_cut_before_rows_that_merely_add_up():
    """fc1's 64 rows are w_qkv's 48 + out_proj's 16 (nemo_speechlm): a coincidence; w_qkv names q, k, v,
    so it is cut into them first, and net.0/net.3 go to fc1/fc2 one key at a time."""
    src, dst = {}, {}
    for i in range(2):
        src[f"enc.layers.{i}.attn.w_qkv.weight"] = ((48, 16), F)
        src[f"enc.layers.{i}.attn.out_proj.weight"] = ((16, 16), F)
        src[f"enc.layers.{i}.ffn.net.0.weight"] = ((64, 16), F)
        src[f"enc.layers.{i}.ffn.net.3.weight"] = ((16, 64), F)
        src[f"enc.layers.{i}.norm1.weight"] = dst[f"enc.layers.{i}.norm1.weight"] = ((16,), F)
        for p in ("q", "k", "v", "o"):
            dst[f"enc.layers.{i}.self_attn.{p}_proj.weight"] = ((16, 16), F)
        dst[f"enc.layers.{i}.mlp.fc1.weight"] = ((64, 16), F)
        dst[f"enc.layers.{i}.mlp.fc2.weight"] = ((16, 64), F)
    r = convspec.infer(src, dst)
    assert r.ok, (r.found.unexplained_source, r.proof)
    assert "x: enc.layers.{i:int}.attn.w_qkv.weight" in r.spec and "cat(" not in r.spec
    assert "to: enc.layers.0.mlp.fc1.weight" in r.spec


def test_the_one_key_of_a_shape_left_on_each_side_is_paired_and_asked():
    src, dst = mixtral_pair()
    src["ctc.decoder.decoder_layers.0.b"], dst["word_timestamp_head.bias"] = ((23,), F), ((23,), F)
    r = convspec.infer(src, dst)
    assert r.ok and "rename: ctc.decoder.decoder_layers.0.b" in r.spec
    assert any("the only key of its shape left on each side" in q for q in r.found.questions)


def test_names_that_do_not_settle_a_pairing_among_one_shape_are_asked():
    """`attn_q` is as near `q_proj` as `o_proj` by segments: the pairing is kept but asked, and so is
    the one it forces (`attn_output`); `q_norm` -> `q_norm` is settled by its own segment."""
    src, dst = {}, {}
    for i in range(2):
        src[f"blk.{i}.attn_q.weight"] = src[f"blk.{i}.attn_output.weight"] = ((16, 16), F)
        dst[f"model.layers.{i}.self_attn.q_proj.weight"] = dst[
            f"model.layers.{i}.self_attn.o_proj.weight"
        ] = (
            (16, 16),
            F,
        )
        src[f"blk.{i}.attn.q_norm.weight"] = src[f"blk.{i}.attn.k_norm.weight"] = ((4,), F)
        dst[f"model.layers.{i}.self_attn.q_norm.weight"] = dst[
            f"model.layers.{i}.self_attn.k_norm.weight"
        ] = (
            (4,),
            F,
        )
    r = convspec.infer(src, dst)
    asked = " ".join(r.found.questions)
    assert "blk.{n}.attn_q.weight ->" in asked and "blk.{n}.attn_output.weight ->" in asked
    assert "q_norm" not in asked.split("only data")[0] or "attn.q_norm.weight ->" not in asked


def test_renames_that_only_move_a_module_path_fold_into_one_path_rule():
    """Every key under `vision_tower.` moves under `model.vision_tower.` unchanged otherwise: one rule
    with a `{rest:path}` capture, proved both ways like the many it replaces. The experts under
    `model.layers` are converted, so that path is not folded (its rule would take them)."""
    src, dst = mixtral_pair()
    for i in range(3):
        for leaf, shape in (("q.weight", (8, 8)), ("mlp.fc1.weight", (16, 8)), ("norm.bias", (8,))):
            src[f"vision_tower.blocks.{i}.{leaf}"] = ((shape), F)
            dst[f"model.vision_tower.blocks.{i}.{leaf}"] = ((shape), F)
    r = convspec.infer(src, dst)
    assert r.ok and r.proof.ok
    assert "rename: vision_tower.{rest:path}  # 9 keys\n    to: model.vision_tower.{rest}" in r.spec
    assert r.spec.count("vision_tower") == 2 and "stack(" in r.spec


def test_sizes_and_head_counts_the_config_names_are_written_with_its_names(tmp_path):
    """With a config, a cut's sizes read `config.num_key_value_heads * config.head_dim` (the spec then
    holds for the model's other sizes), proved with that config; a size it does not name stays a number."""
    fused, parts = gqa_pair()
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4, "hidden_size": 16}
    r = convspec.infer(fused, parts, config=config)
    assert r.ok and r.proof.ok
    text = " ".join(r.spec.split())
    assert (
        "sizes=[config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim, "
        "config.num_key_value_heads * config.head_dim]" in text
    )
    bigger = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 4, "hidden_size": 32}
    plan = convspec.compile(convspec.spec.parse_spec(r.spec, "s.yaml"), config=bigger)
    out = plan.bind({"layers.0.attn.qkv_proj.weight": ((48, 32), F)}).outputs
    assert out["layers.0.attn.q_proj.weight"][0] == (32, 32) and out["layers.0.attn.k_proj.weight"][0] == (
        8,
        32,
    )
    assert "sizes=[16, 8, 8]" in " ".join(convspec.infer(fused, parts, config={"vocab_size": 7}).spec.split())
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "config.head_dim" in convspec.infer(fused, parts, config=tmp_path / "config.json").spec


def test_data_decisions_read_each_tensor_once_however_many_forms_are_tried(tmp_path):
    """A rename tried with every rope head count and interleave reads its tensors once, not once per
    try (a 128 MB weight tried 30 ways is one read)."""
    from collections import Counter

    from convspec.io.formats import open_checkpoint
    from convspec.io.writer import write_file
    from convspec.ops import OPS
    from convspec.synthesis import decide, layout_of, search

    g = torch.Generator().manual_seed(2)
    meta = {f"layers.{i}.attention.wq.weight": torch.randn(16, 16, generator=g) for i in range(2)}
    hf = {
        f"model.layers.{i}.self_attn.q_proj.weight": OPS["permute_rope"].apply({"heads": 4}, [w])[0]
        for i, w in enumerate(meta.values())
    }
    for name, tensors in (("meta", meta), ("hf", hf)):
        (tmp_path / name).mkdir()
        write_file(tmp_path / name / "model.safetensors", tensors)

    class Counted:
        def __init__(self, ckpt):
            self.ckpt, self.layout, self.reads = ckpt, ckpt.layout, Counter()

        def get(self, key):
            self.reads[key] += 1
            return self.ckpt.get(key)

    a, b = Counted(open_checkpoint(tmp_path / "meta")), Counted(open_checkpoint(tmp_path / "hf"))
    found = search(layout_of(tmp_path / "meta"), layout_of(tmp_path / "hf"))
    decide(found, a, b)
    assert any("permute_rope found" in d for d in found.decided)
    assert a.reads and max(a.reads.values()) == 1 and max(b.reads.values()) == 1


def test_a_dim_of_size_one_dropped_or_added_is_a_squeeze_or_an_unsqueeze():
    src = {f"enc.layers.{i}.embeddings.cls_token": ((1, 1, 8), F) for i in range(2)}
    src.update({f"enc.layers.{i}.scale": ((8,), F) for i in range(2)})
    dst = {f"enc.layers.{i}.embeddings.cls_token": ((1, 8), F) for i in range(2)}
    dst.update({f"enc.layers.{i}.scale": ((8, 1), F) for i in range(2)})
    r = convspec.infer(src, dst)
    assert r.ok and "squeeze(x, dim=0)" in r.spec and "unsqueeze(x, dim=1)" in r.spec


def test_a_stack_whose_count_differs_from_block_to_block():
    """Dots3's vision blocks hold 2, 3 or 4 experts: each stacked target has its own count, each
    source group runs 0..count-1."""
    src, dst = {}, {}
    for b, n in enumerate((2, 3, 4)):
        for e in range(n):
            src[f"vision.blocks.{b}.mlp.experts.{e}.fc2.weight"] = ((8, 4), F)
        dst[f"vision.blocks.{b}.mlp.experts.down_proj"] = ((n, 8, 4), F)
    r = convspec.infer(src, dst)
    assert r.ok and "stack(x, over=e)" in r.spec and r.found.rules[0].keys == 9


def test_strict_exits_1_while_a_question_is_left(tmp_path, capsys):
    src, dst = mixtral_pair()  # explained and proved, with the gate/up order asked
    for name, layout in (("src", src), ("dst", dst)):
        (tmp_path / f"{name}.json").write_text(json.dumps({k: [list(s), d] for k, (s, d) in layout.items()}))
    argv = ["infer", str(tmp_path / "src.json"), str(tmp_path / "dst.json"), "-o", str(tmp_path / "s.yaml")]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--strict"]) == 1
    out = capsys.readouterr().out
    assert "question:" in out and "not settled: binds both ways exactly, but questions are left" in out


def test_numbered_modules_pair_with_named_ones_by_their_parameters_shapes_and_order():
    """`nn.Sequential`'s `mlp1.0`, `mlp1.1`, `mlp1.3` (a norm, two linears) are the projector's
    `layer_norm`, `linear_1`, `linear_2` (qianfan_ocr): the norm by its parameters' shapes, the two
    linears, alike, in the order of their names; every pairing asked."""
    src, dst = mixtral_pair()
    for name, shapes in (("0", ((16,), (16,))), ("1", ((16, 16), (16,))), ("3", ((16, 16), (16,)))):
        src[f"mlp1.{name}.weight"], src[f"mlp1.{name}.bias"] = ((shapes[0], F), (shapes[1], F))
    for name, shapes in (
        ("layer_norm", ((16,), (16,))),
        ("linear_1", ((16, 16), (16,))),
        ("linear_2", ((16, 16), (16,))),
    ):
        dst[f"projector.{name}.weight"], dst[f"projector.{name}.bias"] = ((shapes[0], F), (shapes[1], F))
    r = convspec.infer(src, dst)
    assert r.ok, (r.found.unexplained_source, r.proof)
    asked = [q for q in r.found.questions if "module paired" in q]
    assert asked == [
        "mlp1.0 -> projector.layer_norm: module paired by its parameters' shapes alone",
        "mlp1.1 -> projector.linear_1: module paired by the order of 2 alike modules",
        "mlp1.3 -> projector.linear_2: module paired by the order of 2 alike modules",
    ]


def test_keys_with_quotes_backslashes_spaces_or_braces():
    """A quote or a backslash is written as itself (single-quoted YAML); a key with a space or a
    brace, which no template can hold, is left unexplained and said, never a broken spec."""
    for a, b in (('a"b.weight', 'c"b.weight'), ("a\\b.weight", "c\\b.weight"), ("a'b.weight", "c'b.weight")):
        r = convspec.infer({a: ((2,), F), "m.x.weight": ((3,), F)}, {b: ((2,), F), "m.x.weight": ((3,), F)})
        assert r.ok, (a, r.proof)
    for a, b in (("a b.weight", "c b.weight"), ("a{x}.weight", "c{x}.weight")):
        r = convspec.infer({a: ((2,), F), "m.x.weight": ((3,), F)}, {b: ((2,), F), "m.x.weight": ((3,), F)})
        assert not r.ok and a in r.found.unexplained_source and not r.proof.error
        assert any("no spec template can write" in q for q in r.found.questions)

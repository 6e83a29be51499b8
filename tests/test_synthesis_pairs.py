"""`convspec infer` on checkpoint pairs with data (issue 20): the tiny transformers models (the spec
inferred from the saved layout and transformers' own loaded state dict loads bit for bit as
transformers does), GGUF-named checkpoints written by the inverse of the built-in GGUF specs, and a
Megatron-style fused QKV of grouped query heads written here with plain torch. On the layouts alone
(no data) each pair is asked for honesty: every source key the inferred spec maps otherwise than the
truth (where it goes, or the values it gives) is named in a question or left unexplained."""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import convspec
from convspec.io.writer import write_file
from convspec.spec import parse_spec
from convspec.synthesis import Inferred, Proof, Synthesis, compare, layout_of, routes

transformers = pytest.importorskip("transformers")

from test_transformers_tiny import (  # noqa: E402
    _ATTN,
    CASES,
    _assert_bit_equal,
    _build,
    _model_class,
    _read_safetensors,
)


def _randomized(model) -> None:
    """Every floating tensor of the state dict drawn at random (seeded): a fresh model's norms are all
    ones, which no data can tell apart, so a swapped pairing would pass unseen."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))


def _save(d: Path, tensors: dict[str, torch.Tensor]) -> Path:
    d.mkdir(parents=True)
    write_file(d / "model.safetensors", {k: v.contiguous() for k, v in tensors.items()})
    return d


def _converted(r: Inferred, src: Path, tmp: Path) -> dict[str, torch.Tensor]:
    spec = tmp / "inferred.yaml"
    spec.write_text(r.spec)
    return convspec.compile(str(spec)).load(src)


# ---- honesty: what a spec inferred without data may get wrong, it must say -------------------------

_CAPTURE = re.compile(r"\{\w+(?::\w+)?\}")
_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)|(?<![\w.])\d+(?=\.)")


def _template(key: str) -> str:
    return ".".join("#" if s.isdigit() else s for s in key.split("."))


def _named(key: str, questions: list[str]) -> bool:
    """Whether a question names the key's template (`{n}`, `{i:int}`, `#` or a number in its slots)."""
    want = re.compile(r"(?<![\w.#])" + re.escape(_template(key)) + r"(?![\w#]|\.[\w#])")
    return any(want.search(_NUMBER.sub("#", _CAPTURE.sub("#", q))) for q in questions)


def _outputs(route) -> set[str]:
    return {x if isinstance(x, str) else x[0] for x in route}


def differing(r: Inferred, truth: convspec.Plan, src: Path, tmp: Path) -> list[str]:
    """Source keys the inferred spec maps otherwise than `truth` on the source checkpoint: routed
    elsewhere (compare: other keys, other byte ranges), or feeding an output whose values differ
    (a value transform, e.g. a rope permutation, that routes alone do not show)."""
    layout = layout_of(src)
    keys = {d.split(": inferred -> ")[0] for d in compare(r.spec, truth, layout)}
    got, want = _converted(r, src, tmp), truth.load(src)
    bad = {k for k in want if k not in got or not torch.equal(got[k], want[k])}
    keys |= {k for k, route in routes(truth, layout).items() if _outputs(route) & bad}
    return sorted(keys)


def assert_honest(r: Inferred, truth: convspec.Plan, src: Path, tmp: Path) -> None:
    """Never a silent wrong spec: each source key mapped otherwise than the truth is named in a
    question or left unexplained (then `r.ok` is false); a spec that does not bind is a said failure."""
    if not r.proof.ok:
        return
    silent = [
        k
        for k in differing(r, truth, src, tmp)
        if k not in r.found.unexplained_source and not _named(k, r.found.questions)
    ]
    assert not silent, (
        f"mapped otherwise than the truth and named in no question: {silent}\n"
        f"questions: {r.found.questions}\n{r.spec}"
    )


def test_the_honesty_check_sees_a_wrong_pairing_and_a_question_naming_it(tmp_path):
    """The check itself: two square weights swapped are caught; named in a question, they are not."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    src = _save(tmp_path / "src", {"layers.0.q.weight": a, "layers.0.o.weight": b})
    truth = convspec.compile(
        parse_spec(
            "spec truth\nrename layers.{i:int}.q.weight -> m.layers.{i}.q_proj.weight\n"
            "rename layers.{i:int}.o.weight -> m.layers.{i}.o_proj.weight\n",
            "truth.cspec",
        )
    )
    swapped = SimpleNamespace(
        spec="spec: s\nrules:\n  - rename: layers.{i:int}.q.weight\n    to: m.layers.{i}.o_proj.weight\n"
        "  - rename: layers.{i:int}.o.weight\n    to: m.layers.{i}.q_proj.weight\n",
        found=Synthesis(),
        proof=Proof([], []),
    )
    assert differing(swapped, truth, src, tmp_path) == ["layers.0.o.weight", "layers.0.q.weight"]
    swapped.found.questions = ["layers.{n}.q.weight could be x or y", 'layers.#.o.weight: "a" question']
    assert_honest(swapped, truth, src, tmp_path)
    swapped.found.questions = ["layers.{n}.q.weight could be x or y", "player.layers.#.o.weights"]
    with pytest.raises(AssertionError, match=r"\['layers.0.o.weight'\]"):
        assert_honest(swapped, truth, src, tmp_path)


# ---- 1. the tiny transformers models: saved layout -> transformers' loaded state dict ------------


@pytest.fixture(scope="module", params=list(CASES))
def tiny(request, tmp_path_factory):
    """(model type, saved checkpoint, the reference state dict written as a checkpoint, the reference)."""
    model_type = request.param
    _, kwargs = CASES[model_type]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    model = _build(model_type, config).float()
    _randomized(model)
    base = tmp_path_factory.mktemp(f"syn_{model_type}")
    orig = base / "orig"
    model.save_pretrained(orig)
    ref = _model_class(model_type).from_pretrained(orig, dtype=torch.float32)
    tied = set(dict(ref.all_tied_weights_keys))  # targets the file cannot hold (lm_head when tied)
    want = {k: v for k, v in ref.state_dict().items() if k not in tied}
    return model_type, orig, _save(base / "conv", want), want


def test_tiny_model_spec_inferred_with_data_loads_as_transformers(tiny, tmp_path):
    model_type, orig, conv, want = tiny
    r = convspec.infer(orig, conv)
    assert r.ok, (r.found.unexplained_source, r.found.unexplained_target, r.proof)
    assert not r.found.questions, r.found.questions  # the data decided every choice
    _assert_bit_equal(_converted(r, orig, tmp_path), want, f"{model_type}: inferred spec vs from_pretrained")


def test_tiny_model_layouts_alone_give_an_honest_report(tiny, tmp_path):
    model_type, orig, conv, _ = tiny
    start = time.perf_counter()
    r = convspec.infer(layout_of(orig), layout_of(conv))
    assert time.perf_counter() - start < 30  # a bound against a hang, not a speed figure
    assert r.ok or r.found.unexplained_source or r.found.unexplained_target
    truth = convspec.compile(convspec.load_spec(model_type), config=orig / "config.json")
    assert_honest(r, truth, orig, tmp_path)


# ---- 2. GGUF names: a tiny checkpoint renamed (and rope-permuted) by the built-in spec's inverse ----


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def gguf_pair(request, tmp_path_factory):
    """(arch, GGUF-named checkpoint, the HF checkpoint save_pretrained wrote, the built-in plan)."""
    arch = request.param
    config = transformers.AutoConfig.for_model(
        arch, **dict(_ATTN, intermediate_size=24, tie_word_embeddings=False)
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    _randomized(model)
    base = tmp_path_factory.mktemp(f"gguf_{arch}")
    model.save_pretrained(base / "hf")
    plan = convspec.compile(f"gguf_{arch}", config=base / "hf" / "config.json")
    plan.inverse().save(_read_safetensors(base / "hf"), base / "gguf")
    assert "blk.0.attn_q.weight" in _read_safetensors(base / "gguf")
    return arch, base / "gguf", base / "hf", plan


def test_gguf_names_inferred_with_data_behave_as_the_builtin_spec(gguf_pair, tmp_path):
    arch, gguf, hf, plan = gguf_pair
    r = convspec.infer(gguf, hf)
    assert r.ok, (r.found.unexplained_source, r.found.unexplained_target, r.proof)
    assert not r.found.questions, r.found.questions
    assert compare(r.spec, plan, layout_of(gguf)) == []
    if arch == "llama":  # q and k are rope-permuted by llama.cpp's converter: found in the data
        assert "permute_rope(x, heads=4)" in r.spec and "permute_rope(x, heads=2)" in r.spec
    _assert_bit_equal(_converted(r, gguf, tmp_path), _read_safetensors(hf), f"gguf_{arch}: inferred vs HF")


def test_gguf_names_from_layouts_alone_never_give_a_silent_wrong_spec(gguf_pair, tmp_path):
    _, gguf, hf, plan = gguf_pair
    r = convspec.infer(layout_of(gguf), layout_of(hf))
    assert r.ok or r.found.unexplained_source or r.found.unexplained_target
    assert_honest(r, plan, gguf, tmp_path)


# ---- 3. Megatron-LM: one fused QKV of grouped query heads, fused gate+up ------------------------

H, NQ, NKV, D, FFN, VOCAB, LAYERS = 16, 4, 2, 4, 24, 64, 2


def llama_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        "model.embed_tokens.weight": torch.randn(VOCAB, H, generator=g),
        "model.norm.weight": torch.randn(H, generator=g),
        "lm_head.weight": torch.randn(VOCAB, H, generator=g),
    }
    for i in range(LAYERS):
        shapes = {
            "self_attn.q_proj.weight": (NQ * D, H),
            "self_attn.k_proj.weight": (NKV * D, H),
            "self_attn.v_proj.weight": (NKV * D, H),
            "self_attn.o_proj.weight": (H, NQ * D),
            "mlp.gate_proj.weight": (FFN, H),
            "mlp.up_proj.weight": (FFN, H),
            "mlp.down_proj.weight": (H, FFN),
            "input_layernorm.weight": (H,),
            "post_attention_layernorm.weight": (H,),
        }
        t.update({f"model.layers.{i}.{k}": torch.randn(s, generator=g) for k, s in shapes.items()})
    return t


def megatron_tensors(llama: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron-LM's layout of the same weights: per key/value group, its NQ/NKV query heads, then
    its key head, then its value head, in one linear_qkv; gate then up in one linear_fc1."""
    t = {
        "embedding.word_embeddings.weight": llama["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": llama["model.norm.weight"],
        "output_layer.weight": llama["lm_head.weight"],
    }
    for i in range(LAYERS):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = llama[p + "self_attn.q_proj.weight"].reshape(NKV, NQ // NKV * D, H)
        k = llama[p + "self_attn.k_proj.weight"].reshape(NKV, D, H)
        v = llama[p + "self_attn.v_proj.weight"].reshape(NKV, D, H)
        t[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, H)
        t[m + "self_attention.linear_proj.weight"] = llama[p + "self_attn.o_proj.weight"]
        t[m + "mlp.linear_fc1.weight"] = torch.cat(
            [llama[p + "mlp.gate_proj.weight"], llama[p + "mlp.up_proj.weight"]]
        )
        t[m + "mlp.linear_fc2.weight"] = llama[p + "mlp.down_proj.weight"]
        t[m + "input_layernorm.weight"] = llama[p + "input_layernorm.weight"]
        t[m + "pre_mlp_layernorm.weight"] = llama[p + "post_attention_layernorm.weight"]
    return t


# The truth as a spec, for compare and the honesty check: the rows of a group (2 query heads, k, v,
# D rows each) regrouped by part, then the query heads (by part, then by group) by group again.
MEGATRON_TRUTH = f"""spec: megatron_llama_truth
rules:
  - rename: embedding.word_embeddings.weight
    to: model.embed_tokens.weight
  - rename: decoder.final_layernorm.weight
    to: model.norm.weight
  - rename: output_layer.weight
    to: lm_head.weight
  - rename: decoder.layers.{{i:int}}.input_layernorm.weight
    to: model.layers.{{i}}.input_layernorm.weight
  - rename: decoder.layers.{{i:int}}.pre_mlp_layernorm.weight
    to: model.layers.{{i}}.post_attention_layernorm.weight
  - rename: decoder.layers.{{i:int}}.self_attention.linear_proj.weight
    to: model.layers.{{i}}.self_attn.o_proj.weight
  - rename: decoder.layers.{{i:int}}.mlp.linear_fc2.weight
    to: model.layers.{{i}}.mlp.down_proj.weight
  - convert:
      x: decoder.layers.{{i:int}}.mlp.linear_fc1.weight
    to:
      "model.layers.{{i}}.mlp.gate_proj.weight, model.layers.{{i}}.mlp.up_proj.weight": chunk(x, dim=0, n=2)
  - convert:
      x: decoder.layers.{{i:int}}.self_attention.linear_qkv.weight
    let:
      "q, k, v": >-
        split(regroup_heads(x, groups={NKV}, size={NQ // NKV + 2}, rows={D}), dim=0,
        sizes=[{NQ * D}, {NKV * D}, {NKV * D}])
    to:
      model.layers.{{i}}.self_attn.q_proj.weight: regroup_heads(q, groups={NQ // NKV}, size={NKV}, rows={D})
      model.layers.{{i}}.self_attn.k_proj.weight: k
      model.layers.{{i}}.self_attn.v_proj.weight: v
"""


@pytest.fixture(scope="module")
def megatron_pair(tmp_path_factory):
    """(megatron checkpoint, llama checkpoint, their tensors, the truth plan megatron -> llama)."""
    base = tmp_path_factory.mktemp("megatron")
    llama = llama_tensors()
    meg = megatron_tensors(llama)
    truth = convspec.compile(parse_spec(MEGATRON_TRUTH, "megatron_llama_truth.yaml"))
    # the truth spec and the plain torch layout say the same thing, both ways
    _assert_bit_equal(truth.apply(meg), llama, "truth spec vs torch")
    _assert_bit_equal(truth.inverse().apply(llama), meg, "truth inverse vs torch")
    return _save(base / "megatron", meg), _save(base / "llama", llama), meg, llama, truth


@pytest.mark.parametrize("direction", ["megatron->llama", "llama->megatron"])
def test_megatron_fused_gqa_qkv_inferred_with_data_converts_bit_for_bit(megatron_pair, direction, tmp_path):
    meg_dir, llama_dir, meg, llama, _ = megatron_pair
    src, dst, want = (
        (meg_dir, llama_dir, llama) if direction == "megatron->llama" else (llama_dir, meg_dir, meg)
    )
    r = convspec.infer(src, dst)
    assert r.ok, (r.found.unexplained_source, r.found.unexplained_target, r.proof)
    _assert_bit_equal(_converted(r, src, tmp_path), want, f"{direction}: inferred spec")
    assert not r.found.questions, r.found.questions  # the data decided every choice


def test_megatron_layouts_alone_never_give_a_silent_wrong_spec(megatron_pair, tmp_path):
    meg_dir, llama_dir, _, _, truth = megatron_pair
    start = time.perf_counter()
    r = convspec.infer(layout_of(meg_dir), layout_of(llama_dir))
    assert time.perf_counter() - start < 30  # a bound against a hang, not a speed figure
    assert r.ok or r.found.unexplained_source or r.found.unexplained_target
    assert_honest(r, truth, meg_dir, tmp_path)

"""LoRA adapters converted by the adapter plan of a spec: the derivation on the built-in specs, the
adapter config that follows the converted names, the headers-only checks, the merge check, the CLI,
and every bad input as one clear error with nothing written. Made-up adapters (PEFT's names and
config); tests/test_lora_models.py makes real ones with PEFT and loads them back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convspec
from convspec import api
from convspec.adapters import converted_config, merge_check
from convspec.cli import main
from convspec.compile.lora import derive
from convspec.errors import ConvspecError

P = "base_model.model."
H, I, E, LAYERS, R = 16, 8, 3, 2, 2  # noqa: E741


def peft_config(**changes) -> dict:
    """The fields of an adapter_config.json PEFT 0.21 writes that convspec reads, and a few it keeps."""
    config = {
        "peft_type": "LORA",
        "r": R,
        "lora_alpha": 4,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": ["w2", "w1", "q_proj", "w3"],
        "target_parameters": None,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "task_type": None,
    }
    config.update(changes)
    return config


def mixtral_adapter(rank: int = R, seed: int = 0) -> dict[str, torch.Tensor]:
    """A per-expert Mixtral adapter (w1/w2/w3 of every expert, and q_proj), random non-zero A and B."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(LAYERS):
        m = f"{P}model.layers.{i}"
        out[f"{m}.self_attn.q_proj.lora_A.weight"] = torch.randn(rank, H, generator=g)
        out[f"{m}.self_attn.q_proj.lora_B.weight"] = torch.randn(H, rank, generator=g)
        for e in range(E):
            x = f"{m}.block_sparse_moe.experts.{e}"
            for w, (o, n) in {"w1": (I, H), "w2": (H, I), "w3": (I, H)}.items():
                out[f"{x}.{w}.lora_A.weight"] = torch.randn(rank, n, generator=g)
                out[f"{x}.{w}.lora_B.weight"] = torch.randn(o, rank, generator=g)
    return out


def mixtral_base(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(LAYERS):
        m = f"model.layers.{i}"
        out[f"{m}.self_attn.q_proj.weight"] = torch.randn(H, H, generator=g)
        for e in range(E):
            for w, shape in {"w1": (I, H), "w2": (H, I), "w3": (I, H)}.items():
                out[f"{m}.block_sparse_moe.experts.{e}.{w}.weight"] = torch.randn(*shape, generator=g)
    return out


def write_adapter(d: Path, tensors: dict, config: dict | str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})  # as PEFT saves
    (d / "adapter_config.json").write_text(
        config if isinstance(config, str) else json.dumps(config, indent=2)
    )
    return d


def write_base(d: Path, tensors: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "model.safetensors"))
    return d


@pytest.fixture
def pair(tmp_path):
    return write_adapter(tmp_path / "adapter", mixtral_adapter(), peft_config()), write_base(
        tmp_path / "base", mixtral_base()
    )


# ---- the derivation ------------------------------------------------------------------------------


def test_every_builtin_spec_has_an_adapter_plan_that_inverts():
    """Every built-in spec derives an adapter plan; where the base inverts, so does the adapter
    plan; a rule whose op factors cannot follow is a refusal with its reason, never an error."""
    checked = 0
    for name in api.spec_names():
        try:
            plan = convspec.compile(name)
        except ConvspecError:
            continue  # needs a config to compile at all
        adapter = derive(plan)
        assert bool(adapter.plan.rules) == bool(plan.rules), name
        if plan.inverse_rules is not None and not plan.lossy:
            assert adapter.plan.inverse_error is None, (name, adapter.plan.inverse_error)
        for _, label, why in adapter.refused:
            assert label.startswith("rule ") and why, (name, label, why)
        checked += 1
    assert checked > 150


def test_the_mixtral_adapter_plan_reads_as_peft_fuses_moe_adapters():
    plan = convspec.compile("mixtral").adapter()
    text = "\n".join(str(n) for n in plan.rules[1].nodes)
    assert "B%3 = block_diag(B%1, B%2, dim=-2, equal=true)" in text
    assert "A%3 = cat(A%1, A%2, dim=1, equal=true)" in text
    outs = [p.text for _, p in plan.rules[1].outputs]
    assert outs == [f"{P}{{p:path}}.mlp.experts.base_layer.{x}.weight" for x in ("lora_A", "lora_B")]


def test_convert_then_back_is_byte_identical_and_the_config_follows(pair, tmp_path):
    adapter, _ = pair
    out, back = tmp_path / "fused", tmp_path / "back"
    r = convspec.convert("mixtral", adapter, out)
    assert r.files == ["adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj"]
    assert config["target_parameters"] == ["down_proj", "gate_up_proj"]
    assert config["rank_pattern"] == {r".*\.gate_up_proj": 2 * R}  # w1 and w3 side by side
    assert config["alpha_pattern"] == {r".*\.gate_up_proj": 8}  # alpha / r kept
    fused = load_file(out / "adapter_model.safetensors")
    assert fused[f"{P}model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (E * 2 * R, H)
    assert fused[f"{P}model.layers.0.mlp.experts.lora_B.weight"].shape == (H, R * E)
    convspec.convert("mixtral", out, back, reverse=True)
    assert (back / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()
    again = json.loads((back / "adapter_config.json").read_text())
    source = json.loads((adapter / "adapter_config.json").read_text())
    assert set(again.pop("target_modules")) == set(source.pop("target_modules"))
    assert again == source


def test_rslora_keeps_its_scaling_alpha_over_sqrt_r(tmp_path):
    src = write_adapter(tmp_path / "a", mixtral_adapter(), peft_config(use_rslora=True))
    convspec.convert("mixtral", src, tmp_path / "o")
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    # alpha / sqrt(r) = 4 / sqrt(2) at rank 4 needs alpha = 4 * sqrt(2)
    assert config["alpha_pattern"][r".*\.gate_up_proj"] == pytest.approx(4 * 2**0.5)


def test_a_regex_target_modules_no_rule_touches_stays_as_written(tmp_path):
    tensors = {k: v for k, v in mixtral_adapter().items() if "q_proj" in k}
    src = write_adapter(tmp_path / "a", tensors, peft_config(target_modules=r".*\.q_proj"))
    r = convspec.convert("mixtral", src, tmp_path / "o")
    assert r.notes == [
        f"no key of {src} adapts a weight mixtral.lora converts: the adapter is copied unchanged"
    ]
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["target_modules"] == r".*\.q_proj"


def test_merge_check_passes_both_ways_and_fails_when_the_config_is_wrong(pair, monkeypatch):
    adapter_dir, base_dir = pair
    derived = api.adapter_plan("mixtral", adapter_dir, base=base_dir)
    weights, factors = mixtral_base(), mixtral_adapter()
    ok = merge_check(derived.base, derived, weights, factors)
    assert ok.checked == 2 * 3 and not ok.mismatches  # q_proj, gate_up_proj, down_proj per layer

    def wrong(adapter, bound, reverse=False):  # the fused alpha not rescaled: the scaling halves
        config = converted_config(adapter, bound, reverse)
        return {**config, "alpha_pattern": {}}

    monkeypatch.setattr("convspec.adapters.converted_config", wrong)
    bad = merge_check(derived.base, derived, weights, factors)
    assert {m.key for m in bad.mismatches} == {f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)}
    assert all(m.max_abs_diff > 1e-3 for m in bad.mismatches)


def test_a_fused_adapter_trained_fused_is_split_with_its_whole_rank(tmp_path):
    """B of a fused weight that is not block diagonal has no per-part adapters of the parts' rank:
    every part keeps the whole A and its rows of B (rank 2r), said in a note, and the parts' updates
    are the fused update's rows, exactly."""
    g = torch.Generator().manual_seed(3)
    x = f"{P}model.layers.0.mlp.experts"
    tensors = {
        f"{x}.lora_A.weight": torch.randn(E * 2 * R, H, generator=g),  # gate_up_proj alone: not nested
        f"{x}.lora_B.weight": torch.randn(2 * I, 2 * R * E, generator=g),
    }
    config = peft_config(
        target_modules=None, target_parameters=["gate_up_proj"], rank_pattern={"gate_up_proj": 2 * R}
    )
    src = write_adapter(tmp_path / "fused", tensors, config)
    r = convspec.convert("mixtral", src, tmp_path / "o", reverse=True)
    assert "a B is not block diagonal" in r.notes[0]
    out = load_file(tmp_path / "o" / "adapter_model.safetensors")
    a = tensors[f"{x}.lora_A.weight"].reshape(E, 2 * R, H)
    b = tensors[f"{x}.lora_B.weight"].reshape(2 * I, 2 * R, E).permute(2, 0, 1)
    for e in range(E):
        m = f"{P}model.layers.0.block_sparse_moe.experts.{e}"
        for w, rows in (("w1", slice(0, I)), ("w3", slice(I, 2 * I))):
            assert torch.equal(out[f"{m}.{w}.lora_A.weight"], a[e])
            assert torch.equal(out[f"{m}.{w}.lora_B.weight"], b[e][rows])
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {r".*\.w1": 2 * R, r".*\.w3": 2 * R}
    assert config["target_modules"] == ["w1", "w3"] and config["target_parameters"] is None


def test_split_qkv_shares_a_and_joins_back_with_one_a(tmp_path):
    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 16}
    g = torch.Generator().manual_seed(5)
    m = f"{P}model.layers.0.self_attn"
    tensors = {f"{m}.qkv_proj.lora_A.weight": torch.randn(R, 16, generator=g)}
    tensors[f"{m}.qkv_proj.lora_B.weight"] = torch.randn(32, R, generator=g)
    plan = convspec.compile("split_qkv", config=cfg).adapter()
    out = plan.apply(tensors)
    a = tensors[f"{m}.qkv_proj.lora_A.weight"]
    assert all(torch.equal(out[f"{m}.{x}_proj.lora_A.weight"], a) for x in "qkv")
    back = plan.inverse().apply(out)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    out[f"{m}.k_proj.lora_A.weight"] = out[f"{m}.k_proj.lora_A.weight"] + 1  # k adapted apart
    with pytest.raises(ConvspecError, match="do not share one factor"):
        plan.inverse().apply(out)


def test_dora_magnitudes_follow_the_rows():
    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 16}
    m = f"{P}model.layers.0.self_attn"
    g = torch.Generator().manual_seed(6)
    tensors = {
        f"{m}.qkv_proj.lora_A.weight": torch.randn(R, 16, generator=g),
        f"{m}.qkv_proj.lora_B.weight": torch.randn(32, R, generator=g),
        f"{m}.qkv_proj.lora_magnitude_vector": torch.randn(32, generator=g),
    }
    plan = convspec.compile("split_qkv", config=cfg).adapter(config={"use_dora": True, "r": R})
    out = plan.apply(tensors)
    mag = tensors[f"{m}.qkv_proj.lora_magnitude_vector"]
    assert torch.equal(out[f"{m}.k_proj.lora_magnitude_vector"], mag[16:24])
    back = plan.inverse().apply(out)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    refused = derive(convspec.compile("mixtral"), {"use_dora": True}).refused
    assert refused and all("DoRA" in why for *_, why in refused)


# ---- bad input: one clear error each, before data, nothing written ------------------------------


def _fails(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_b_without_a_is_named(tmp_path, capsys):
    tensors = mixtral_adapter()
    del tensors[f"{P}model.layers.1.block_sparse_moe.experts.2.w3.lora_A.weight"]
    src = write_adapter(tmp_path / "a", tensors, peft_config())
    err = _fails(capsys, "convert", "mixtral", str(src), str(tmp_path / "o"))
    assert "experts.2.w3.lora_B.weight: lora B without its A" in err
    assert not (tmp_path / "o").exists()


def test_a_rank_the_config_does_not_give_is_named(tmp_path, capsys):
    tensors = mixtral_adapter()
    k = f"{P}model.layers.0.self_attn.q_proj.lora_"
    tensors[k + "A.weight"], tensors[k + "B.weight"] = torch.ones(3, H), torch.ones(H, 3)
    src = write_adapter(tmp_path / "a", tensors, peft_config())
    err = _fails(capsys, "convert", "mixtral", str(src), str(tmp_path / "o"))
    assert "q_proj.lora_A.weight: rank 3, but adapter_config.json gives" in err


def test_parts_of_a_fused_weight_with_other_ranks_are_refused_with_the_reason(tmp_path, capsys):
    tensors = mixtral_adapter()
    for k in [k for k in tensors if ".w3." in k]:
        tensors[k] = (
            torch.ones(3, tensors[k].shape[1]) if "lora_A" in k else torch.ones(tensors[k].shape[0], 3)
        )
    src = write_adapter(tmp_path / "a", tensors, peft_config(rank_pattern={"w3": 3}))
    err = _fails(capsys, "convert", "mixtral", str(src), str(tmp_path / "o"))
    assert "the block-diagonal form needs one rank" in err and "ranks [2, 3]" in err
    assert "merge the adapter into the base model" in err


def test_parts_that_scale_differently_are_refused(tmp_path, capsys):
    src = write_adapter(tmp_path / "a", mixtral_adapter(), peft_config(alpha_pattern={"w3": 8}))
    err = _fails(capsys, "convert", "mixtral", str(src), str(tmp_path / "o"))
    assert "scale differently (alpha / r)" in err


def test_an_adapter_of_a_module_the_base_lacks_is_refused(pair, tmp_path, capsys):
    adapter, base = pair
    weights = mixtral_base()
    del weights["model.layers.1.self_attn.q_proj.weight"]
    other = write_base(tmp_path / "other", weights)
    err = _fails(capsys, "convert", "mixtral", str(adapter), str(tmp_path / "o"), "--base", str(other))
    assert "the base checkpoint has no model.layers.1.self_attn.q_proj.weight" in err
    weights["model.layers.1.self_attn.q_proj.weight"] = torch.ones(H, 2 * H)
    write_base(other, weights)
    err = _fails(capsys, "convert", "mixtral", str(adapter), str(tmp_path / "o"), "--base", str(other))
    assert "do not fit model.layers.1.self_attn.q_proj.weight [16, 32]" in err


def test_an_adapter_of_only_some_parts_of_a_fused_weight_is_refused(tmp_path, capsys):
    tensors = {k: v for k, v in mixtral_adapter().items() if ".w3." not in k}
    src = write_adapter(tmp_path / "a", tensors, peft_config(target_modules=["w1", "w2"]))
    err = _fails(capsys, "convert", "mixtral", str(src), str(tmp_path / "o"))
    assert "has no 'up_A' key" in err


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", "adapter_config.json"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps(peft_config(r=0)), "r must be a positive integer"),
        (json.dumps(peft_config(r="8")), "r must be a positive integer"),
        (json.dumps(peft_config(lora_alpha=float("inf"))), "lora_alpha must be a positive number"),
        (json.dumps(peft_config(rank_pattern=[1])), "rank_pattern must be an object"),
        (json.dumps(peft_config(rank_pattern={"w1": -2})), "rank_pattern: w1 must be a positive integer"),
        (json.dumps(peft_config(rank_pattern={"(.*.*)*y": 4})), "repeats a part that repeats itself"),
        (json.dumps(peft_config(alpha_pattern={"(w+)+x": 4})), "repeats a part that repeats itself"),
        (json.dumps(peft_config(peft_type="IA3")), "convspec converts LoRA adapters"),
        (json.dumps(peft_config(target_modules=7)), "target_modules must be a list of names"),
        (json.dumps(peft_config(fan_in_fan_out=True)), "fan_in_fan_out"),
        (json.dumps(peft_config(lora_bias=True)), "lora_bias"),
    ],
)
def test_a_bad_adapter_config_is_one_error(tmp_path, capsys, config, message):
    src = write_adapter(tmp_path / "a", mixtral_adapter(), config)
    err = _fails(capsys, "convert", "mixtral", str(src), str(tmp_path / "o"))
    assert message in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "o").exists()


def test_options_an_adapter_cannot_take_are_refused(pair, tmp_path, capsys):
    adapter, base = pair
    err = _fails(capsys, "convert", "mixtral", str(adapter), str(tmp_path / "o"), "--workers", "2")
    assert "cannot apply to an adapter" in err
    err = _fails(capsys, "convert", "mixtral", str(base), str(tmp_path / "o"), "--base", str(base))
    assert "--base names the base model of an adapter" in err
    err = _fails(capsys, "convert", "mixtral", str(base), str(tmp_path / "o"), "--adapter")
    assert "not a PEFT adapter" in err
    err = _fails(capsys, "convert", "mixtral", str(adapter), str(adapter / "inside"))
    assert "inside" in err
    assert not (tmp_path / "o").exists() and not (adapter / "inside").exists()


# ---- the CLI ------------------------------------------------------------------------------------


def test_cli_compile_explain_and_verify_an_adapter(pair, capsys):
    adapter, base = pair
    assert main(["compile", "mixtral", "--adapter"]) == 0
    assert "block_diag" in capsys.readouterr().out
    assert main(["compile", "mixtral", "--against", str(adapter)]) == 0
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight" in capsys.readouterr().out
    key = f"{P}model.layers.0.block_sparse_moe.experts.1.w3.lora_B.weight"
    assert main(["explain", "mixtral", key, "--against", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert f"B%3 = block_diag(B%1, B%2, dim=-2, equal=true)  [{E}, {2 * I}, {2 * R}] float32" in out
    assert main(["verify", "mixtral", str(adapter), "--base", str(base)]) == 0
    out = capsys.readouterr().out
    assert "the adapter comes back bit for bit" in out
    assert "6 weights: converting then merging equals merging then converting" in out


def test_cli_verify_reverse_on_the_converted_pair(pair, tmp_path, capsys):
    adapter, base = pair
    assert main(["convert", "mixtral", str(adapter), str(tmp_path / "fa")]) == 0
    assert main(["convert", "mixtral", str(base), str(tmp_path / "fb")]) == 0
    capsys.readouterr()
    argv = ["verify", "mixtral", str(tmp_path / "fa"), "--reverse", "--base", str(tmp_path / "fb"), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["merge"]["checked"] == 2 + 2 * E * 3 and not report["merge"]["mismatches"]


def test_an_adapter_is_written_atomically(pair, tmp_path, monkeypatch):
    """A conversion that fails while writing leaves no destination and no temporary behind."""
    adapter, _ = pair

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("convspec.adapters.converted_config", boom)
    with pytest.raises(ConvspecError, match="disk full"):
        convspec.convert("mixtral", adapter, tmp_path / "o")
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base"]

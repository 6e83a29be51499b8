"""Load an orca checkpoint into transformers' MixtralForCausalLM through examples/authoring/orca.yaml.

The last step of docs/authoring.md: the spec's output fills the model exactly (needs transformers).
Usage: python examples/authoring/load_mixtral.py CHECKPOINT_DIR [CONVERTED_DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import convspec

SPEC = Path(__file__).with_name("orca.yaml")


def mixtral_config(orca: dict):
    """The MixtralConfig with orca's sizes: the spec converts tensors, not config field names."""
    import transformers

    return transformers.MixtralConfig(
        vocab_size=orca["vocab_size"],
        hidden_size=orca["n_embd"],
        intermediate_size=orca["ffn_dim"],
        num_hidden_layers=orca["n_layer"],
        num_attention_heads=orca["n_head"],
        num_key_value_heads=orca["n_kv_head"],
        head_dim=orca["head_dim"],
        num_local_experts=orca["n_expert"],
        num_experts_per_tok=orca["n_expert_per_tok"],
        max_position_embeddings=orca["n_positions"],
        rms_norm_eps=orca["layer_norm_epsilon"],
        tie_word_embeddings=False,
    )


def load(src: Path):
    """Build the model on meta (no memory, no random init) and fill it from `src` through the spec;
    load_into computes the buffers no checkpoint holds (rotary inv_freq). Returns (model, report)."""
    import transformers

    config = mixtral_config(json.loads((src / "config.json").read_text()))
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(config)
    plan = convspec.compile(convspec.load_spec(str(SPEC)), config=src / "config.json")
    report = plan.load_into(model, src, strict=True)
    return model.eval(), report


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("converted", type=Path, nargs="?", help="the output of convspec convert, to compare")
    a = ap.parse_args()
    model, report = load(a.src)
    print(f"load_into {a.src}: {report}")
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = model(tokens).logits
    print(f"logits {list(logits.shape)} {logits.dtype}, finite: {bool(torch.isfinite(logits).all())}")
    if a.converted is None:
        return
    transformers.utils.logging.disable_progress_bar()
    ref = transformers.MixtralForCausalLM.from_pretrained(a.converted, config=model.config, dtype=model.dtype)
    ours, theirs = model.state_dict(), ref.state_dict()
    same = sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        same_logits = torch.equal(ref(tokens).logits, logits)
    print(
        f"from_pretrained {a.converted}: {len(theirs)} tensors {'equal' if same else 'DIFFERENT'}, "
        f"logits {'equal' if same_logits else 'DIFFERENT'}"
    )


if __name__ == "__main__":
    main()

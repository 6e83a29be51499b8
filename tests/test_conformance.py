"""Differential conformance against transformers (the oracle), one test per key of its conversion
mapping: the model on the meta device from its default config; convspec's plan must map
`revert_weight_conversion(model, sd)` to `model.state_dict()` exactly, and its inverse back.
docs/conformance.md is the same run as a table (python tools/conformance.py)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from convspec.hf.conformance import KNOWN, check  # noqa: E402
from convspec.hf.mapping import base_class_name, raw_mapping  # noqa: E402

KEYS = [k for k in raw_mapping() if k != "legacy"]
BASE_KEYS = [k for k in KEYS if base_class_name(k)]  # model types whose AutoModel class is another


def _conforms(key: str, base: bool) -> None:
    r = check(key, base=base)
    model = r.base or key
    if key in KNOWN:
        assert r.status != "pass", f"{model} now passes: remove {key} from KNOWN"
        pytest.xfail(KNOWN[key])
    if r.status == "no model":
        pytest.skip(f"transformers cannot build {model} on the meta device here: {r.forward}")
    if r.status == "transformers inconsistent":
        # transformers' own load of its reverted layout misses the model; convspec follows the load
        assert "convspec follows that load" in r.forward, r.forward
        assert not r.inverse, r.inverse
        return
    assert r.status == "pass", f"{model} ({r.spec}): {r.forward} | inverse: {r.inverse}"


@pytest.mark.parametrize("key", KEYS)
def test_transformers_conformance(key):
    _conforms(key, base=False)


@pytest.mark.parametrize("key", BASE_KEYS)
def test_transformers_conformance_of_the_base_model_class(key):
    """The same for the model type's base-model class (no base prefix in its keys), keys compared
    as load_into places them."""
    _conforms(key, base=True)


def test_the_conformance_table_lists_base_model_classes():
    """docs/conformance.md reports the base-model classes beside the head classes."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "conformance.md").read_text()
    assert "| status | head classes | base-model classes |" in text
    for key in ("llava", "molmo2", "ernie4_5_vl_moe", "inkling2"):
        assert f"| `{key}` | `{base_class_name(key)}` |" in text


def test_the_readme_states_the_numbers_of_the_conformance_table():
    """README's spec-library paragraph quotes docs/conformance.md's status table."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    rows = dict(
        (m[0], (int(m[1]), int(m[2])))
        for m in re.findall(
            r"^\| ([a-z ]+) \| (\d+) \| (\d+) \|$", (root / "docs" / "conformance.md").read_text(), re.M
        )
    )
    head = {k: v[0] for k, v in rows.items()}
    base = {k: v[1] for k, v in rows.items()}
    built = lambda n: sum(n.values()) - n["no model"]  # noqa: E731
    readme = " ".join((root / "README.md").read_text().split())
    claim = (
        f"{head['pass']} of the {built(head)} head classes transformers can build here pass, "
        f"and {base['pass']} of the {built(base)} base-model classes; for "
        f"{head['transformers inconsistent'] + base['transformers inconsistent']} transformers disagrees "
        f"with itself and convspec follows its load; {head['fail']} are explained differences"
    )
    assert claim.replace("for 1 transformers", "for one transformers") in readme
    assert head["error"] == base["error"] == 0
    assert base["fail"] <= head["fail"]  # a base-model class fails only where its head class does


def test_legacy_renames_like_transformers_on_load_and_not_on_save():
    """transformers applies its `legacy` renames on every load and never when saving: aliases."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import apply_renamings

    import convspec

    keys = [
        "bert.encoder.layer.0.output.LayerNorm.gamma",
        "bert.encoder.layer.0.output.LayerNorm.beta",
        "decoder.conv.weight_g",
        "decoder.conv.weight_v",
        "model.language_model.model.layers.0.mlp.up_proj.weight",
        "language_model.model.model.embed_tokens.weight",
        "lm_head.weight",
    ]
    legacy = get_checkpoint_conversion_mapping("legacy")
    plan = convspec.compile("legacy")
    bound = plan.bind({k: ((1,), "float32") for k in keys})
    assert bound.passthrough == {k: apply_renamings(k, legacy) for k in keys}
    assert plan.inverse().rules == ()  # nothing is written back under the old names


def test_specs_are_what_the_importer_writes():
    """specs/ is generated: a change to the importer (or to transformers) must be regenerated with
    `python tools/import_library.py`, not patched by hand in the generated files."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        [sys.executable, str(root / "tools" / "import_library.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=root,
    )
    stale = [line for line in res.stdout.splitlines() if line.startswith("out of date")]
    assert res.returncode == 0 and not stale, "\n".join(stale[:10]) or res.stderr[-2000:]

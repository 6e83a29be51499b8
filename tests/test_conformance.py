"""Differential conformance against transformers (the oracle), one test per key of its conversion
mapping: the model on the meta device from its default config; convspec's plan must map
`revert_weight_conversion(model, sd)` to `model.state_dict()` exactly, and its inverse back.
docs/conformance.md is the same run as a table (python tools/conformance.py)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from convspec.hf.conformance import KNOWN, check  # noqa: E402
from convspec.hf.mapping import raw_mapping  # noqa: E402

KEYS = [k for k in raw_mapping() if k != "legacy"]


@pytest.mark.parametrize("key", KEYS)
def test_transformers_conformance(key):
    r = check(key)
    if key in KNOWN:
        assert r.status != "pass", f"{key} now passes: remove it from KNOWN"
        pytest.xfail(KNOWN[key])
    if r.status == "no model":
        pytest.skip(f"transformers cannot build {key} on the meta device here: {r.forward}")
    if r.status == "transformers inconsistent":
        # transformers' own load of its reverted layout misses the model; convspec follows the load
        assert "convspec follows that load" in r.forward, r.forward
        assert not r.inverse, r.inverse
        return
    assert r.status == "pass", f"{r.spec}: {r.forward} | inverse: {r.inverse}"

"""Regenerate convspec/hf/tp_plans.json from transformers' config classes (needs transformers installed):
each model type's `base_model_tp_plan` and `base_model_ep_plan`, which `convspec.shardplan` maps to
DTensor placements without importing transformers.

python tools/tp_plans.py            # writes convspec/hf/tp_plans.json
python tools/tp_plans.py --check    # exit 1 if the file differs from what would be written
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "convspec" / "hf" / "tp_plans.json"


def build() -> dict:
    """{"transformers": version, "plans": {model_type: {"tp": {...}, "ep": {...}}}} for every model type
    whose config class declares a non-empty plan (a plan is {module or parameter pattern: style})."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    plans = {}
    for model_type in sorted(CONFIG_MAPPING.keys()):
        cls = CONFIG_MAPPING[model_type]
        entry = {}
        for axis in ("tp", "ep"):
            plan = getattr(cls, f"base_model_{axis}_plan", None)
            if isinstance(plan, dict) and plan:
                entry[axis] = {str(k): str(v) for k, v in plan.items()}
        if entry:
            plans[model_type] = entry
    return {"transformers": transformers.__version__, "plans": plans}


def render(data: dict) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = render(build())
    if args.check:
        same = OUT.is_file() and OUT.read_text() == text
        if not same:
            print(f"out of date: {OUT.relative_to(ROOT)} (run python tools/tp_plans.py)")
        return 0 if same else 1
    OUT.write_text(text)
    print(f"{len(json.loads(text)['plans'])} model types in {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

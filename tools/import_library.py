"""Regenerate specs/ from transformers' conversion mapping (needs transformers installed).

python tools/import_library.py            # writes specs/*.yaml (hand-written specs are kept)
python tools/import_library.py --check    # exit 1 if specs/ differs from what would be written
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    import transformers

    from convspec.hf.library import HEADER, KEEP, build, identity_spec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "specs"))
    args = ap.parse_args()
    from convspec import load_spec

    keep = {name: load_spec(name).model_types for name in KEEP}
    lib = build(version=transformers.__version__, keep=keep)
    for name in KEEP:
        for note in lib.notes.get(name, []):
            print(f"note: {note}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {f"{name}.yaml": text for name, text in lib.specs.items() if name not in KEEP}
    files["identity.yaml"] = identity_spec(lib, transformers.__version__)
    marker = HEADER.split("{")[0]
    stale = [p.name for p in out.glob("*.yaml") if p.name not in files and p.read_text().startswith(marker)]
    changed = [n for n, t in files.items() if not (out / n).is_file() or (out / n).read_text() != t]
    if args.check:
        for n in changed + stale:
            print(f"out of date: specs/{n}")
        return 1 if changed or stale else 0
    for n in stale:
        (out / n).unlink()
    for n in changed:
        (out / n).write_text(files[n])
    print(f"{len(files)} specs ({len(changed)} written, {len(stale)} removed) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

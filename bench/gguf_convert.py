"""Benchmark 9 (issue 18): a ~2 GB llama-layout model, Hugging Face -> GGUF (F16) and GGUF -> Hugging Face.

A LlamaForCausalLM checkpoint in float16 (hidden 2048, 20 layers, GQA 32/4 heads, vocabulary 32000:
about 1.0 B parameters, 2.1 GB) is made here. Each job runs in a fresh process, timed inside it
(imports excluded) with its peak RSS from the kernel; the median of `--repeat` runs is shown:

- `cp` of the safetensors file and of the GGUF file (the bytes alone, read and written),
- convspec `convert llama HF out.gguf --gguf-type f16`: names, q/k rows permuted to llama.cpp's order,
  norms written F32 (1-D tensors stay F32, as llama.cpp keeps them),
- convspec `convert llama model.gguf OUT/`: the way back to a Hugging Face folder,
- transformers 5.23 `from_pretrained(dir, gguf_file=..., dtype=float16)`, the peer, which loads
  the same GGUF into a model (checked equal to convspec's output tensor for tensor before timing),
  and the same followed by writing its state dict with `safetensors.torch.save_file` (what `convert`
  does: a file on disk; transformers' own `save_pretrained` refuses a model loaded from GGUF).

    python bench/gguf_convert.py [--dir DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fresh import run_job

ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=5632,
    num_hidden_layers=20, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    torch_dtype="float16",
)  # fmt: skip
MODES = ("cp_hf", "to_gguf", "cp_gguf", "to_hf", "transformers", "transformers_save")
LABELS = {
    "cp_hf": "cp model.safetensors",
    "to_gguf": "convspec HF -> GGUF (f16)",
    "cp_gguf": "cp model.gguf",
    "to_hf": "convspec GGUF -> HF",
    "transformers": "transformers GGUF load",
    "transformers_save": "transformers load + save_file",
}


def make(d: Path) -> None:
    """The Hugging Face folder: config.json and one float16 model.safetensors of seeded values."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from convspec.io.writer import write_file

    (d / "hf").mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) * 0.02).to(torch.float16) for k, s in shapes.items()}
    for k in sd:
        if k.endswith("norm.weight"):
            sd[k] += 1
    write_file(d / "hf" / "model.safetensors", sd)
    (d / "hf" / "config.json").write_text(json.dumps(CONFIG, indent=2))


def job(mode: str, d: Path) -> dict:
    """One timed job; its output is removed afterwards by the parent."""
    if mode in ("cp_hf", "cp_gguf"):
        src = d / "hf" / "model.safetensors" if mode == "cp_hf" else d / "model.gguf"
        subprocess.run(["cp", str(src), str(d / "copy")], check=True)
        return {"bytes": src.stat().st_size}
    if mode.startswith("transformers"):
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(d, gguf_file="model.gguf", dtype=torch.float16)
        if mode == "transformers_save":  # save_pretrained refuses a GGUF-loaded model: its state dict
            from safetensors.torch import save_file

            (d / "t-out").mkdir()
            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()}, d / "t-out" / "model.safetensors"
            )
        return {"tensors": len(model.state_dict())}
    import convspec

    if mode == "to_gguf":
        r = convspec.convert("llama", d / "hf", d / "out.gguf", gguf_type="f16")
    else:
        r = convspec.convert("llama", d / "model.gguf", d / "hf-out")
    return {"tensors": r.tensors, "bytes": r.bytes}


def one(mode: str, d: Path) -> None:
    """Run in a child: the job once, the seconds it took."""
    import torch  # noqa: F401 - imported before the clock starts, as in every mode

    if mode.startswith("transformers"):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    else:
        import convspec  # noqa: F401
    t = time.perf_counter()
    got = job(mode, d)
    print(json.dumps({"s": time.perf_counter() - t, **got}))


def compare(d: Path) -> None:
    """Run in a child: convspec's GGUF -> HF output against transformers' GGUF load, bit for bit."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import convspec

    out = d / "hf-check"
    shutil.rmtree(out, ignore_errors=True)
    convspec.convert("llama", d / "model.gguf", out, dtype="float16")
    ours = {}
    for f in out.glob("*.safetensors"):
        ours.update(load_file(f))
    theirs = AutoModelForCausalLM.from_pretrained(d, gguf_file="model.gguf", dtype=torch.float16).state_dict()
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))[:5]
    bad = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not bad, bad[:5]
    shutil.rmtree(out)
    print(f"{len(ours)} tensors, bit for bit")


def run(mode: str, d: Path) -> tuple[float, float, dict]:
    """(seconds, peak RSS in GiB, what it printed) of one job in a fresh process; its output removed."""
    env = {**os.environ, "TQDM_DISABLE": "1"}  # transformers' GGUF loader draws a bar per load
    result = run_job(__file__, ["--one", mode, "--dir", str(d)], env)
    for name in ("copy", "out.gguf", "hf-out", "t-out"):
        path = d / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/convspec-bench-gguf"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.one:
        one(args.one, args.dir)
        return 0
    if args.compare:
        compare(args.dir)
        return 0
    d = args.dir
    if not (d / "hf" / "config.json").exists():
        make(d)
    if not (d / "model.gguf").exists():  # the GGUF every GGUF -> HF job reads: convspec's own F16 file
        subprocess.run([sys.executable, "-m", "convspec.cli", "convert", "llama", str(d / "hf"), str(d / "model.gguf"),
                        "--gguf-type", "f16", "--quiet"], check=True, cwd=ROOT)  # fmt: skip
    size = (d / "hf" / "model.safetensors").stat().st_size
    print(
        f"model: {size / 1e9:.2f} GB safetensors, {(d / 'model.gguf').stat().st_size / 1e9:.2f} GB GGUF at {d}"
    )
    checked = subprocess.run(
        [sys.executable, __file__, "--compare", "--dir", str(d)], capture_output=True, text=True, check=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )  # fmt: skip
    print(f"convspec GGUF -> HF == transformers' GGUF load: {checked.stdout.strip().splitlines()[-1]}")
    rows: dict[str, list] = {}
    for _ in range(args.repeat):
        for mode in MODES:  # interleaved: a slow moment of the machine falls on every mode alike
            rows.setdefault(mode, []).append(run(mode, d))
    med = {
        m: (statistics.median(r[0] for r in rows[m]), statistics.median(r[1] for r in rows[m])) for m in MODES
    }
    peer_s, peer_rss = med["transformers"]
    print(f"{'job':<30}{'seconds':>9}{'peak RSS GiB':>14}{'time / transformers':>21}{'time / cp':>11}")
    for mode in MODES:
        s, rss = med[mode]
        cp = med["cp_gguf" if mode in ("to_gguf", "cp_gguf") else "cp_hf"][0]
        print(f"{LABELS[mode]:<30}{s:>9.2f}{rss:>14.2f}{s / peer_s:>21.2f}{s / cp:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark 9b (issue 18): reading a GGUF header with a real-size vocabulary.

A GGUF file's header holds the tokenizer: 150,000 tokens, their scores and types, and 150,000 merges
(Qwen2's vocabulary is 151,646), beside one small tensor. It is written by gguf-py, then read by
convspec's `read_header` (what `convert` and `compile --against` read before any data) and by
gguf-py's `GGUFReader` (what transformers' GGUF loader reads), each `--repeat` times in this process;
medians shown.

    python bench/gguf_header.py [--repeat 5] [--tokens 150000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make(path: Path, tokens: int) -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list([f"tok{i}".encode() for i in range(tokens)])
    w.add_token_scores([0.0] * tokens)
    w.add_token_types([1] * tokens)
    w.add_token_merges([f"a{i} b{i}" for i in range(tokens)])
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=150_000)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import gguf

    from convspec.io.gguf import read_header

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "vocab.gguf"
        make(path, args.tokens)
        ours = read_header(path)
        theirs = gguf.GGUFReader(str(path))
        assert ours.value("tokenizer.ggml.merges") == theirs.fields["tokenizer.ggml.merges"].contents()
        times: dict[str, list[float]] = {"convspec read_header": [], "gguf-py GGUFReader": []}
        for _ in range(args.repeat):
            for name, read in (
                ("convspec read_header", read_header),
                ("gguf-py GGUFReader", gguf.GGUFReader),
            ):
                t = time.perf_counter()
                read(str(path))
                times[name].append(time.perf_counter() - t)
        size = path.stat().st_size
    print(
        f"header of {size / 1e6:.1f} MB: {args.tokens:,} tokens, scores, types and merges (the same values read)"
    )
    peer = statistics.median(times["gguf-py GGUFReader"])
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"{name:<24}{s * 1000:>9.0f} ms{s / peer:>8.2f}x gguf-py")
    return 0


if __name__ == "__main__":
    sys.exit(main())

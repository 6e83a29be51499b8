"""CUDA: every op and a built-in plan run on the GPU and agree bit for bit with the CPU. Skipped without one."""

from __future__ import annotations

import pytest
import torch

import convspec
from convspec.ops import OPS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

PARAMS = {
    "stack": ({"over": "e", "dim": 0}, [(3, 4)] * 3),
    "unstack": ({"over": "e", "dim": 0}, [(3, 4, 2)]),
    "cat": ({"dim": 1, "sizes": None, "equal": False}, [(2, 3), (2, 5)]),
    "split": ({"dim": 0, "sizes": [2, 4]}, [(6, 3)]),
    "chunk": ({"n": 2, "dim": 0}, [(6, 3)]),
    "transpose": ({"dim0": 0, "dim1": 1}, [(3, 5)]),
    "permute": ({"dims": [2, 0, 1]}, [(2, 3, 4)]),
    "reshape": ({"shape": [-1], "from_shape": None}, [(3, 4)]),
    "permute_rope": ({"heads": 2}, [(8, 3)]),
    "unpermute_rope": ({"heads": 2}, [(8, 3)]),
    "interleave": ({"dim": 0, "parts": 2}, [(8, 3)]),
    "deinterleave": ({"dim": 0, "parts": 2}, [(8, 3)]),
    "cast": ({"dtype": "float32", "from": "bfloat16"}, [(4, 4)]),
    "dequant_fp8": ({"dtype": "bfloat16"}, [(8, 16), (2, 2)]),
    "dequant_fp8_tensor": ({"dtype": "bfloat16"}, [(8, 16), (8, 1)]),
    "dequant_mxfp4": ({"dtype": "bfloat16"}, [(2, 3, 4, 16), (2, 3, 4)]),
    "add": ({"value": 1}, [(4, 4)]),
    "log_neg": ({}, [(4, 4)]),
    "neg_exp": ({}, [(4, 4)]),
    "unsqueeze": ({"dim": 1}, [(4, 4)]),
    "squeeze": ({"dim": 1}, [(4, 1, 3)]),
    "regroup_heads": ({"groups": 2, "size": 3, "rows": 2, "dim": 0, "offset": 1}, [(13, 3)]),
    "dequant_ggml": ({"type": 8}, [(4, 68)]),  # q8_0, bytes of quantize_ggml (finite scales)
    "quantize_ggml": ({"type": 8}, [(4, 64)]),
    "block_diag": ({"dim": -2, "sizes": [2, 3], "equal": False}, [(2, 4), (3, 4)]),
    "unblock_diag": ({"n": 2, "dim": -1, "sizes": [3, 1]}, [(2, 8, 4)]),  # block_diag of two parts
    "share": ({"n": 3}, [(4, 2)]),
    "same": ({}, [(4, 2)] * 3),  # copies of the first
    "flatten": ({"dim": 0, "sizes": [2, -1]}, [(2, 3, 4)]),
    "unflatten": ({"dim": 1, "sizes": [-1, 2]}, [(3, 4)]),
}
REFUSING = {"no_low_rank"}  # refuses any input, on any device: tests/test_lowrank_ops.py
# the input dtypes of ops that take other than bfloat16 values: FP8 weights, packed bytes (uint8)
INPUT_DTYPES = {
    "dequant_fp8": ("float8_e4m3fn", "float32"),
    "dequant_fp8_tensor": ("float8_e4m3fn", "bfloat16"),
    "dequant_mxfp4": ("uint8", "uint8"),
    "dequant_ggml": ("uint8",),
}


def _input(shape, dtype: str) -> torch.Tensor:
    if dtype == "uint8":
        return torch.randint(0, 256, shape, dtype=torch.uint8)
    return torch.randn(*shape).to(getattr(torch, dtype))


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_on_cuda_matches_cpu(name):
    if name in REFUSING:
        with pytest.raises(convspec.ConvspecError, match="cannot be converted"):
            OPS[name].apply({"op": "cast"}, [torch.ones(2, 2, device="cuda")])
        return
    params, shapes = PARAMS[name]
    dtypes = INPUT_DTYPES.get(name, ("bfloat16",) * len(shapes))
    # fixed inputs: log_neg and neg_exp compute exp/log in float32, where CUDA's and the CPU's may
    # differ in a last bit that the cast to bfloat16 nearly always (not provably) rounds away
    torch.manual_seed(0)
    ins = [_input(s, d) for s, d in zip(shapes, dtypes, strict=True)]
    if name == "log_neg":  # log(-x) of negative values: no NaN, which torch.equal never matches
        ins = [-t.abs() - 1 for t in ins]
    if name == "dequant_ggml":
        ins = OPS["quantize_ggml"].apply(params, [torch.randn(4, 64)])
    if name == "unblock_diag":  # a block-diagonal input, which it takes apart
        ins = OPS["block_diag"].apply(
            {"dim": -1}, [t.bfloat16() for t in (torch.randn(2, 4, 3), torch.randn(2, 4, 1))]
        )
    if name == "same":
        ins = [ins[0].clone() for _ in ins]
    cpu = OPS[name].apply(params, ins)
    gpu = OPS[name].apply(params, [t.cuda() for t in ins])
    assert all(g.device.type == "cuda" for g in gpu)
    assert all(torch.equal(c, g.cpu()) for c, g in zip(cpu, gpu, strict=True))


def test_mixtral_plan_round_trips_on_cuda():
    plan = convspec.compile("mixtral")
    sd = {
        f"m.block_sparse_moe.experts.{e}.w{w}.weight": torch.randn(6, 4, device="cuda")
        for e in range(3)
        for w in (1, 2, 3)
    }
    out = plan.apply(sd)
    assert out["m.mlp.experts.gate_up_proj"].device.type == "cuda"
    back = plan.inverse().apply(out)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_load_to_cuda_equals_cpu(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from make_tiny_mixtral import make

    make(tmp_path / "ckpt")
    plan = convspec.compile("mixtral")
    cpu = plan.load(tmp_path / "ckpt")
    gpu = plan.load(tmp_path / "ckpt", device="cuda")
    assert all(t.device.type == "cuda" for t in gpu.values())
    assert all(torch.equal(cpu[k], gpu[k].cpu()) for k in cpu)

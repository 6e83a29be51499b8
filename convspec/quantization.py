"""Quantized checkpoints: the schemes convspec knows (what a companion is, what its grid means, the op
that dequantizes), and a plan's resolved scheme (`Quant`). One home for what a companion is; the
compiler derives companion ops from it and bind checks companions against it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .spec.model import Companion, Quantization

DEFAULT_BLOCK = (128, 128)  # DeepSeek-V3's and Qwen3's weight_block_size


@dataclass(frozen=True)
class Scheme:
    """A kind of quantized storage: its weights' and scales' dtypes, its companions by template over
    `{w}` (the first of each weight's is its scale), and the op that dequantizes a weight."""

    name: str
    quant_method: str  # the config's quantization_config.quant_method that selects it
    weight_dtypes: tuple[str, ...]
    scale_dtypes: tuple[str, ...]
    companions: tuple[tuple[str, tuple[str, ...]], ...]
    dequant: str  # the op: weight, scale -> floats
    grid: str  # "blocks": one scale per block of the last two dims; "mx": one per 32 values; "channel"
    doc: str = ""
    in_convert: tuple[tuple[str, str], ...] = ()  # the dequantizing op's params inside a convert
    dequantized: str = "{w}"  # the key a dequantized weight is written as


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme(
            "fp8_blocks",
            "fp8",
            ("float8_e4m3fn",),
            ("float32", "bfloat16", "float8_e8m0fnu", "uint8"),
            (("{w}", ("{w}_scale_inv",)),),
            "dequant_fp8",
            "blocks",
            "FP8 e4m3 weights with one `weight_scale_inv` per block (DeepSeek-V3, Qwen3 FP8)",
        ),
        Scheme(
            "mxfp4",
            "mxfp4",
            ("uint8",),
            ("uint8",),
            (("{w}_blocks", ("{w}_scales",)),),
            "dequant_mxfp4",
            "mx",
            "MXFP4 experts: packed FP4 `_blocks` with E8M0 `_scales` (gpt-oss)",
        ),
        Scheme(
            "fp8_tensor",
            "compressed-tensors",
            ("float8_e4m3fn",),
            ("float32", "bfloat16", "float16"),
            (("{w}.weight", ("{w}.weight_scale", "{w}.input_scale")),),
            "dequant_fp8_tensor",
            "channel",
            "compressed-tensors FP8: a per-tensor or per-channel `weight_scale`, an `input_scale`",
            # transformers dequantizes the experts a convert fuses in float32, a linear in the scale's dtype
            (("compute", "float32"),),
            "{w}.weight",
        ),
    )
}


@dataclass(frozen=True)
class Form:
    """One weight template and its companions' as suffixes: `{w}_blocks` -> `_blocks`, (`_scales`,)."""

    weight: str
    companions: tuple[str, ...]

    def stem(self, key: str) -> str | None:
        """The `{w}` of a weight key of this form, or None when the key is not one."""
        return key[: len(key) - len(self.weight)] if key.endswith(self.weight) else None


@dataclass(frozen=True)
class Quant:
    """A plan's quantization, resolved: the scheme, its forms, the block (fp8_blocks) and, when the
    plan dequantizes, the dtype it dequantizes to."""

    scheme: str
    forms: tuple[Form, ...]
    block: tuple[int, int] | None = None
    dequantize: str | None = None

    @property
    def kind(self) -> Scheme:
        return SCHEMES[self.scheme]

    def form_of(self, text: str) -> Form | None:
        """The first form whose weight template ends `text` (a key, or a template's text)."""
        return next((f for f in self.forms if text.endswith(f.weight)), None)

    def scale_of(self, text: str) -> str | None:
        """The scale companion's text of a weight's text, or None when it is not a weight."""
        form = self.form_of(text)
        return None if form is None else form.stem(text) + form.companions[0]

    def scale_of_target(self, text: str) -> str:
        """The scale's name beside a converted weight named `text`: as `scale_of` where the name has
        the weight's form, else the name with the scale's suffix appended (`.weight_scale` as
        `_weight_scale`: a fused `gate_up_proj` has `gate_up_proj_weight_scale`)."""
        scale = self.scale_of(text)
        return scale if scale is not None else text + self.forms[0].companions[0].replace(".", "_")

    def is_companion(self, text: str) -> bool:
        """Whether `text` (a key or a template's text) names a companion, not a weight."""
        return any(c and text.endswith(c) for f in self.forms for c in f.companions)

    @property
    def rank(self) -> int:
        """The dims of a quantized weight as a checkpoint stores it, one per tensor."""
        return 3 if self.kind.grid == "mx" else 2

    @property
    def blocks(self) -> tuple[int, ...]:
        """The block along each of the weight's dims (1: each index has its own scale)."""
        return self.block if self.block is not None else (1,) * self.rank

    def dequant_params(self, in_convert: bool = False) -> dict:
        """The dequantizing op's parameters: the dtype, the block where the op takes one, and the
        scheme's own inside a convert."""
        from .ops import OPS

        params = {"dtype": self.dequantize, **(dict(self.kind.in_convert) if in_convert else {})}
        if self.block is not None and any(p.name == "block" for p in OPS[self.kind.dequant].params):
            params["block"] = list(self.block)
        return params

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme,
            "companions": {f.weight: list(f.companions) for f in self.forms},
            "block": list(self.block) if self.block else None,
            "dequantize": self.dequantize,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Quant:
        forms = tuple(Form(w, tuple(cs)) for w, cs in d["companions"].items())
        block = tuple(d["block"]) if d.get("block") else None
        return cls(d["scheme"], forms, block, d.get("dequantize"))


def suffix(template: str) -> str:
    """`{w}_scale_inv` -> `_scale_inv`: the front ends allow `{w}` only at the start."""
    return template.removeprefix("{w}")


def from_config(config: Any) -> Quantization | None:
    """The scheme a config's `quantization_config.quant_method` names, with its own companions."""
    qc = config.get("quantization_config") if hasattr(config, "get") else None
    method = qc.get("quant_method") if hasattr(qc, "get") else None
    for s in SCHEMES.values():
        if method == s.quant_method:
            return Quantization(scheme=s.name)
    return None


def resolve_quant(q: Quantization | None, config: Any) -> Quant | None:
    """The plan's Quant: the section's companions (or the scheme's), its block evaluated with the
    config (default: the config's weight_block_size, else 128 x 128)."""
    if q is None:
        return None
    scheme = SCHEMES[q.scheme]
    pairs = [(c.weight, tuple(c.companions)) for c in q.companions] or list(scheme.companions)
    forms = tuple(Form(suffix(w), tuple(suffix(c) for c in cs)) for w, cs in pairs)
    block = _block(q, config) if scheme.grid == "blocks" else None
    return Quant(scheme.name, forms, block)


def _block(q: Quantization, config: Any) -> tuple[int, int]:
    from .compile.evaluate import evaluate
    from .compile.expr import from_spec

    if q.block is None:
        qc = config.get("quantization_config") if config is not None else None
        raw = qc.get("weight_block_size") if hasattr(qc, "get") else None
        if raw is None:
            return DEFAULT_BLOCK
        where = "quantization_config.weight_block_size"
    else:
        raw, where = evaluate(from_spec(q.block), config, "quantization block"), "the quantization block"
    if (
        not isinstance(raw, (list, tuple))
        or len(raw) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 1 << 20 for b in raw)
    ):
        raise ConfigError(
            f"{where} must be two block sizes [rows, cols] between 1 and {1 << 20}, got {raw!r:.80}",
            hint="DeepSeek-V3 and Qwen3 FP8 use [128, 128]",
        )
    return int(raw[0]), int(raw[1])


__all__ = ["SCHEMES", "Companion", "Form", "Quant", "Scheme", "from_config", "resolve_quant"]

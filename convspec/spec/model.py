"""The Spec IR: pydantic models both front ends produce. Spans are metadata, excluded from dumps."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import Span

CaptureType = Literal["path", "path?", "int", "seg"]


class IRNode(BaseModel):
    """Base of every IR node: immutable, strict about fields, with an optional source span."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)
    span: Annotated[Span | None, Field(default=None, exclude=True, repr=False)] = None


# ---- key templates ---------------------------------------------------------------------------


class Lit(IRNode):
    kind: Literal["lit"] = "lit"
    text: str


class Cap(IRNode):
    """A named capture: `{p:path}`, `{e:int}`, `{name}` (one segment fragment)."""

    kind: Literal["cap"] = "cap"
    name: str
    type: CaptureType | None = None  # None in a target: the type comes from where it is bound
    offset: int = 0  # `{i+1}` in a rename target: the int capture plus a constant


TemplatePart = Annotated[Lit | Cap, Field(discriminator="kind")]


class Template(IRNode):
    """A whole-key template such as `{p:path}.experts.{e:int}.w1.weight`."""

    text: str
    parts: list[TemplatePart]

    def captures(self) -> list[Cap]:
        return [p for p in self.parts if isinstance(p, Cap)]


# ---- op expressions --------------------------------------------------------------------------


class Num(IRNode):
    kind: Literal["num"] = "num"
    value: int | float


class Str(IRNode):
    kind: Literal["str"] = "str"
    value: str


class Ref(IRNode):
    """A name: an input, a `let` value, a capture, a dtype, `true`/`false`, or `config.a.b`."""

    kind: Literal["ref"] = "ref"
    path: list[str]

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


class ListExpr(IRNode):
    kind: Literal["list"] = "list"
    items: list[Expr]


class BinOp(IRNode):
    """Integer arithmetic, and `a ?? b`: `a` unless it is absent from the config (or null)."""

    kind: Literal["binop"] = "binop"
    op: Literal["+", "-", "*", "//", "%", "??"]
    left: Expr
    right: Expr


class Neg(IRNode):
    kind: Literal["neg"] = "neg"
    operand: Expr


class KwArg(IRNode):
    name: str
    value: Expr


class Call(IRNode):
    """An op applied to tensors and parameters: `cat(a, b, dim=1)`."""

    kind: Literal["call"] = "call"
    op: str
    args: list[Expr] = []
    kwargs: list[KwArg] = []


Expr = Annotated[Num | Str | Ref | ListExpr | BinOp | Neg | Call, Field(discriminator="kind")]


# ---- rules -----------------------------------------------------------------------------------


class Rename(IRNode):
    """One key to one key, no data change. `unless` lists keys the rule leaves alone; a one-way
    rename (`alias`) is applied on load only: the inverse writes the canonical (target) name."""

    kind: Literal["rename"] = "rename"
    source: Template
    target: Template
    unless: list[Template] = []
    one_way: bool = False


class Drop(IRNode):
    """Keys the target layout does not keep (lossy: the inverse cannot recreate them)."""

    kind: Literal["drop"] = "drop"
    source: Template


class Binding(IRNode):
    name: str
    template: Template


class Let(IRNode):
    """Names for intermediate values: `let q, k, v = split(qkv, ...)`."""

    names: list[str]
    expr: Expr


class Output(IRNode):
    """Target keys computed by one expression (several when the op has several outputs), or by a
    chain of ops applied to the convert's inputs in order (`ops: [stack(e), cat(dim=1)]`)."""

    targets: list[Template]
    expr: Expr | None = None
    chain: list[Call] | None = None


class Convert(IRNode):
    """Named inputs -> outputs, each output an op expression over inputs: an op DAG."""

    kind: Literal["convert"] = "convert"
    inputs: list[Binding]
    lets: list[Let] = []
    outputs: list[Output]


class Include(IRNode):
    """Another spec's rules, applied to the keys under each prefix (a sub-model inside a larger
    model, e.g. a text model under `model.language_model`); no prefix applies them to every key."""

    kind: Literal["include"] = "include"
    spec: str
    under: list[str] = []
    only: Literal["all", "renames", "converts"] = "all"  # transformers renames everything first


Rule = Annotated[Rename | Drop | Convert | Include, Field(discriminator="kind")]


class Companion(IRNode):
    """Tensors stored beside a quantized weight, by template over one capture `{w}`: `{w}` has
    `{w}_scale_inv`; `{w}_blocks` has `{w}_scales`. The first companion is the weight's scale (it
    follows every op on the weight); any others are per-tensor (an activation's `input_scale`)."""

    weight: str  # "{w}", "{w}_blocks", "{w}.weight"
    companions: list[str]  # ["{w}_scale_inv"], ["{w}.weight_scale", "{w}.input_scale"]


class Quantization(IRNode):
    """How a spec's quantized weights are stored: the scheme (what a scale means, the op that
    dequantizes), its companions (none given: the scheme's own) and, for blocks, the block shape."""

    scheme: Literal["fp8_blocks", "mxfp4", "fp8_tensor"]
    companions: list[Companion] = []
    block: Expr | None = None  # fp8_blocks: [rows, cols]; none given: the config's weight_block_size


class Spec(IRNode):
    """A whole spec: a name, a one-line doc, the model types it serves, and ordered rules."""

    name: str
    doc: str = ""
    model_types: list[str] = []
    base_prefix: str = ""  # the base model's prefix in full-model keys (transformers' base_model_prefix)
    rules: list[Rule] = []
    quantization: Quantization | None = None  # quantized checkpoints: companions follow their weights
    file: Annotated[str | None, Field(default=None, exclude=True)] = None


for _model in (ListExpr, BinOp, Neg, KwArg, Call, Let, Output, Quantization):
    _model.model_rebuild()

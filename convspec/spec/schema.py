"""The JSON Schema of the YAML spec form, so editors check specs as they are typed (`convspec schema`).
Models of the surface yaml_front.py accepts, key by key (not the IR); a first check, the parser decides."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from .lexicon import DOTTED_PREFIX

DRAFT = "https://json-schema.org/draft/2020-12/schema"

# A Python identifier (str.isidentifier), widened to any non-ASCII letter so that the schema never
# refuses a name the parser takes; the pattern syntax is shared by ECMA-262, Python `re` and Rust.
_ID = r"(?:[A-Za-z_]|[^\x00-\x7F])(?:[A-Za-z0-9_]|[^\x00-\x7F])*"
# grammar.lark `capture`: {name}, {name:path|path?|int|seg}, {i+1}; parse.py refuses other types.
_CAPTURE = r"\{[A-Za-z_][A-Za-z0-9_]*(?::(?:path\??|int|seg))?(?:[+-][0-9]+)?\}"
TEMPLATE_PATTERN = rf"^(?:[^{{}}\s]|{_CAPTURE})+$"
# A `to:` mapping key: one or more templates separated by commas (yaml_front splits, then strips).
_PIECE = rf"(?:[^{{}},\s]|{_CAPTURE})+"
TARGETS_PATTERN = rf"^\s*{_PIECE}(?:\s*,\s*{_PIECE})*\s*$"
NAME_PATTERN = rf"^{_ID}$"
NAMES_PATTERN = rf"^\s*{_ID}(?:\s*,\s*{_ID})*\s*$"
PREFIX_PATTERN = rf"^(?:{DOTTED_PREFIX})?$"
EXPR_PATTERN = r"\S"  # the parser refuses an empty or blank expression
CALL_PATTERN = r"\([\s\S]*\)"  # an op call has its parentheses; catches a call YAML split at a comma

Template = Annotated[str, StringConstraints(pattern=TEMPLATE_PATTERN)]
Targets = Annotated[str, StringConstraints(pattern=TARGETS_PATTERN)]
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Names = Annotated[str, StringConstraints(pattern=NAMES_PATTERN)]
Prefix = Annotated[str, StringConstraints(pattern=PREFIX_PATTERN)]
Expr = Annotated[str, StringConstraints(pattern=EXPR_PATTERN)]
Call = Annotated[str, StringConstraints(pattern=CALL_PATTERN)]

_TEMPLATE_HELP = (
    "A key template: literal key text plus captures {name}, {name:path}, {name:path?}, {name:int}, "
    "{name:seg}; no whitespace. Quote it in YAML: a leading { would start a mapping."
)
_UNLESS_HELP = (
    'Keys this rule leaves alone: a template or a list of templates, e.g. ["model.visual.{_r:path?}"].'
)


class _Surface(BaseModel):
    """Base of the surface models: unknown keys are errors, as in the YAML front end."""

    model_config = ConfigDict(extra="forbid")


class RenameRule(_Surface):
    """`rename:` + `to:`; a model per rule kind, so each kind forbids the others' keys."""

    model_config = ConfigDict(
        title="rename rule",
        json_schema_extra={"description": "Moves one key to another without touching the data."},
    )
    rename: Template = Field(
        description="The source template: the keys this rule renames. " + _TEMPLATE_HELP,
    )
    to: Template = Field(
        description="The target template. Captures are written bare ({p}), and {i+1} / {i-1} shift an "
        "int capture. Every capture of the source must appear here.",
    )
    unless: Template | list[Template] | None = Field(None, description=_UNLESS_HELP)


class AliasRule(_Surface):
    """`alias:` + `to:`: its own kind (not a flag) because that is how the YAML spells it."""

    model_config = ConfigDict(
        title="alias rule",
        json_schema_extra={
            "description": "A rename applied on load only: the inverse writes the target (canonical) name."
        },
    )
    alias: Template = Field(
        description="The old key template that loads under the target name. " + _TEMPLATE_HELP,
    )
    to: Template = Field(description="The canonical key template; captures are written bare ({p}).")
    unless: Template | list[Template] | None = Field(None, description=_UNLESS_HELP)


class DropRule(_Surface):
    """`drop:` alone: any other key in a drop rule is a mistake."""

    model_config = ConfigDict(
        title="drop rule",
        json_schema_extra={
            "description": "Removes the matching keys (lossy: the inverse cannot recreate them)."
        },
    )
    drop: Template = Field(description="The keys to drop. " + _TEMPLATE_HELP)


class IncludeRule(_Surface):
    """`include:` with optional `under:` and `only:`."""

    model_config = ConfigDict(
        title="include rule",
        json_schema_extra={"description": "Applies another spec's rules to the keys under a prefix."},
    )
    include: str = Field(description="The spec to include: a built-in spec name such as qwen2_moe.")
    under: Prefix | list[Prefix] | None = Field(
        None,
        description='A dotted key prefix such as model.language_model, or a list of them; "" for every '
        "key. Without it the rules apply to every key.",
    )
    only: Literal["renames", "converts", "all"] = Field(
        "all",
        description="Which rules to take: renames (renames and aliases), converts, or all (the default).",
    )


class ConvertRule(_Surface):
    """`convert:`, `let:`, `to:`, `ops:`; the shape `to:` must have depends on `ops:` (if/then/else)."""

    model_config = ConfigDict(
        title="convert rule",
        json_schema_extra={
            "description": "Named input tensors -> target tensors computed by op expressions "
            "(docs/ops.md lists the ops).",
            "if": {"required": ["ops"]},
            # yaml_front.py: with ops, `to` names the targets; without, it maps targets to expressions.
            "then": {"properties": {"to": {"type": ["string", "array"]}}},
            "else": {"properties": {"to": {"type": "object"}}},
        },
    )
    convert: dict[Name, Template] = Field(
        description="The inputs: a mapping of names to key templates, "
        'e.g. gate: "{p:path}.experts.{e:int}.w1.weight".',
    )
    let: dict[Names, Expr] | None = Field(
        None,
        description='Intermediate values: names (comma-separated for several, "q, k, v") mapped to '
        "expressions, e.g. split(qkv, dim=0, sizes=[4096, 1024, 1024]).",
    )
    to: dict[Targets, Expr] | Template | list[Template] = Field(
        description="The outputs. Without ops: a mapping of target templates (comma-separated when an op "
        "yields several) to expressions. With ops: one target template, or a list of them.",
    )
    ops: list[Call] | None = Field(
        None,
        description="An op chain applied to the inputs in order, e.g. [stack(e)]; then `to` names the "
        'targets. Quote calls with several arguments inside [...]: ["cat(dim=1, equal=true)"].',
    )


Rule = RenameRule | AliasRule | DropRule | IncludeRule | ConvertRule

# quant.py: `{w}` first, then literal key text (no other capture, no type, no offset).
QUANT_TEMPLATE_PATTERN = r"^\{w\}[^{}\s]*$"
QuantTemplate = Annotated[str, StringConstraints(pattern=QUANT_TEMPLATE_PATTERN)]
BlockSize = Annotated[int, Field(ge=1)]


class QuantizationSection(_Surface):
    """`quantization:`: a scheme, an optional block shape (fp8_blocks only) and companions by template."""

    model_config = ConfigDict(
        title="quantization",
        json_schema_extra={
            "description": "How the checkpoint's quantized weights are stored: the scheme, the block "
            "shape, and the tensors stored beside each weight (its companions).",
            # quant.py: a block shape belongs to fp8_blocks alone.
            "if": {"required": ["block"]},
            "then": {"properties": {"scheme": {"const": "fp8_blocks"}}},
        },
    )
    scheme: Literal["fp8_blocks", "mxfp4", "fp8_tensor"] = Field(
        description="fp8_blocks: FP8 weights with a scale per block (DeepSeek-V3's weight_scale_inv); "
        "mxfp4: packed 4-bit blocks with their scales (gpt-oss); fp8_tensor: FP8 weights with "
        "per-tensor scales (compressed-tensors' weight_scale, input_scale).",
    )
    block: Expr | Annotated[list[BlockSize], Field(min_length=2, max_length=2)] | None = Field(
        None,
        description="fp8_blocks only: the block shape [rows, cols], as a list of numbers or an "
        "expression, e.g. config.quantization_config.weight_block_size ?? [128, 128].",
    )
    companions: (
        dict[QuantTemplate, QuantTemplate | Annotated[list[QuantTemplate], Field(min_length=1)]] | None
    ) = Field(
        None,
        description='Weight template -> its companion template, or a list of them: "{w}": "{w}_scale_inv", '
        '"{w}.weight": ["{w}.weight_scale", "{w}.input_scale"]. Each template is {w} then literal '
        "key text.",
    )


class SpecFile(_Surface):
    """The top level of a YAML spec: the root the schema validates."""

    model_config = ConfigDict(
        title="convspec spec",
        json_schema_extra={
            "description": "A convspec conversion spec (YAML form): how a checkpoint's keys are renamed, "
            "dropped and reshaped between two layouts. Reference: docs/language.md."
        },
    )
    spec: Name = Field(description="The spec's name: letters, digits and _ (a Python identifier).")
    doc: str = Field("", description="A one-line description of the conversion.")
    model_types: list[str] = Field(
        [], description="The model types (or transformers class names) this spec serves."
    )
    base_prefix: Name | None = Field(
        None,
        description="The base model's attribute name in full-model keys (transformers' "
        "base_model_prefix), e.g. model.",
    )
    quantization: QuantizationSection | None = Field(
        None,
        description="How quantized weights and their scales are stored (FP8 blocks, MXFP4, per-tensor FP8).",
    )
    rules: list[Rule] = Field(
        [],
        description="The ordered rules; each has exactly one of rename, alias, drop, include, convert.",
    )


class _SurfaceSchema(GenerateJsonSchema):
    """pydantic's generator, adjusted to what the YAML front end accepts and what editors show."""

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> dict[str, Any]:
        """An optional key with no value of its own (None) gets no `default: null`: null is refused."""
        if schema.get("default", ...) is None:
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)

    def nullable_schema(self, schema: core_schema.NullableSchema) -> dict[str, Any]:
        """`X | None` marks an optional key in Python; in YAML a null value is refused, so drop it."""
        return self.generate_inner(schema["schema"])

    def field_title_should_be_set(self, schema: Any) -> bool:
        """No per-field titles: the key is its own title, and the description is what hovers show."""
        return False

    def dict_schema(self, schema: core_schema.DictSchema) -> dict[str, Any]:
        """Key patterns as propertyNames, so a key that does not match is an error, not just unchecked."""
        out = super().dict_schema(schema)
        props = out.pop("patternProperties", None)
        if props:
            ((pattern, values),) = props.items()
            out["propertyNames"] = {"pattern": pattern}
            out["additionalProperties"] = values
        return out


_ORDER = (
    "$schema",
    "$comment",
    "title",
    "description",
    "type",
    "enum",
    "pattern",
    "default",
    "properties",
    "required",
    "propertyNames",
    "additionalProperties",
    "items",
    "anyOf",
    "if",
    "then",
    "else",
    "$defs",
)


def _ordered(value: Any, parent: str | None = None) -> Any:
    """Keywords in reading order (unknown ones alphabetical after them); property names as declared."""
    if isinstance(value, dict):
        if parent == "properties":
            keys = list(value)
        else:
            keys = sorted(value, key=lambda k: (_ORDER.index(k), "") if k in _ORDER else (len(_ORDER), k))
        return {k: _ordered(value[k], k) for k in keys}
    if isinstance(value, list):
        return [_ordered(v) for v in value]
    return value


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a YAML spec, with the same key order on every call."""
    schema = SpecFile.model_json_schema(schema_generator=_SurfaceSchema)
    schema["$schema"] = DRAFT
    schema["$comment"] = "Generated by `convspec schema` from convspec/spec/schema.py; do not edit."
    return _ordered(schema)

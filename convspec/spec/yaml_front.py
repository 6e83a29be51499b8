"""The YAML front end: a safely composed YAML tree -> the same Spec IR as the DSL.

Template and expression strings inside the YAML are parsed with the DSL's own grammar rules.
"""

from __future__ import annotations

import yaml

from ..errors import SpecError, SpecSyntaxError, SpecValidationError
from . import quant
from .lexicon import is_dotted_prefix
from .model import Binding, Convert, Drop, Include, Let, ListExpr, Num, Output, Quantization, Rename, Spec
from .parse import MAX_SPEC_CHARS, int64, parse_expr, parse_template
from .source import Embedded, Source

MAX_YAML_NODES = 200_000
MAX_YAML_DEPTH = 64  # a spec nests 6 deep; PyYAML composes recursively and would overflow the stack
_STR = "tag:yaml.org,2002:str"
_PLAIN_TAGS = {  # the tags plain YAML resolves to: anything else was written as an explicit tag
    yaml.ScalarNode: tuple(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null")),
    yaml.MappingNode: ("tag:yaml.org,2002:map",),
    yaml.SequenceNode: ("tag:yaml.org,2002:seq",),
}

TOP_KEYS = ("spec", "doc", "model_types", "base_prefix", "quantization", "rules")
QUANT_KEYS = ("scheme", "block", "companions")
RULE_KEYS = {
    "rename": ("rename", "to", "unless"),
    "alias": ("alias", "to", "unless"),
    "include": ("include", "under", "only"),
    "drop": ("drop",),
    "convert": ("convert", "let", "to", "ops"),
}


def parse_yaml(text: str, file: str | None = None) -> Spec:
    """Parse a YAML spec into the Spec IR; every error names the file, line and column."""
    source = Source(text, file)
    if len(text) > MAX_SPEC_CHARS:
        raise SpecValidationError(f"spec is larger than {MAX_SPEC_CHARS} characters", span=source.span(1, 1))
    try:
        root = yaml.compose(text, Loader=_DepthLimitedLoader)
    except _TooDeep as exc:
        raise SpecValidationError(
            f"YAML nested deeper than {MAX_YAML_DEPTH} levels",
            span=source.span(exc.mark.line + 1, exc.mark.column + 1),
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise SpecSyntaxError(
            f"invalid YAML: {exc.problem or exc.context}",
            span=source.span(line, col),
            hint="check the indentation, and quote values that contain ': ', '{' or '#'",
        ) from None
    except yaml.YAMLError as exc:  # pragma: no cover - every yaml error we know is marked
        raise SpecSyntaxError(f"invalid YAML: {exc}", span=source.span(1, 1)) from None
    return _YamlBuilder(source).spec(root)


class _TooDeep(Exception):
    """Nesting past MAX_YAML_DEPTH, with the mark of the node where it happened."""

    def __init__(self, mark):
        self.mark = mark


class _DepthLimitedLoader(yaml.SafeLoader):
    """A SafeLoader that refuses deep nesting before its recursive composer runs out of stack."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _YamlBuilder:
    def __init__(self, source: Source):
        self.source = source
        self.budget = MAX_YAML_NODES

    # ---- helpers -------------------------------------------------------------------------

    def span(self, node: yaml.Node):
        return self.source.span(node.start_mark.line + 1, node.start_mark.column + 1)

    def where(self, node: yaml.ScalarNode) -> Embedded:
        if node.style in (">", "|"):
            return Embedded.block(self.source, node.start_mark.line + 2, node.end_mark.line + 1, node.value)
        quoted = 1 if node.style in ("'", '"') else 0
        return Embedded(self.source, node.start_mark.line + 1, node.start_mark.column + 1 + quoted)

    def _count(self, node: yaml.Node) -> None:
        allowed = _PLAIN_TAGS[type(node)] if type(node) in _PLAIN_TAGS else ()
        if node.tag not in allowed:  # `!!python/object...` and friends: specs are plain data
            raise SpecValidationError(
                f"unsupported YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')!r}",
                span=self.span(node),
                hint="a spec holds plain strings, lists and mappings: remove the tag",
            )
        self.budget -= 1
        if self.budget < 0:
            raise SpecValidationError(f"spec has more than {MAX_YAML_NODES} YAML nodes", span=self.span(node))

    def string(self, node: yaml.Node, what: str) -> str:
        self._count(node)
        if not isinstance(node, yaml.ScalarNode):
            raise SpecValidationError(f"{what} must be a string, not a {_kind(node)}", span=self.span(node))
        if node.tag != _STR:
            raise SpecValidationError(
                f"{what} must be a string, got {node.value!r}",
                span=self.span(node),
                hint='quote it: "..."',
            )
        return node.value

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...] | None = None):
        """The (key node, key, value node) triples of a mapping; refuses duplicate and unknown keys."""
        self._count(node)
        if not isinstance(node, yaml.MappingNode):
            raise SpecValidationError(f"{what} must be a mapping, not a {_kind(node)}", span=self.span(node))
        seen: dict[str, yaml.Node] = {}
        out = []
        for knode, vnode in node.value:
            key = self.string(knode, f"a key of {what}")
            if key in seen:
                raise SpecValidationError(
                    f"key {key!r} appears twice in {what}",
                    span=self.span(knode),
                    hint=f"first given at line {seen[key].start_mark.line + 1}",
                )
            if allowed is not None and key not in allowed:
                raise SpecValidationError(
                    f"unknown key {key!r} in {what}",
                    span=self.span(knode),
                    hint=f"allowed keys: {', '.join(allowed)}",
                )
            seen[key] = knode
            out.append((knode, key, vnode))
        return out

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        self._count(node)
        if not isinstance(node, yaml.SequenceNode):
            raise SpecValidationError(f"{what} must be a list, not a {_kind(node)}", span=self.span(node))
        return list(node.value)

    def template(self, node: yaml.Node, what: str):
        return parse_template(self.string(node, what), self.where(node))

    def expr(self, node: yaml.Node, what: str):
        return parse_expr(self.string(node, what), self.where(node))

    # ---- the spec ------------------------------------------------------------------------

    def spec(self, root: yaml.Node | None) -> Spec:
        if root is None:
            raise SpecValidationError(
                "spec is empty", span=self.source.span(1, 1), hint="start with 'spec: NAME'"
            )
        fields = {key: (knode, vnode) for knode, key, vnode in self.mapping(root, "the spec", TOP_KEYS)}
        if "spec" not in fields:
            raise SpecValidationError(
                "the spec has no 'spec:' key naming it",
                span=self.span(root),
                hint="add 'spec: NAME' at the top",
            )
        name_node = fields["spec"][1]
        name = self.string(name_node, "'spec' (the spec's name)")
        if not name.isidentifier():
            raise SpecValidationError(
                f"spec name {name!r} is not a plain name",
                span=self.span(name_node),
                hint="use letters, digits and _",
            )
        doc = self.string(fields["doc"][1], "'doc'") if "doc" in fields else ""
        model_types = []
        if "model_types" in fields:
            for item in self.sequence(fields["model_types"][1], "'model_types'"):
                model_types.append(self.string(item, "a model type"))
        base_prefix = ""
        if "base_prefix" in fields:
            node = fields["base_prefix"][1]
            base_prefix = self.string(node, "'base_prefix'")
            if not base_prefix.isidentifier():
                raise SpecValidationError(
                    f"base_prefix {base_prefix!r} is not a plain name",
                    span=self.span(node),
                    hint="the base model's attribute name, e.g. model",
                )
        quantization = self.quantization(fields["quantization"][1]) if "quantization" in fields else None
        rules = []
        if "rules" in fields:
            for item in self.sequence(fields["rules"][1], "'rules'"):
                rules.append(self.rule(item))
        return Spec(
            name=name,
            doc=doc,
            model_types=model_types,
            base_prefix=base_prefix,
            quantization=quantization,
            rules=rules,
            file=self.source.file,
            span=self.span(root),
        )

    def quantization(self, node: yaml.Node) -> Quantization:
        """`quantization:` with `scheme:`, an optional `block:` and `companions:` (weight -> companion(s))."""
        what = "'quantization'"
        fields = {key: (k, v) for k, key, v in self.mapping(node, what, QUANT_KEYS)}
        if "scheme" not in fields:
            raise SpecValidationError(
                "'quantization' needs 'scheme:'",
                span=self.span(node),
                hint=f"add 'scheme: NAME', one of: {', '.join(quant.SCHEMES)}",
            )
        scheme_node = fields["scheme"][1]
        scheme = quant.check_scheme(self.string(scheme_node, "'scheme'"), self.span(scheme_node))
        block, block_span = None, None
        if "block" in fields:
            block_node = fields["block"][1]
            block_span = self.span(block_node)
            if isinstance(block_node, yaml.SequenceNode):
                block = self.block_list(block_node)
            else:
                block = self.expr(block_node, "'block' (an expression or a list of numbers)")
        entries = []
        if "companions" in fields:
            for k, _, v in self.mapping(fields["companions"][1], "'companions' (weight -> companions)"):
                items = [v] if isinstance(v, yaml.ScalarNode) else self.sequence(v, "a weight's companions")
                comps = [self.template(c, "a companion template") for c in items]
                entries.append((self.template(k, "a weight template"), comps, self.span(k)))
        return quant.build(scheme, block, block_span, entries, self.span(node))

    def block_list(self, node: yaml.SequenceNode) -> ListExpr:
        """`block: [128, 128]`: the same IR as the expression `[128, 128]`."""
        items = []
        for item in self.sequence(node, "'block'"):
            self._count(item)
            digits = item.value if isinstance(item, yaml.ScalarNode) else ""
            if item.tag != "tag:yaml.org,2002:int" or not digits.isascii() or not digits.isdigit():
                raise SpecValidationError(
                    "a block shape is a list of whole numbers such as [128, 128], or an expression",
                    span=self.span(item),
                    hint="e.g. block: [128, 128], or block: config.quantization_config.weight_block_size",
                )
            items.append(Num(value=int64(digits, digits, "number", self.span(item)), span=self.span(item)))
        return ListExpr(items=items, span=self.span(node))

    def rule(self, node: yaml.Node):
        self._count(node)
        if not isinstance(node, yaml.MappingNode):
            raise SpecValidationError(
                f"a rule must be a mapping, not a {_kind(node)}",
                span=self.span(node),
                hint="start a rule with 'rename:', 'alias:', 'convert:', 'drop:' or 'include:'",
            )
        keys = [self.string(k, "a rule key") for k, _ in node.value]
        kinds = [k for k in keys if k in RULE_KEYS]
        if len(kinds) != 1:
            raise SpecValidationError(
                "a rule needs exactly one of 'rename', 'alias', 'convert', 'drop', 'include'"
                + (f" (found {', '.join(kinds)})" if kinds else ""),
                span=self.span(node),
            )
        kind = kinds[0]
        fields = {key: (k, v) for k, key, v in self.mapping(node, f"a {kind} rule", RULE_KEYS[kind])}
        span = self.span(node)
        if kind in ("rename", "alias"):
            if "to" not in fields:
                raise SpecValidationError(f"a {kind} rule needs 'to:'", span=span)
            unless = []
            if "unless" in fields:
                node_u = fields["unless"][1]
                items = [node_u] if isinstance(node_u, yaml.ScalarNode) else self.sequence(node_u, "'unless'")
                unless = [self.template(t, "an 'unless' template") for t in items]
            return Rename(
                source=self.template(fields[kind][1], f"a {kind} source"),
                target=self.template(fields["to"][1], f"a {kind} target"),
                unless=unless,
                one_way=kind == "alias",
                span=span,
            )
        if kind == "include":
            name_node = fields["include"][1]
            name = self.string(name_node, "'include' (a spec name)")
            if not name.isidentifier():  # a name, never a path: an include must not read other files
                raise SpecValidationError(
                    f"include {name!r} is not a spec name",
                    span=self.span(name_node),
                    hint="name a spec of the library or one beside this file, without its suffix: "
                    "include: qwen2_moe",
                )
            under = []
            if "under" in fields:
                node_u = fields["under"][1]
                items = [node_u] if isinstance(node_u, yaml.ScalarNode) else self.sequence(node_u, "'under'")
                for item in items:
                    prefix = self.string(item, "a prefix")
                    if prefix and not is_dotted_prefix(prefix):
                        raise SpecValidationError(
                            f"prefix {prefix!r} is not a dotted name",
                            span=self.span(item),
                            hint='a prefix is literal key text such as model.language_model, or "" for every key',
                        )
                    under.append(prefix)
            only = "all"
            if "only" in fields:
                only = self.string(fields["only"][1], "'only'")
                if only not in ("all", "renames", "converts"):
                    raise SpecValidationError(
                        f"only: {only!r}: expected renames, converts or all",
                        span=self.span(fields["only"][1]),
                        hint="`only: renames` takes the renames and aliases, `only: converts` the converts",
                    )
            return Include(spec=name, under=under, only=only, span=span)
        if kind == "drop":
            return Drop(source=self.template(fields["drop"][1], "a drop template"), span=span)
        return self.convert(fields, span)

    def convert(self, fields, span) -> Convert:
        inputs = [
            Binding(
                name=_ident(self, k, name, "an input name"),
                template=self.template(v, "an input template"),
                span=self.span(k),
            )
            for k, name, v in self.mapping(fields["convert"][1], "'convert' (the inputs)")
        ]
        lets = []
        if "let" in fields:
            for k, names, v in self.mapping(fields["let"][1], "'let'"):
                idents = [n.strip() for n in names.split(",")]
                for n in idents:
                    if not n.isidentifier():
                        raise SpecValidationError(f"{n!r} is not a name for a let value", span=self.span(k))
                lets.append(Let(names=idents, expr=self.expr(v, "a let expression"), span=self.span(k)))
        if "to" not in fields:
            raise SpecValidationError("a convert rule needs 'to:'", span=span)
        to_node = fields["to"][1]
        if "ops" in fields:
            chain = []
            ops_node = fields["ops"][1]
            for item in self.sequence(ops_node, "'ops'"):
                try:
                    call = self.expr(item, "an op of 'ops'")
                except SpecError as exc:
                    if ops_node.flow_style and isinstance(item, yaml.ScalarNode) and item.style is None:
                        exc.hint = (exc.hint + "; " if exc.hint else "") + (
                            "in a [...] list YAML splits at every comma: quote calls with several "
                            'arguments, e.g. ["cat(dim=1, equal=true)"]'
                        )
                    raise
                if call.kind != "call":
                    raise SpecValidationError(
                        "each item of 'ops' must be an op call such as cat(dim=1)", span=self.span(item)
                    )
                chain.append(call)
            if isinstance(to_node, yaml.SequenceNode):
                targets = [self.template(t, "a target template") for t in self.sequence(to_node, "'to'")]
            else:
                targets = [self.template(to_node, "a target template")]
            outputs = [Output(targets=targets, chain=chain, span=self.span(to_node))]
        else:
            if isinstance(to_node, yaml.ScalarNode):
                raise SpecValidationError(
                    "'to:' is a single key but the rule has no 'ops:'",
                    span=self.span(to_node),
                    hint="map each target to an expression ('KEY: expr'), or add 'ops: [...]'",
                )
            outputs = []
            for k, text, v in self.mapping(to_node, "'to' (targets -> expressions)"):
                where = self.where(k)
                targets, offset = [], 0
                for piece in text.split(","):
                    lead = len(piece) - len(piece.lstrip())
                    sub = Embedded(where.source, where.line, where.col + offset + lead)
                    targets.append(parse_template(piece.strip(), sub))
                    offset += len(piece) + 1
                outputs.append(
                    Output(targets=targets, expr=self.expr(v, "an output expression"), span=self.span(k))
                )
        return Convert(inputs=inputs, lets=lets, outputs=outputs, span=span)


def _ident(builder: _YamlBuilder, node, name: str, what: str) -> str:
    if not name.isidentifier():
        raise SpecValidationError(
            f"{name!r} is not a valid {what}", span=builder.span(node), hint="use letters, digits and _"
        )
    return name


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return "scalar"

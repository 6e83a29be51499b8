"""Export a compiled plan as transformers weight conversions (`WeightRenaming` / `WeightConverter`).

```python
import convspec
from convspec.integrations.transformers import to_weight_conversions
from transformers.conversion_mapping import register_checkpoint_conversion_mapping

plan = convspec.compile(convspec.load_spec("mixtral"))
register_checkpoint_conversion_mapping("mixtral", to_weight_conversions(plan), overwrite=True)
```

transformers loads a checkpoint by renaming every key with all its `WeightRenaming`s, in order, and
then with at most one `WeightConverter`; it saves by reversing each object. Its patterns are regexes
that are *searched* in the key (not matched against the whole key), and the matched text is replaced
by the target text, in which `\\1` stands for the one capturing group a pattern may have. The
exported patterns are written so that they match exactly the keys the spec's templates match:

- A rename becomes a regex anchored at the start of the key. The text that the rename leaves alone
  at the end of the key (a common suffix such as `.{rest}`) is not replaced but checked by a
  lookahead up to the end of the key; in what remains, the text from the first capture to the last
  must be the same in source and target, and becomes the group `\\1`.
  `{p:path}.block_sparse_moe.{rest:path} -> {p}.mlp.{rest}` becomes
  `^(?!...)(.+)\\.block_sparse_moe(?=\\..+\\Z)` -> `^(?!...)\\1\\.mlp(?=\\..+\\Z)`. The target is a
  pattern too (transformers strips `^` and lookarounds from it when renaming, and uses it as the
  source when saving), so the reverse rename is exact as well.
- A convert becomes a `WeightConverter` whose patterns cover the text between the part that all its
  templates share at the start (one leading `{p:path}`) and at the end, with that context checked by
  a lookbehind and a lookahead; the stacked `{e:int}` capture is transformers' `*`, pinned to a
  decimal index by a lookahead. Its ops become transformers ops (see `docs/integrations.md`).

Keys are assumed to have no empty segments (`a..b`, a leading or trailing dot), as no torch module
path has. Anything that cannot be exported faithfully raises `ExportError`, naming the rule.
"""

from __future__ import annotations

import math
from typing import Any

from ..compile.expr import BinOp, ConfigExpr, Expr, Num, Ref
from ..compile.patterns import Pattern, intersection_witness
from ..compile.plan import Node, Plan, PlanRule
from ..errors import ConvspecError
from ..ops import OPS, Op
from ..ops.joining import Cat, Chunk, Split
from ..ops.layout import Reshape, Transpose
from ..ops.rope import Deinterleave, Interleave, PermuteRope, UnpermuteRope
from ..ops.stacking import Stack

__all__ = ["ExportError", "to_weight_conversions"]


class ExportError(ConvspecError):
    """A plan, or one of its rules, has no faithful transformers equivalent."""


# No empty segment anywhere in the key: with it, `.+` matches exactly what a `path` capture matches.
_NO_EMPTY_SEGMENT = r"(?!\.|.*\.\.|.*\.\Z)"
# Regex characters a literal must not contain: transformers unescapes only `\.` in a target.
_SPECIAL = set("\\^$*+?{}[]|()")
_MAX_ALTERNATIVES = 256
_OPT_BODY = {"after": r".+\.", "before": r"\..+", None: ".+"}
_OPT_LAZY_BODY = {"after": r".+?\.", "before": r"\..+?", None: ".+?"}


def to_weight_conversions(plan: Plan) -> list:
    """The plan as a list of transformers `WeightRenaming` / `WeightConverter` objects.

    Renames come first, in plan order, then the converters, in plan order (transformers applies every
    renaming and then at most one converter). Register the list with
    `transformers.conversion_mapping.register_checkpoint_conversion_mapping`; transformers reverses it
    itself when saving. Raises `ExportError` for a rule that transformers cannot express exactly, and
    `TransformersMissing` where transformers is not installed (`pip install 'convspec[transformers]'`).
    """
    from ..extras import require_transformers

    tml = require_transformers("exporting a plan to transformers").core_model_loading

    _check_order(plan)
    renames, converters = [], []
    for rule in plan.rules:
        if rule.kind == "rename":
            pair = _rename_patterns(rule)
            if pair is not None:
                renames.append(tml.WeightRenaming(source_patterns=pair[0], target_patterns=pair[1]))
        elif rule.kind == "convert":
            for component in _components(rule):
                converters.append(_Converter(rule, component, tml).build())
        else:
            raise ExportError(
                f"{rule.label}: a {rule.kind} rule has no transformers equivalent "
                "(transformers cannot drop a checkpoint key; it reports it as unexpected)",
                hint="remove the drop from the spec you export",
            )
    return renames + converters


# ---- templates as tokens -----------------------------------------------------------------------
# A pattern is a list of tokens: ("c", char) | ("cap", name, "path" | "seg" | "int")
# | ("opt", name, "after" | "before" | None), an optional path that owns the dot beside it.


def _tokens(pattern: Pattern) -> list[tuple]:
    out: list[tuple] = []
    for kind, a, b in getattr(pattern, "elements", pattern.parts):  # elements: `path?` owns its dot
        if kind == "lit":
            out.extend(("c", ch) for ch in a)
        elif kind == "cap":
            out.append(("cap", a, b or "seg"))
        else:
            out.append(("opt", a, b))
    return out


def _is_path(tok: tuple) -> bool:
    return tok[0] == "opt" or (tok[0] == "cap" and tok[2] == "path")


def _clean(tokens: list[tuple]) -> bool:
    """Whether the template only matches keys without empty segments."""
    for present in (True, False):
        text = ""
        for tok in tokens:
            if tok[0] == "c":
                text += tok[1]
            elif tok[0] == "cap":
                text += "0" if tok[2] == "int" else "x"
            elif present:
                text += {"after": "x.", "before": ".x", None: "x"}[tok[2]]
        if "" in text.split("."):
            return False
    return True


def _lit(ch: str, rule: PlanRule) -> str:
    if ch == ".":
        return r"\."
    if ch in _SPECIAL or not ch.isprintable() or ch.isspace():
        raise ExportError(
            f"{rule.label}: the template character {ch!r} cannot be written in a transformers pattern "
            "(transformers unescapes only '\\.' in a target)"
        )
    return ch


def _alternatives(tokens: list[tuple], rule: PlanRule) -> list[str]:
    """Flat regexes (no groups) whose union matches what `tokens` match."""
    alts = [""]
    for tok in tokens:
        if tok[0] == "c":
            options = [_lit(tok[1], rule)]
        elif tok[0] == "cap":
            options = {"int": ["0", "[1-9][0-9]*"], "seg": ["[^.]+"], "path": [".+"]}[tok[2]]
        else:
            options = ["", _OPT_BODY[tok[2]]]
        alts = [a + o for a in alts for o in options]
        if len(alts) > _MAX_ALTERNATIVES:
            raise ExportError(f"{rule.label}: too many optional or integer captures to export")
    return alts


def _until_end(tokens: list[tuple], rule: PlanRule) -> str:
    """A lookahead: what follows, up to the end of the key, matches `tokens`."""
    if not tokens:
        return "(?!.)"
    return "(?=" + "|".join(a + r"\Z" for a in _alternatives(tokens, rule)) + ")"


def _group(tok: tuple, first: bool) -> str:
    """The capturing group for one capture, preferring what the spec's own regex prefers."""
    if tok[0] == "cap":
        if tok[2] == "path" and first:  # a leading path takes the first occurrence, as convspec's does
            return "(.+?)"
        return {"path": "(.+)", "seg": "([^.]+)", "int": "(0|[1-9][0-9]*)"}[tok[2]]
    if tok[2] == "after" and first:  # a leading optional path: absent first, then the shortest
        return "(|" + _OPT_LAZY_BODY["after"] + ")"
    body = (_OPT_LAZY_BODY if first else _OPT_BODY)[tok[2]]
    return "(" + body + "|)"


def _wide_group(tokens: list[tuple], first: bool, following: list[tuple], rule: PlanRule) -> str:
    """One capturing group over several captures and the text between them.

    It prefers what the spec's own regex prefers (a leading path lazy, other paths and segments
    greedy, in order), so it needs
    no nested group: an `int` is `[0-9]+` behind a lookahead against leading zeros, and an optional
    path, allowed only at the start, is spelled out as two alternatives in the order the spec tries
    them. When saving, transformers strips lookarounds from this group (it becomes the pattern of the
    reverse rename), so there an `int` also takes leading zeros, which no model key has.
    """
    opt, body = (tokens[0], tokens[1:]) if tokens[0][0] == "opt" else (None, tokens)
    parts = []
    for i, tok in enumerate(body):
        if tok[0] == "c":
            parts.append(_lit(tok[1], rule))
        elif tok[0] == "opt":
            raise ExportError(
                f"{rule.label}: cannot export this rename to transformers: the optional capture "
                f"{{{tok[1]}}} comes after another capture in the part that moves"
            )
        elif tok[2] == "int":
            nxt = (body[i + 1 :] + following)[:1]
            if nxt and nxt[0][0] == "c" and nxt[0][1].isdigit():
                raise ExportError(f"{rule.label}: the capture {{{tok[1]}}} is followed by a digit")
            parts.append("(?!0[0-9])[0-9]+")
        else:
            lazy = "?" if tok[2] == "path" and i == 0 and first and opt is None else ""
            parts.append({"path": ".+", "seg": "[^.]+"}[tok[2]] + lazy)
    rest = "".join(parts)
    if opt is None:
        return "(" + rest + ")"
    if opt[2] == "after" and first:  # a leading optional path: absent first, then the shortest
        alternatives = [rest, _OPT_LAZY_BODY["after"] + rest]
    else:
        alternatives = [(_OPT_LAZY_BODY if first else _OPT_BODY)[opt[2]] + rest, rest]
    return "(" + "|".join(alternatives) + ")"


def _names(tokens: list[tuple]) -> list[str]:
    return ["{" + t[1] + "}" for t in tokens if t[0] != "c"]


# ---- renames -----------------------------------------------------------------------------------


def _rename_patterns(rule: PlanRule) -> tuple[str, str] | None:
    """(source, target) regexes for a rename, or None when it changes no key.

    Both are anchored at the start of the key. The end that source and target share is checked by a
    lookahead and left in place; the rest is `A M B` in the source and `A' M B'` in the target, where
    `M` runs from the first capture to the last and is the same in both: it is the one group, `\\1`.
    """
    (_, src), (_, dst) = rule.inputs[0], rule.outputs[0]
    s, t = _tokens(src), _tokens(dst)
    unless = [_tokens(u) for u in (getattr(rule, "unless", ()) or ())]
    one_way = bool(getattr(rule, "one_way", False))
    shown = f"{src.text} -> {dst.display()}"

    # The common end, from a dot or a capture on, is left in place (checked, not replaced).
    k = 0
    while k < min(len(s), len(t)) and s[len(s) - 1 - k] == t[len(t) - 1 - k]:
        k += 1
    while k and s[len(s) - k][0] == "c" and s[len(s) - k][1] != ".":
        k -= 1
    s_pre, t_pre, rest = s[: len(s) - k], t[: len(t) - k], s[len(s) - k :]
    if s_pre == t_pre:
        return None  # the identity

    caps = [i for i, tok in enumerate(s_pre) if tok[0] != "c"]
    t_caps = [i for i, tok in enumerate(t_pre) if tok[0] != "c"]
    s_group = t_group = ""
    if caps:
        first, last = caps[0], caps[-1]
        middle = s_pre[first : last + 1]
        t_first = t_caps[0] if t_caps else 0
        if t_pre[t_first : t_first + len(middle)] != middle or len(t_caps) != len(caps):
            raise ExportError(
                f"{rule.label}: cannot export {shown} to transformers: the text between or around the "
                f"captures {', '.join(_names(s_pre))} changes in more than one place, and a transformers "
                "pattern has one capturing group",
                hint="write it as renames that each change the key in one place",
            )
        following = (s_pre[last + 1 :] + rest)[:1]
        if len(caps) == 1:
            s_group, t_group = _group(middle[0], first == 0), _group(middle[0], t_first == 0)
        else:
            s_group = _wide_group(middle, first == 0, following, rule)
            t_group = _wide_group(middle, t_first == 0, following, rule)
        if s_group != t_group:
            raise ExportError(
                f"{rule.label}: cannot export {shown} to transformers: the optional capture "
                f"{{{middle[0][1]}}} is matched differently in the source and the target"
            )
        s_parts = (s_pre[:first], s_group, s_pre[last + 1 :])
        t_parts = (t_pre[:t_first], r"\1", t_pre[t_first + len(middle) :])
    else:
        s_parts, t_parts = (s_pre, "", []), (t_pre, "", [])

    guard_s = any(_is_path(tok) for tok in s + [x for u in unless for x in u])
    guard_t = any(_is_path(tok) for tok in t)
    if (guard_s and not _clean(s)) or (guard_t and not _clean(t)):
        raise ExportError(f"{rule.label}: the template makes keys with an empty segment ('..')")

    def body(parts) -> str:
        before, group, after = parts
        return (
            "".join(_lit(tok[1], rule) for tok in before)
            + group
            + "".join(_lit(tok[1], rule) for tok in after)
        )

    end = _until_end(rest, rule)
    excluded = ""
    if unless:
        excluded = "(?!" + "|".join(a + r"\Z" for u in unless for a in _alternatives(u, rule)) + ")"
    source = "^" + (_NO_EMPTY_SEGMENT if guard_s else "") + excluded + body(s_parts) + end
    # `(?!)` never matches: the reverse of a one-way rename (an alias) renames nothing on save.
    target = "^" + ("(?!)" if one_way else "") + (_NO_EMPTY_SEGMENT if guard_t else "") + body(t_parts) + end
    return source, target


# ---- rule order --------------------------------------------------------------------------------


def _check_order(plan: Plan) -> None:
    """transformers renames every key before any converter sees it, and never renames a converter's
    output; convspec renames keys in rule order. The two agree when no rename after a convert can
    touch the keys that convert reads or writes."""
    converts: list[PlanRule] = []
    for rule in plan.rules:
        if rule.kind == "convert":
            converts.append(rule)
            continue
        if rule.kind != "rename":
            continue
        for side, pattern in (("source", rule.inputs[0][1]), ("target", rule.outputs[0][1])):
            for conv in converts:
                for role, patterns in (("reads", conv.inputs), ("writes", conv.outputs)):
                    for _, other in patterns:
                        key = intersection_witness(pattern, other)
                        if key is not None:
                            raise ExportError(
                                f"{rule.label}: cannot export to transformers: this rename comes after "
                                f"{conv.label}, and its {side} {pattern.text} can match the key {key!r}, "
                                f"which that convert {role} ({other.text}); transformers applies every "
                                "rename before any converter and none after",
                                hint="put the rename before the convert (its templates then name the "
                                "renamed keys), or make the templates disjoint",
                            )


# ---- converts ----------------------------------------------------------------------------------


def _components(rule: PlanRule) -> list[tuple[list[str], list[str], list[Node]]]:
    """The rule's DAG split into connected parts: (input names, output values, nodes) each."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for name, _ in rule.inputs:
        find(name)
    for node in rule.nodes:
        for v in (*node.inputs, *node.outputs):
            parent[find(v)] = find(node.inputs[0] if node.inputs else node.outputs[0])
    roots: list[str] = []
    parts: dict[str, tuple[list[str], list[str], list[Node]]] = {}
    for name, _ in rule.inputs:
        r = find(name)
        if r not in parts:
            roots.append(r)
            parts[r] = ([], [], [])
        parts[r][0].append(name)
    for value, _ in rule.outputs:
        parts.setdefault(find(value), ([], [], []))[1].append(value)
    for node in rule.nodes:
        parts.setdefault(find(node.outputs[0]), ([], [], []))[2].append(node)
    return [parts[r] for r in roots] + [p for r, p in parts.items() if r not in roots]


def _fixed(rule: PlanRule, node: Node, name: str, default: Any = None) -> Any:
    """A parameter of `node` that a transformers op takes as a fixed value. One that depends on the
    model config is refused whether the plan was compiled with a config or not: the exported mapping
    would otherwise hold one config's numbers, wrong for every other config of the model type."""
    value = dict(node.params).get(name, default)
    expr = value if isinstance(value, ConfigExpr) else dict(node.exprs).get(name)
    if expr is not None:
        raise ExportError(
            f"{rule.label}: cannot export to transformers: {node.op}'s {name}="
            f"{expr.text} depends on the model config, and transformers' ops "
            f"take fixed numbers (at {node.where})",
            hint=f"write {name} as a number in the spec you export",
        )
    return value


def _int(rule: PlanRule, node: Node, name: str, default: Any = None) -> int:
    value = _fixed(rule, node, name, default)
    if isinstance(value, bool) or not isinstance(value, int):  # pragma: no cover - the compiler checks it
        raise ExportError(f"{rule.label}: {node.op}'s {name} must be an integer (at {node.where})")
    return value


def _kind(node: Node) -> type[Op]:
    """The class of a node's op: the exporter dispatches on it (each convspec op class maps to a
    transformers op, or to none), never on the op's name."""
    return type(OPS[node.op])


def _is(node: Node, *kinds: type[Op]) -> bool:
    return _kind(node) in kinds


_ROPE = (PermuteRope, UnpermuteRope)


def _same(a: Node, b: Node) -> bool:
    return a.op == b.op and [p for p in a.params if p[0] != "over"] == [p for p in b.params if p[0] != "over"]


def _rope_subconfig(expr: Expr) -> str | None:
    """The `subconfig_key` of the PermuteForRope that takes the head count `expr` gives ("" for none),
    or None when no PermuteForRope does.

    PermuteForRope(subconfig_key=S) reads `getattr(getattr(config, S, config), "num_attention_heads",
    1)`. Where convspec's value for one of these forms exists, it is transformers' too: the chain
    `config.num_attention_heads [?? 1]`, and `config.S.num_attention_heads [?? config.num_attention_heads
    [?? 1]]` (except for a config whose S lacks num_attention_heads: transformers then uses 1, convspec
    the top-level field; docs/integrations.md says so).
    """
    chain: list[Expr] = []

    def flatten(e: Expr) -> None:
        if isinstance(e, BinOp) and e.op == "??":
            flatten(e.left)
            flatten(e.right)
        else:
            chain.append(e)

    flatten(expr)
    paths = [e.path if isinstance(e, Ref) else e for e in chain]
    one, top = Num(1), ("config", "num_attention_heads")
    if paths in ([top], [top, one]):
        return ""
    sub = paths[0]
    if isinstance(sub, tuple) and len(sub) == 3 and sub[0] == "config" and sub[2] == top[1]:
        # without `?? config.num_attention_heads`, `?? 1` would differ where the sub-config is missing
        if paths[1:] in ([], [top], [top, one]):
            return sub[1]
    return None


def _alike(chains: list[list[Node]]) -> bool:
    """Whether every chain applies the same ops (transformers applies each op to every tensor)."""
    return all(len(c) == len(chains[0]) and all(map(_same, c, chains[0])) for c in chains)


def _some_roped(chains: list[list[Node]]) -> bool:
    """Whether each chain is one rope op or nothing: PermuteForRope(permute_layer_names=...) can
    leave some tensors out by name, the one op transformers can apply to some of them only."""
    return all(not c or (len(c) == 1 and _is(c[0], *_ROPE)) for c in chains)


class _Converter:
    """One connected part of a convert's DAG -> one WeightConverter.

    Supported shapes (n inputs, m outputs): a chain of unary ops (n = m = 1); per-input chains joined
    by `cat` and followed by a chain (n > 1, m = 1); a chain cut by `chunk` / `split`, each part
    followed by the same chain (n = 1, m > 1). Each op must do in transformers what it does here,
    forwards and (reversed by transformers) backwards."""

    def __init__(self, rule: PlanRule, component, tml):
        self.rule, self.tml = rule, tml
        self.inputs, self.outputs, self.nodes = component
        self.patterns = dict(rule.inputs)
        self.targets = dict(rule.outputs)

    def fail(self, message: str, node: Node | None = None, hint: str | None = None) -> ExportError:
        where = f" (at {node.where})" if node is not None and node.where else ""
        return ExportError(f"{self.rule.label}: cannot export to transformers: {message}{where}", hint=hint)

    # -- the DAG as pre-chains, a join and a post-chain

    def build(self):
        if not self.nodes:
            raise self.fail(
                "a convert without ops has no transformers equivalent (a WeightConverter needs an op)"
            )
        if any(_is(n, Stack) and dict(n.params).get("parts", 1) != 1 for n in self.nodes):
            return self.split_experts()
        producer = {v: n for n in self.nodes for v in n.outputs}
        uses: dict[str, int] = {}
        for n in self.nodes:
            for v in n.inputs:
                uses[v] = uses.get(v, 0) + 1
        for v in self.outputs:
            uses[v] = uses.get(v, 0) + 1
        for v, count in uses.items():
            if count > 1:
                raise self.fail(f"the value {v} is used {count} times; transformers ops form a chain")

        def back(v: str) -> tuple[list[Node], str]:
            chain = []
            while v in producer and len(producer[v].inputs) == 1 and len(producer[v].outputs) == 1:
                chain.append(producer[v])
                v = producer[v].inputs[0]
            return chain[::-1], v

        join: Node | None = None
        partial: list[list[Node]] = []
        if len(self.outputs) == 1:
            post, v = back(self.outputs[0])
            if v in self.inputs:
                sources, pres, post = [v], [post], []
            elif _is(producer[v], Cat):
                join = producer[v]
                pres, sources = [], []
                for operand in join.inputs:
                    chain, src = back(operand)
                    if src not in self.inputs:
                        raise self.fail(
                            f"cat's operand {operand} does not come from one input by a chain", join
                        )
                    pres.append(chain)
                    sources.append(src)
            else:
                raise self.fail(
                    f"op {producer[v].op} in this position has no transformers equivalent", producer[v]
                )
            targets = [self.outputs[0]]
        else:
            chains = [back(v) for v in self.outputs]
            join = producer.get(chains[0][1])
            if join is None or not _is(join, Chunk, Split) or {c[1] for c in chains} != set(join.outputs):
                raise self.fail(
                    "several outputs must come from one chunk or split (transformers converts many keys "
                    "to one, or one to many)"
                )
            order = {v: i for i, v in enumerate(join.outputs)}
            ranked = sorted(zip(self.outputs, chains, strict=True), key=lambda x: order[x[1][1]])
            targets = [out for out, _ in ranked]
            posts = [chain for _, (chain, _) in ranked]
            post = posts[0]
            if not _alike(posts):
                if not _some_roped(posts):
                    raise self.fail(
                        "the parts of a chunk or split go through different ops (transformers applies "
                        "each op to all of them; only a rope permutation can leave some out)",
                        join,
                    )
                partial, post = posts, []
            pre, src = back(join.inputs[0])
            if src not in self.inputs:
                raise self.fail(f"{join.op}'s input does not come from one input by a chain", join)
            sources, pres = [src], [pre]
        if sorted(sources) != sorted(self.inputs) or len(set(sources)) != len(sources):
            raise self.fail("every input must feed the join exactly once")
        partial_pre: list[list[Node]] = []
        if not _alike(pres):
            if not _some_roped(pres) or any(self.rule.free_of.get(s) for s in sources):
                raise self.fail(
                    "the inputs go through different ops before they are joined (transformers "
                    "applies each op to all of them; only a rope permutation can leave some out)",
                    join,
                )
            partial_pre, pres = pres, [[] for _ in pres]

        n, m = len(sources), len(targets)
        source_patterns, target_patterns = self.patterns_for(sources, targets)
        ops = self.pre_ops(sources, pres[0], n, m)
        ops += self.rope_ops(partial_pre, source_patterns)
        if join is not None:
            ops.append(self.join_op(join, post))
        for node in post:
            ops.append(self.unary(node, single=(m == 1), fan_out=(m > 1)))
        ops += self.rope_ops(partial, target_patterns)
        return self.tml.WeightConverter(
            source_patterns=source_patterns, target_patterns=target_patterns, operations=ops
        )

    def split_experts(self):
        """`stack(x, over=e, parts=k)` on each input, and (with several inputs) the k-th parts of all
        of them joined by `cat`: transformers' ErnieFuseAndSplitTextVisionExperts (Ernie 4.5 VL's
        experts, text and vision). It cuts each collection into k runs of consecutive members as
        torch.chunk does, stacks each run, and concatenates run j of every input into target j; its
        reverse cuts each target into equal parts, so the cat must be equal."""
        op = getattr(self.tml, "ErnieFuseAndSplitTextVisionExperts", None)
        shape = (
            "stack(parts=k) must be the only op on each input, its parts going straight to the targets "
            "(one input) or joined part by part by one cat per target (several inputs), as transformers' "
            "ErnieFuseAndSplitTextVisionExperts does"
        )
        stacks = [n for n in self.nodes if _is(n, Stack)]
        cats = [n for n in self.nodes if not _is(n, Stack)]
        first = stacks[0]
        if op is None:
            raise self.fail("stack(parts=k) needs ErnieFuseAndSplitTextVisionExperts (transformers >= 5)")
        if (
            any(not _same(s, first) for s in stacks)
            or len(stacks) != len(self.inputs)
            or sorted(s.inputs[0] for s in stacks) != sorted(self.inputs)
            or any(self.rule.free_of.get(s.inputs[0], ()) != (dict(s.params)["over"],) for s in stacks)
        ):
            raise self.fail(shape, first)
        stack_dim = _int(self.rule, first, "dim")
        parts = len(first.outputs)
        if len(stacks) == 1:
            if cats or sorted(self.outputs) != sorted(first.outputs):
                raise self.fail(shape, cats[0] if cats else first)
            order, targets, concat_dim = [first], list(first.outputs), stack_dim
        else:
            by_output = {v: (s, j) for s in stacks for j, v in enumerate(s.outputs)}
            if len(cats) != parts or any(not _is(c, Cat) or not _same(c, cats[0]) for c in cats):
                raise self.fail(shape, next((c for c in cats if not _is(c, Cat)), first))
            order = [by_output[v][0] for v in cats[0].inputs if v in by_output]
            by_part = {}
            for cat in cats:
                if cat.outputs[0] not in self.outputs or len(cat.inputs) != len(stacks):
                    raise self.fail(shape, cat)
                js = {by_output[v][1] if v in by_output else None for v in cat.inputs}
                if len(js) != 1 or [by_output[v][0] for v in cat.inputs] != order:
                    raise self.fail("each cat must join the same part of every stack, in the same order", cat)
                by_part[js.pop()] = cat
            self.join_op(cats[0], [])  # the reverse cuts each target into equal parts: checks equal=true
            concat_dim = _int(self.rule, cats[0], "dim", 0)
            targets = [by_part[j].outputs[0] for j in range(parts)]
        sources = [s.inputs[0] for s in order]
        source_patterns, target_patterns = self.patterns_for(sources, targets)
        return self.tml.WeightConverter(
            source_patterns=source_patterns,
            target_patterns=target_patterns,
            operations=[op(stack_dim=stack_dim, concat_dim=concat_dim)],
        )

    def rope_ops(self, chains: list[list[Node]], patterns: list[str]) -> list:
        """PermuteForRope ops that permute only the parts whose chain is a rope op, named by
        `permute_layer_names` from those parts' patterns: one op per kind of rope op."""
        kinds: list[Node] = []
        for chain in chains:
            if chain and not any(_same(chain[0], k) for k in kinds):
                kinds.append(chain[0])
        ops = []
        for kind in kinds:
            chosen = [i for i, chain in enumerate(chains) if chain and _same(chain[0], kind)]
            names = self.layer_names(chosen, patterns)
            ops.append(self.rope(kind, inverse=_is(kind, UnpermuteRope), names=names))
        return ops

    # -- ops

    def pre_ops(self, sources: list[str], chain: list[Node], n: int, m: int) -> list:
        free = self.rule.free_of
        collection = [free.get(s, ()) for s in sources]
        ops = []
        for i, node in enumerate(chain):
            if _is(node, Stack):
                if i != 0 or any(len(c) != 1 for c in collection):
                    raise self.fail(
                        "stack must be the first op, on an input that is a collection over one capture", node
                    )
                if n == 1 and m > 1:
                    raise self.fail(
                        "transformers cannot stack a collection and then cut it into several "
                        "targets in one converter",
                        node,
                    )
                ops.append(self.tml.MergeModulelist(dim=_int(self.rule, node, "dim")))
                continue
            if i == 0 and any(collection):
                raise self.fail(
                    f"{node.op} on a collection (over {{{collection[0][0]}}}): transformers "
                    "applies ops to whole stacked tensors only; stack it first",
                    node,
                )
            ops.append(self.unary(node, single=(n == 1), fan_out=False))
        if not chain and any(collection):
            raise self.fail("a collection input must be stacked")
        return ops

    def join_op(self, node: Node, post: list[Node]):
        dim = _int(self.rule, node, "dim", 0)
        if _is(node, Cat):
            if not _fixed(self.rule, node, "equal"):
                sizes = _fixed(self.rule, node, "sizes")
                if sizes is None:
                    raise self.fail(
                        "cat without sizes=[...] or equal=true: transformers saves a "
                        "Concatenate by cutting it into equal parts",
                        node,
                        hint="add equal=true",
                    )
                if len(set(sizes)) > 1:
                    raise self.fail(
                        f"cat with unequal sizes={list(sizes)}: transformers saves a Concatenate "
                        "by cutting it into equal parts (Chunk)",
                        node,
                    )
            return self.tml.Concatenate(dim=dim)
        if _is(node, Chunk):
            return self.tml.Chunk(dim=dim)
        # split: transformers reads the sizes from the model's parameters, so they must be the targets'
        # sizes along dim: no op after it may change the shape.
        for later in post:
            if not _is(later, *_ROPE):
                raise self.fail(
                    f"{later.op} after split (transformers' Split reads the sizes from the "
                    "targets' parameters)",
                    later,
                )
        return self.tml.Split(dim=dim)

    def unary(self, node: Node, single: bool, fan_out: bool):
        kind = _kind(node)
        if kind in _ROPE:
            return self.rope(node, inverse=(kind is UnpermuteRope))
        if fan_out or not single:
            raise self.fail(
                f"op {node.op} on several tensors at once: transformers applies it to one tensor", node
            )
        make = _UNARY.get(kind)
        made = make(self, node) if make is not None else None
        if made is None:
            raise self.fail(f"op {node.op} has no transformers equivalent", node)
        return made

    def transpose(self, node: Node):
        return self.tml.Transpose(dim0=_int(self.rule, node, "dim0"), dim1=_int(self.rule, node, "dim1"))

    def interleave(self, node: Node):
        op = node.op
        dim, parts = _int(self.rule, node, "dim"), _int(self.rule, node, "parts")
        if parts != 2:
            raise self.fail(f"{op} with parts={parts}: transformers' Interleave has two parts", node)
        if dim < 0:
            raise self.fail(f"{op} with dim={dim}: transformers' Interleave needs a dim >= 0", node)
        # Interleave(dim) reshapes dim to [n // 2, 2] and swaps: our deinterleave(parts=2);
        # Interleave(dim, inverse=True) reshapes to [2, n // 2]: our interleave(parts=2).
        return self.tml.Interleave(dim=dim, inverse=_is(node, Interleave))

    def layer_names(self, chosen: list[int], patterns: list[str]) -> list[str]:
        """For PermuteForRope(permute_layer_names=...): one name per chosen part, found in the key
        transformers files that part under both when loading and when saving (the raw pattern and the
        pattern as transformers processes it for the reverse converter), and in no other part's key.
        The parts are the targets of a chunk or split, or the sources of a cat."""
        forms = [(raw, self.tml.process_target_pattern(raw)[0]) for raw in patterns]
        others = [form for i, pair in enumerate(forms) if i not in chosen for form in pair]
        names = []
        for i in chosen:
            raw, text = forms[i]
            name = next(
                (c for c in text.split(".") if c and c in raw and not any(c in o for o in others)), None
            )
            if name is None:
                raise self.fail(
                    f"no name in the permuted part's key {text} is absent from the other parts' keys "
                    "(PermuteForRope picks the tensors it permutes by a name found in their key)"
                )
            names.append(name)
        return names

    def rope(self, node: Node, inverse: bool, names: list[str] | None = None):
        kw = {"inverse": inverse, "permute_layer_names": names}
        heads = dict(node.params)["heads"]
        # Compiled with a config, the value was evaluated: what it means for other configs is the
        # expression it came from, so a plan exports the same with or without a config.
        expr = heads if isinstance(heads, ConfigExpr) else dict(node.exprs).get("heads")
        shown = expr.text if expr is not None else heads
        if expr is None:
            raise self.fail(
                f"{node.op} with heads={shown}: transformers' PermuteForRope reads the head count from "
                "the model config, and a number in the spec is not a config field",
                node,
                hint="write heads=config.num_attention_heads (or config.<sub_config>.num_attention_heads)",
            )
        subconfig = _rope_subconfig(expr.ir)
        if subconfig is None:
            raise self.fail(
                f"{node.op} with heads={shown}: transformers' PermuteForRope always uses "
                "config.num_attention_heads, or config.<sub_config>.num_attention_heads falling back "
                "to it",
                node,
                hint="write heads=config.num_attention_heads (or config.<sub_config>.num_attention_heads)",
            )
        return self.tml.PermuteForRope(subconfig_key=subconfig or None, **kw)

    def conv3d(self, node: Node):
        shape, frm = _fixed(self.rule, node, "shape"), _fixed(self.rule, node, "from_shape")
        concrete = all(isinstance(x, list) and all(type(v) is int for v in x) for x in (shape, frm))
        if not concrete or len(shape) != 2 or len(frm) != 5 or any(v < 1 for v in frm[1:]):
            return None
        if shape[0] != frm[0] or shape[1] not in (-1, math.prod(frm[1:])) or shape == [-1, -1]:
            return None
        return self.tml.Conv3dToLinear(in_channels=frm[1], kernel_size=tuple(frm[2:]))

    # -- patterns

    def patterns_for(self, sources: list[str], targets: list[str]) -> tuple[list[str], list[str]]:
        rule = self.rule
        ins = [_tokens(self.patterns[s]) for s in sources]
        outs = [_tokens(self.targets[t]) for t in targets]
        seqs = ins + outs
        plen = 0
        while all(len(s) > plen for s in seqs) and all(s[plen] == seqs[0][plen] for s in seqs):
            plen += 1
        slen = 0
        while all(len(s) - plen > slen for s in seqs) and all(
            s[-1 - slen] == seqs[0][-1 - slen] for s in seqs
        ):
            slen += 1
        head, tail = seqs[0][:plen], seqs[0][len(seqs[0]) - slen :]
        lit = len(head)
        while lit and head[lit - 1][0] == "c":
            lit -= 1
        head_var, head_lit = head[:lit], head[lit:]
        lit = 0
        while lit < len(tail) and tail[lit][0] == "c":
            lit += 1
        tail_lit, tail_var = tail[:lit], tail[lit:]

        if not head_var:
            ctx = "^"
        elif len(head_var) == 1 and head_lit and _is_path(head_var[0]) and head_var[0][2] != "before":
            ctx = "(?<=[^.])" if head_var[0][0] == "cap" else "(?<![^.])"
        else:
            raise self.fail(
                f"the keys must start with the same text or one {{p:path}} capture before the part that "
                f"changes, here {''.join(t[1] if t[0] == 'c' else '{' + t[1] + '}' for t in head)}"
            )
        stars = {s: self.rule.free_of.get(s, ()) for s in sources}
        if any(_is_path(t) for t in tail_var) and (head_var or any(stars.values())):
            raise self.fail("a path capture after the part that changes makes the converted part ambiguous")
        if any(_is_path(t) for t in tail_var) and not all(_clean(s) for s in seqs):
            raise self.fail("a template makes keys with an empty segment ('..')")
        if not head_var and any(_is_path(t) for t in tail_var):
            ctx += _NO_EMPTY_SEGMENT
        fixed_head = "".join(_lit(t[1], rule) for t in head_lit)
        fixed_tail = "".join(_lit(t[1], rule) for t in tail_lit)
        end = _until_end(tail_var, rule)

        source_patterns = []
        for name, tokens in zip(sources, ins, strict=True):
            mid = tokens[plen : len(tokens) - slen]
            out = []
            skip = star_in_tail = False
            for i, tok in enumerate(mid):
                if skip:
                    skip = False
                    continue
                if tok[0] == "c":
                    out.append(_lit(tok[1], rule))
                    continue
                if tok[0] != "cap" or tok[2] != "int" or stars[name] != (tok[1],):
                    raise self.fail(
                        f"the capture {{{tok[1]}}} of input {name} must be in the part of the key that "
                        "all the templates share (transformers keeps only that part)"
                    )
                after = mid[i + 1 :] + tail
                if not after or after[0] != ("c", "."):
                    raise self.fail(
                        f"the stacked capture {{{tok[1]}}} must be followed by a '.' "
                        "(it becomes transformers' '*.' wildcard)"
                    )
                # transformers reads `*.` as `.*\.` (the lookahead pins it to a decimal index), and
                # `*` in the saved key names is replaced by 0, 1, ...
                out.append(_until_end([tok, *after], rule) + "*.")
                if i + 1 < len(mid):
                    skip = True  # the dot is written
                else:
                    star_in_tail = True
            text = "".join(out)
            head_of_tail = fixed_tail
            if star_in_tail:
                head_of_tail = fixed_tail[2:]  # its leading r"\." is written as the wildcard's dot
            source_patterns.append(ctx + fixed_head + text + head_of_tail + end)
        target_patterns = []
        for name, tokens in zip(targets, outs, strict=True):
            mid = tokens[plen : len(tokens) - slen]
            if any(tok[0] != "c" for tok in mid):
                raise self.fail(
                    f"the capture {_names(mid)[0]} of target {self.targets[name].display()} must be in the "
                    "part of the key that all the templates share"
                )
            target_patterns.append(
                ctx + fixed_head + "".join(_lit(t[1], rule) for t in mid) + fixed_tail + end
            )
        return source_patterns, target_patterns


# the unary ops with a transformers equivalent, by op class (a method of _Converter: None when the
# parameters have none)
_UNARY = {
    Transpose: _Converter.transpose,
    Interleave: _Converter.interleave,
    Deinterleave: _Converter.interleave,
    Reshape: _Converter.conv3d,
}

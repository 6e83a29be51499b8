"""One transformers transform (WeightRenaming, WeightConverter, PrefixChange, GroupWeightRename)
-> convspec DSL rule text. Regexes become templates (see regex.py); converter ops become op
expressions. `Seen` says how the pattern matched real keys, so templates carry only the prefix and
suffix captures the keys need."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .regex import Match, NotExpressible, parse, preprocess, target_text


@dataclass
class Seen:
    """Where a source pattern matched keys of real models: was there text before / after it?"""

    pre: set[bool] = field(default_factory=set)
    post: set[bool] = field(default_factory=set)
    post_dot: set[bool] = field(default_factory=set)  # for a match ending inside a name: more segments?
    mid: set[bool] = field(default_factory=set)  # did the match start inside a name ("decoder_" + ...)?
    multi: set[bool] = field(default_factory=set)  # was the suffix more than one segment?

    def add(self, before: str, after: str, match: str = "") -> None:
        self.pre.add(bool(before))
        self.post.add(bool(after))
        self.post_dot.add("." in after)
        self.mid.add(bool(before) and not before.endswith(".") and not match.startswith("."))
        self.multi.add("." in after.removeprefix("."))

    def merge(self, other: Seen) -> None:
        for name in ("pre", "post", "post_dot", "mid", "multi"):
            getattr(self, name).update(getattr(other, name))


def _opt(obs: set[bool]) -> str:
    """'none' | 'all' | 'some' from the set of observed emptiness."""
    if obs == {False}:
        return "none"
    if obs == {True}:
        return "all"
    return "some"


class _Names:
    def __init__(self, taken: set[str] | None = None):
        self.taken = set(taken or ())

    def fresh(self, base: str) -> str:
        name, n = base, 1
        while name in self.taken:
            n += 1
            name = f"{base}{n}"
        self.taken.add(name)
        return name


@dataclass
class Templates:
    source: str
    target: str | None
    unless: list[str]
    groups: dict[int, str]  # regex group -> capture name


def variants(m: Match, target: str | None, seen: Seen | None, wild: str = "path", leaf: bool = False):
    """The templates for one regex alternative: one per way it was seen to match (at a name start,
    and/or inside a name, e.g. `encoder.layer.` in `decoder_encoder.layer.`)."""
    if seen is None or True not in seen.mid or m.anchored:
        return [templates(m, target, seen, wild, leaf=leaf)]
    out = [templates(m, target, seen, wild, frag=True, leaf=leaf)]
    if False in seen.mid:
        out.append(templates(m, target, seen, wild, leaf=leaf))
    return out


def templates(
    m: Match,
    target: str | None,
    seen: Seen | None,
    wild: str = "path",
    pre_name: str = "p",
    frag: bool = False,
    leaf: bool = False,
) -> Templates:
    """The source template (and target, and unless templates) for one regex alternative. `frag`:
    the match starts inside a name (a `{f}` capture holds the name's start). `leaf`: unseen, assume
    nothing follows the match (a converter's parameter name)."""
    names = _Names()
    real = [p for p in m.parts if p[0] in ("lit", "cap", "wild", "digits")]
    if not real and m.anchored and target is not None:
        # `^` (with lookaheads): prepend the target to every key not excluded
        rest = names.fresh("rest")
        unless = []
        for p in m.parts:
            if p[0] == "guard" and p[1] > 0:
                unless += [lit + ("{_r:path}" if lit.endswith(".") else ".{_r:path?}") for lit in p[2]]
        return Templates(f"{{{rest}:path}}", target_text(target, m, {}) + f"{{{rest}}}", unless, {})
    if not real:
        raise NotExpressible("a pattern that matches nothing but lookarounds")
    first, last = real[0], real[-1]
    pre_mode = "none" if m.anchored else (_opt(seen.pre) if seen and seen.pre else "some")
    if frag:
        pre_mode = "some"  # the name the match starts inside may be the key's first
    lead_dot = first[0] == "lit" and first[1].startswith(".")
    if lead_dot and pre_mode == "some":
        pre_mode = "all"  # a key never starts with a dot
    if last[0] == "cap" and last[2] == "path":
        post_mode, tail = "none", ""
    elif last[0] == "lit" and last[1].endswith("."):
        post_mode, tail = "all", "dot"
    elif last[0] == "lit" and last[1].endswith("_"):
        post_mode, tail = "all", "name"
    else:
        post_mode = _opt(seen.post) if seen and seen.post else ("none" if leaf else "some")
        tail = "word"
    one_seg = bool(seen and seen.multi == {False})

    pre = names.fresh(pre_name) if pre_mode != "none" else None
    groups: dict[int, str] = {}
    body_src = []
    wild_caps = []
    spans: dict[int, str] = {}  # group -> its text in target form (for `\1` of a structured group)
    open_at: dict[int, int] = {}
    for p in m.parts:
        if p[0] == "open":
            open_at[p[1]] = len(body_src)
            continue
        if p[0] == "close":
            spans[p[1]] = re.sub(r":[a-z?]+\}", "}", "".join(body_src[open_at[p[1]] :]))
            continue
        if p[0] == "digits":
            name = names.fresh("i")
            body_src.append(f"{{{name}:int}}")
            continue
        if p[0] == "lit":
            body_src.append(p[1])
        elif p[0] == "cap":
            name = names.fresh("i" if p[2] == "int" else "r")
            groups[p[1]] = name
            body_src.append(f"{{{name}:{p[2]}}}")
        elif p[0] == "wild":
            name = names.fresh("e" if wild == "int" else "x")
            wild_caps.append(name)
            body_src.append(f"{{{name}:{wild}}}")
    sep = "" if lead_dot else "."
    fname = names.fresh("f") if frag else None

    def pre_text(name: str | None, typed: bool) -> str:
        if frag:
            head = ""
            if name is not None:
                kind = "path" if pre_mode == "all" else "path?"
                head = (f"{{{name}:{kind}}}" if typed else f"{{{name}}}") + "."
            return head + f"{{{fname}}}"
        if name is None:
            return ""
        kind = "path" if pre_mode == "all" else "path?"
        return (f"{{{name}:{kind}}}" if typed else f"{{{name}}}") + sep

    rest = names.fresh("rest") if tail in ("dot", "word") and post_mode != "none" else None
    piece = names.fresh("name") if tail == "name" else None
    more = None
    if tail == "name" and seen and True in seen.post_dot:
        more = names.fresh("rest")

    def post_text(typed: bool) -> str:
        if tail == "dot":
            kind = "seg" if one_seg else "path"
            return f"{{{rest}:{kind}}}" if typed else f"{{{rest}}}"
        if tail == "word" and rest:
            kind = ("seg" if one_seg else "path") if post_mode == "all" else "path?"
            return f".{{{rest}:{kind}}}" if typed else f".{{{rest}}}"
        if tail == "name":
            out = f"{{{piece}:seg}}" if typed else f"{{{piece}}}"
            if more:
                out += f".{{{more}:path?}}" if typed else f".{{{more}}}"
            return out
        return ""

    source = pre_text(pre, True) + "".join(body_src) + post_text(True)
    tgt = None
    if target is not None:
        tgt = pre_text(pre, False) + target_text(target, m, groups, spans) + post_text(False)
        for w in wild_caps:
            if "{" + w + "}" not in tgt and wild == "path":
                raise NotExpressible("a '*' wildcard the target does not keep (several keys -> one key)")

    unless = []
    for k, p in enumerate(m.parts):
        if p[0] != "guard":
            continue
        _, direction, texts = p
        for lit in texts:
            unless.append(_guard(m, k, direction, lit, pre_mode, sep, tail, post_mode))
    return Templates(source, tgt, unless, groups)


def _guard(
    m: Match, k: int, direction: int, lit: str, pre_mode: str, sep: str, tail: str, post_mode: str
) -> str:
    """The `unless` template of one lookaround alternative: keys that have `lit` there."""
    names = _Names({"p", "rest"})
    before = m.parts[:k] if direction > 0 else []
    after = m.parts[k + 1 :] if direction < 0 else []
    if direction < 0 and any(p[0] != "guard" for p in m.parts[:k]):
        raise NotExpressible("a lookbehind after the start of a pattern")

    def render(parts) -> str:
        out = []
        for p in parts:
            if p[0] == "lit":
                out.append(p[1])
            elif p[0] == "cap":
                out.append(f"{{{names.fresh('_g')}:{p[2]}}}")
            elif p[0] == "wild":
                out.append(f"{{{names.fresh('_g')}:path}}")
        return "".join(out)

    head = ""
    if pre_mode != "none":
        kind = "path" if pre_mode == "all" else "path?"
        head = f"{{{names.fresh('_p')}:{kind}}}"
        if direction < 0:
            head += "" if lit.startswith(".") else "."
        else:
            head += sep
    if direction > 0:
        text = head + render(before) + lit
        tail_text = (
            f"{{{names.fresh('_r')}:path}}" if lit.endswith(".") else f".{{{names.fresh('_r')}:path?}}"
        )
        return text + tail_text
    text = head + lit + render(after)
    if tail == "dot":
        text += f"{{{names.fresh('_r')}:path}}"
    elif tail == "word" and post_mode != "none":
        text += f".{{{names.fresh('_r')}:path?}}"
    return text


# ---- whole transforms ----------------------------------------------------------------------------


def _ident(text: str, taken: set[str]) -> str:
    """A readable input name from a pattern: its last name-like segment that is not weight/bias."""
    segs = [s for s in re.split(r"[.*\\]+", text) if s and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", s)]
    segs = [s for s in segs if s not in ("weight", "bias")] or segs or ["x"]
    base = segs[-1]
    if base[0].isdigit():
        base = "x" + base
    name, n = base, 1
    while name in taken or name in _RESERVED:
        n += 1
        name = f"{base}{n}"
    taken.add(name)
    return name


_RESERVED = {
    "config",
    "true",
    "false",
    "rename",
    "convert",
    "drop",
    "let",
    "ops",
    "alias",
    "include",
    "unless",
}


def rename_rules(
    kind: str, sources: list[str], targets: list[str], seen: dict[int, Seen], keep: list[str] = ()
) -> list[str]:
    """DSL lines for a renaming transform (`kind` is rename or alias), one per source alternative.
    `keep`: templates of keys the rename must leave alone (transformers keeps them when loading
    because the model has them under their original name)."""
    lines = []
    for i, src in enumerate(sources):
        tgt = targets[i] if len(targets) == len(sources) else targets[0]
        for m in parse(preprocess(src)):
            for t in variants(m, tgt, seen.get(i)):
                line = f"{kind} {t.source} -> {t.target}"
                if t.unless or keep:
                    line += "\n  unless " + ", ".join([*t.unless, *keep])
                lines.append(line)
    return lines


def keep_guards(undone: list[str], kept: list[str]) -> list[str]:
    """Templates for the keys a rename must leave alone: by first segment where that separates them
    from the keys it renames, else the keys themselves."""
    out = []
    for first in sorted({k.split(".")[0] for k in undone}):
        if any(k == first or k.startswith(first + ".") for k in kept):
            out += sorted({k for k in undone if k == first or k.startswith(first + ".")})
        else:
            out.append(first + ".{_k:path?}")
    return out


def group_rename_rules(sources: list[str], targets: list[str], seen: dict[int, Seen]) -> list[str]:
    """GroupWeightRename applies one of its pairs per key; ordered renames do the same when no pair's
    output is another pair's input. Order them so (a -> b, b -> c) runs b -> c first."""
    pairs = list(zip(sources, targets, strict=True))
    order: list[int] = []
    pending = list(range(len(pairs)))
    while pending:
        for i in pending:
            out = pairs[i][1]
            # i must wait if its output would be picked up by a later (still pending) pair's source
            if not any(j != i and re.search(preprocess(pairs[j][0]), out.replace("\\", "")) for j in pending):
                order.append(i)
                pending.remove(i)
                break
        else:
            raise NotExpressible("GroupWeightRename pairs form a cycle")
    lines = []
    for i in order:
        lines += rename_rules("rename", [pairs[i][0]], [pairs[i][1]], {0: seen[i]} if i in seen else {})
    return lines


def convert_rule(sources: list[str], targets: list[str], ops: list, seen: dict[int, Seen]) -> str:
    """DSL text for a WeightConverter: one convert (two when it was seen matching both at a name
    start and inside a name), each with inputs, lets and one output per target."""
    merged = Seen()
    for s in seen.values():
        merged.merge(s)
    frags = [True, False] if merged.mid == {True, False} else [True] if merged.mid == {True} else [False]
    return "\n\n".join(_convert(sources, targets, ops, merged, f) for f in frags)


def _convert(sources: list[str], targets: list[str], ops: list, merged: Seen, frag: bool) -> str:
    wild = "int" if any(type(op).__name__ in _STACKING for op in ops) else "path"
    src_t, taken = [], set()
    for src in sources:
        alts = parse(preprocess(src))
        if len(alts) != 1:
            raise NotExpressible(f"converter source {src!r} is an alternation")
        src_t.append(
            templates(alts[0], None, merged if merged.pre else None, wild=wild, frag=frag, leaf=True)
        )
        if src_t[-1].unless:
            raise NotExpressible(f"converter source {src!r} has a lookaround")
    tgt_t = []
    for tgt in targets:
        alts = parse(preprocess(tgt.replace("\\.", ".")))
        # a target is text; use the first source's prefix/suffix shape
        tgt_t.append(_target_like(src_t[0], alts[0], tgt))
    names = [_ident(s, taken) for s in sources]
    lets: list[str] = []
    values = [(src, name) for src, name in zip(sources, names, strict=True)]  # (label, expression)
    counter = [0]

    def fresh() -> str:
        counter[0] += 1
        return f"v{counter[0]}"

    for op in ops:
        kind = type(op).__name__
        if kind == "MergeModulelist":
            dim = f", dim={op.dim}" if op.dim else ""
            values = [(lbl, f"stack({e}, over=e{dim})") for lbl, e in values]
        elif kind == "Concatenate":
            if op.num_shards_attribute:
                raise NotExpressible(
                    f"Concatenate over config.{op.num_shards_attribute} parts of one collection"
                )
            values = [(targets[0], f"cat({', '.join(e for _, e in values)}, dim={op.dim}, equal=true)")]
        elif kind == "Chunk":
            if op.num_shards_attribute:
                raise NotExpressible(f"Chunk into config.{op.num_shards_attribute} keys")
            (_, e), n = values[0], len(targets)
            if len(values) != 1:
                raise NotExpressible("Chunk of several tensors")
            outs = [fresh() for _ in range(n)]
            lets.append(f"  let {', '.join(outs)} = chunk({e}, {n}, dim={op.dim})")
            values = list(zip(targets, outs, strict=True))
        elif kind == "Split":
            names_ = [
                re.sub(r"\\.", ".", t).split(".")[-2 if t.endswith(("weight", "bias")) else -1]
                for t in targets
            ]
            if len(values) != 1 or names_ != ["q_proj", "k_proj", "v_proj"]:
                raise NotExpressible(
                    "Split reads its sizes from the model's parameters; write split(sizes=[...])"
                )
            # transformers' Split sizes each part like the model's q/k/v parameter: from the config
            h = "(config.text_config.num_attention_heads ?? config.num_attention_heads)"
            kv = f"(config.text_config.num_key_value_heads ?? config.num_key_value_heads ?? {h})"
            d = f"(config.text_config.head_dim ?? config.head_dim ?? (config.text_config.hidden_size ?? config.hidden_size) // {h})"
            outs = [fresh() for _ in range(3)]
            lets.append(
                f"  let {', '.join(outs)} = split({values[0][1]}, dim={op.dim}, sizes=[{h} * {d}, {kv} * {d}, {kv} * {d}])"
            )
            values = list(zip(targets, outs, strict=True))
        elif kind == "Transpose":
            # check_dims=True: transformers transposes only when the checkpoint's shape differs from
            # the model's, so it loads a square original tensor untransposed. A spec says what the
            # original layout is: it always transposes (library.py notes this in the spec's header)
            values = [(lbl, f"transpose({e}, dim0={op.dim0}, dim1={op.dim1})") for lbl, e in values]
        elif kind == "Interleave":
            fn = "interleave" if op.inverse else "deinterleave"
            values = [(lbl, f"{fn}({e}, dim={op.dim})") for lbl, e in values]
        elif kind == "PermuteForRope":
            heads = "config.num_attention_heads ?? 1"
            if op.subconfig_key:
                heads = f"config.{op.subconfig_key}.num_attention_heads ?? {heads}"
            fn = "unpermute_rope" if op.inverse else "permute_rope"
            names_ = op.permute_layer_names
            values = [
                (lbl, f"{fn}({e}, heads={heads})" if names_ is None or any(n in lbl for n in names_) else e)
                for lbl, e in values
            ]
        elif kind == "ErnieFuseAndSplitTextVisionExperts":
            n = len(targets)
            parts = []
            for _, e in values:
                outs = [fresh() for _ in range(n)]
                # each half of the experts (text, vision) stacked on its own: they may differ in shape
                lets.append(f"  let {', '.join(outs)} = stack({e}, over=e, dim={op.stack_dim}, parts={n})")
                parts.append(outs)
            values = [
                (targets[i], f"cat({', '.join(p[i] for p in parts)}, dim={op.concat_dim}, equal=true)")
                if len(parts) > 1
                else (targets[i], parts[0][i])
                for i in range(n)
            ]
        else:
            raise NotExpressible(f"op {kind} has no convspec equivalent")
    if len(values) != len(targets):
        raise NotExpressible(f"{len(values)} values for {len(targets)} targets")
    lines = []
    for i, (t, name) in enumerate(zip(src_t, names, strict=True)):
        head = "convert " if i == 0 else " " * 8
        lines.append(f"{head}{name} = {t.source}" + ("," if i < len(src_t) - 1 else ""))
    lines += lets
    for tt, (_, e) in zip(tgt_t, values, strict=True):
        lines.append(f"  -> {tt} = {e}")
    return "\n".join(lines)


_STACKING = ("MergeModulelist", "ErnieFuseAndSplitTextVisionExperts")


def _target_like(src: Templates, tgt: Match, raw: str) -> str:
    """A converter target with the source's prefix and suffix captures around its text."""
    text = target_text(raw, tgt, src.groups)
    m = re.match(r"^(\{p(?::[a-z?]+)?\}\.?)?(\{f\})?", src.source)
    head = ""
    if m.group(1):
        head = "{p}" + ("." if m.group(1).endswith(".") and (m.group(2) or not text.startswith(".")) else "")
    if m.group(2):
        head += "{f}"
    tail = ""
    mt = re.search(r"(\.?\{(rest|name)\d*:[a-z?]+\}(\.\{rest\d*:[a-z?]+\})?)$", src.source)
    if mt:
        tail = re.sub(r":[a-z?]+\}", "}", mt.group(1))
        if text.endswith(".") and tail.startswith("."):
            tail = tail[1:]
    return head + text + tail

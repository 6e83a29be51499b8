"""Spec synthesis: from a source layout and a target layout (keys, shapes, dtypes), the spec that maps
one to the other, cheapest explanation first (renames, stacks, concatenations, transposes), proved by
binding it both ways; what it cannot explain is reported, never guessed. `convspec infer`.

Modules: `names` (templates, which names are alike), `search` (the steps), `data` (choices a
checkpoint pair's tensors decide); here `infer`, the proof, the layouts it reads, and `compare`."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .data import (  # noqa: F401
    decide,
)
from .names import (  # noqa: F401
    MAX_NAME_PAIRS,
    NUMBER,
    SLOT,
    Layout,
    Template,
)
from .search import (  # noqa: F401
    Synthesis,
    configured,
    fold_paths,
    search,
)

MAX_LAYOUT_BYTES = 256 << 20  # a layout file of 10^6 keys is ~100 MB


@dataclass
class Inferred:
    """What `infer` made: the spec (canonical YAML, each rule with how many keys it explains), what
    the search found and left, and the proof on the layouts it was made from."""

    spec: str
    found: Synthesis
    proof: Proof
    source_keys: int
    target_keys: int
    source_layout: Layout = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        """Every key explained, and the spec binds both ways exactly."""
        return self.proof.ok and not self.found.unexplained_source and not self.found.unexplained_target

    def to_dict(self) -> dict:
        f = self.found
        return {
            "ok": self.ok,
            "source_keys": self.source_keys,
            "target_keys": self.target_keys,
            "unchanged": f.unchanged,
            "rules": [{"kind": r.kind, "keys": r.keys} for r in f.rules],
            "unexplained_source": grouped(f.unexplained_source),
            "unexplained_target": grouped(f.unexplained_target),
            "questions": f.questions,
            "decided": f.decided,
            "proof": {
                "forward": self.proof.forward,
                "inverse": self.proof.inverse,
                "error": self.proof.error,
            },
            "spec": self.spec,
        }


def grouped(layout: Layout) -> list[dict]:
    """Keys by template and shape, as `check` groups the keys no rule claims."""
    out: dict[tuple, list[str]] = defaultdict(list)
    for key, (shape, dtype) in layout.items():
        t = ".".join(SLOT if NUMBER.fullmatch(s) else s for s in key.split("."))
        out[(t, tuple(shape), dtype)].append(key)
    return [
        {"template": t, "shape": list(shape), "dtype": dtype, "keys": len(keys), "first": keys[0]}
        for (t, shape, dtype), keys in sorted(out.items())
    ]


def infer(source, target, *, name: str = "inferred", config=None) -> Inferred:
    """The spec that maps the layout `source` to `target` (each a {key: (shape, dtype)} dict, a layout
    .json file or a checkpoint), proved by binding it both ways on them; see docs/synthesis.md. With
    `config` (a dict or a config.json), the sizes and head counts it names are written with its names.

    Example:
        >>> src = {f"model.layers.0.experts.{e}.w1.weight": ((8, 4), "float32") for e in range(2)}
        >>> dst = {"model.layers.0.experts.w1": ((2, 8, 4), "float32")}
        >>> r = convspec.infer(src, dst)
        >>> r.ok, [rule.kind for rule in r.found.rules]
        (True, ['stack'])
    """
    from ..io.checkpoint import Checkpoint
    from ..io.config import load_config
    from ..spec.format import format_text

    config = load_config(config)
    source, target = _opened(source), _opened(target)  # a checkpoint's headers are read once
    src, dst = layout_of(source), layout_of(target)
    found = search(src, dst)
    if isinstance(source, Checkpoint) and isinstance(target, Checkpoint):
        decide(found, source, target)
    if config:
        configured(found, config)
    text = format_text(found.spec_text(name), f"{name}.yaml")
    proof = prove(text, src, dst, config)
    folded = fold_paths(found, src, dst) if proof.ok else None
    if folded is not None:  # fewer rules, kept only where they prove as the many did
        folded_text = format_text(folded.spec_text(name), f"{name}.yaml")
        folded_proof = prove(folded_text, src, dst, config)
        if folded_proof.ok:
            found, text, proof = folded, folded_text, folded_proof
    return Inferred(text, found, proof, len(src), len(dst), src)


@dataclass
class Proof:
    """The synthesized spec bound both ways on the layouts it was made from: what differs, if anything."""

    forward: list[str]
    inverse: list[str]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.forward or self.inverse or self.error)


def prove(text: str, source: Layout, target: Layout, config: dict | None = None) -> Proof:
    """Compile the spec (with the config its `config.*` sizes read) and bind it: the source must give
    exactly the target (keys, shapes, dtypes), and the inverse the source."""
    from .. import api
    from ..errors import ConvspecError
    from ..spec import parse_spec

    try:
        plan = api.compile(parse_spec(text, "inferred.yaml"), config=config)
        fwd = plan.bind(source).outputs
        inv = plan.inverse().bind(target).outputs
    except ConvspecError as exc:
        return Proof([], [], exc.render().splitlines()[0])
    return Proof(_differ(fwd, target), _differ(inv, source))


def _differ(got: dict, want: Layout, limit: int = 5) -> list[str]:
    out = [f"missing {k}" for k in want if k not in got][:limit]
    out += [f"extra {k}" for k in got if k not in want][:limit]
    out += [
        f"{k}: {list(got[k][0])} {got[k][1]}, want {list(want[k][0])} {want[k][1]}"
        for k in want
        if k in got and (tuple(got[k][0]), got[k][1]) != (tuple(want[k][0]), want[k][1])
    ][:limit]
    return out


def layout_of(source) -> Layout:
    """A layout from a dict (as it is), a layout `.json` file (`{key: [shape, dtype]}`, checked key by
    key), or a checkpoint (a directory or a file: its headers, no data)."""
    from ..io.checkpoint import Checkpoint

    if isinstance(source, dict):
        return {k: (tuple(v[0]), v[1]) for k, v in source.items()}
    if isinstance(source, Checkpoint):
        return {k: (tuple(v.shape), v.dtype) for k, v in source.layout.items()}
    path = Path(source)
    if path.suffix == ".json" and path.is_file():
        return _layout_file(path)
    from ..io.formats import open_checkpoint

    return {k: (tuple(v.shape), v.dtype) for k, v in open_checkpoint(path).layout.items()}


def _layout_file(path: Path) -> Layout:
    from ..dtypes import DTYPES
    from ..errors import ConfigError
    from ..io.sidefile import load_json

    data = load_json(path, MAX_LAYOUT_BYTES, ConfigError, "layout file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a layout is a JSON object of key -> [shape, dtype]")
    out = {}
    for key, v in data.items():
        ok = (
            isinstance(v, list)
            and len(v) == 2
            and isinstance(v[0], list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v[0])
            and v[1] in DTYPES
        )
        if not ok:
            raise ConfigError(
                f"{path}: {key!r}: {json.dumps(v)[:80]} is not [shape, dtype]",
                hint='e.g. "model.embed.weight": [[32000, 4096], "bfloat16"]',
            )
        out[key] = (tuple(v[0]), v[1])
    return out


def _opened(x):
    """A checkpoint opened (its tensors can decide what shapes cannot); a dict or a layout file as is."""
    if isinstance(x, dict) or not Path(x).exists() or (Path(x).suffix == ".json" and Path(x).is_file()):
        return x
    from ..io.formats import open_checkpoint

    return open_checkpoint(Path(x))


def routes(plan, layout: Layout) -> dict[str, frozenset]:
    """Where each source key goes under `plan`, from headers: a renamed or unchanged key its new
    name; a key a convert moves, the byte ranges it fills in which outputs (so parts joined in
    another order differ); one a convert computes from, the outputs it is part of."""
    from ..blocks import block_runs

    bound = plan.bind(layout)
    out: dict[str, frozenset] = {k: frozenset([v]) for k, v in bound.passthrough.items()}
    for g in bound.groups:
        runs = block_runs(bound, g, 0)
        placed: dict[str, set] = defaultdict(set)
        for output, rs in (runs or {}).items():
            for run in rs:
                placed[run.source].add((output, run.src, run.dst, run.size))
        for members in g.members.values():
            for key in members.values():
                out[key] = frozenset(placed[key]) if runs is not None else frozenset(g.outputs)
    return out


def compare(text: str, other, layout: Layout, config=None) -> list[str]:
    """Where the synthesized spec and `other` (a compiled plan) behave differently on `layout`: each
    source key that goes elsewhere, or nowhere under one of them. Text may differ freely."""
    from .. import api
    from ..spec import parse_spec

    ours = routes(api.compile(parse_spec(text, "inferred.yaml"), config=config), layout)
    theirs = routes(other, layout)
    diffs = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if a != b:
            diffs.append(f"{key}: inferred -> {_where(a)}; the spec -> {_where(b)}")
    return diffs


def _where(route: frozenset | None) -> str:
    if route is None:
        return "dropped"
    return ", ".join(
        sorted({x if isinstance(x, str) else f"{x[0]}[bytes {x[2]}..{x[2] + x[3]}]" for x in route})
    )

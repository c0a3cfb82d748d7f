"""Node type → (executor kind, factory), by explicit registration only.

A manifest names node types; the registry maps each to a registered class.
Nothing named by a manifest is ever imported. A manifest node's `executor`
field wins over the class default where the class allows it.

The registry knows nothing of where classes come from: the default one (the
built-in `nodes` package plus plugins) is assembled by engine.catalog, the
composition root, so that importing the registry never imports the nodes.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import fastjsonschema
import jsonschema

from .node import Node, ParamUnavailable

if TYPE_CHECKING:
    from .composite import CompositeType

ExecutorKind = Literal["native", "multiprocess", "wasm", "remote", "ray"]
#: what a manifest may move an overridable node type between
OVERRIDABLE_KINDS = ("native", "multiprocess")
SourceKind = Literal["builtin", "test", "entry_point", "module", "registered"]


@dataclass(frozen=True)
class NodeSource:
    """Where a node type came from, as `remotemedia-engine nodes` lists it."""

    kind: SourceKind = "registered"
    #: the entry point's name, or the module's for a runtime.toml module
    name: str = ""
    #: the installed distribution that declares the entry point
    distribution: str = ""
    #: the entry point's value (`pkg.module:Class`)
    value: str = ""

    def __str__(self) -> str:
        if self.kind == "entry_point":
            dist = f" ({self.distribution})" if self.distribution else ""
            return f"entry point {self.name}{dist}"
        if self.kind == "module":
            return f"module {self.name} (runtime.toml)"
        return {"builtin": "built-in", "test": "built-in (test nodes)"}.get(self.kind, self.kind)

    def describe(self) -> dict[str, str]:
        out = {"kind": self.kind}
        out.update({k: v for k, v in (("name", self.name), ("distribution", self.distribution),
                                      ("value", self.value)) if v})
        return out


REGISTERED = NodeSource()


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that did not load: reported at start-up and by `nodes`; the rest still load."""

    source: NodeSource
    error: str  # "ModuleNotFoundError: No module named 'x'"

    def __str__(self) -> str:
        return f"{self.source}: {self.error}"

    def describe(self) -> dict[str, Any]:
        return {"name": self.source.name, "source": self.source.describe(), "error": self.error}


@dataclass(frozen=True)
class NodeTypeSpec:
    node_type: str
    cls: type[Node]
    executor: ExecutorKind
    overridable: bool
    module: str
    qualname: str
    params_validator: Any = field(repr=False)  # jsonschema validator (full error lists)
    params_fast: Any = field(repr=False)  # compiled fastjsonschema (the fast path)
    defaults: MappingProxyType = field(repr=False, default_factory=lambda: MappingProxyType({}))
    source: NodeSource = REGISTERED
    #: the params its schema names (camelCase spellings of these are accepted)
    params_known: frozenset[str] = frozenset()

    def accepts_executor(self, requested: str) -> bool:
        """Whether a manifest may ask for `requested` for this node type."""
        if requested == "ray":  # an actor is a process of its own: any node that may run in one
            return self.executor == "multiprocess" or self.overridable
        return requested == self.executor or (self.overridable and requested in OVERRIDABLE_KINDS)

    def resolve_executor(self, requested: str | None) -> ExecutorKind:
        if requested == "ray" and self.accepts_executor(requested):
            return "ray"
        if requested is None or not self.overridable:
            return self.executor
        return "multiprocess" if requested == "multiprocess" else "native"

    def normalize_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Canonical spelling (aliases, camelCase of a known param) and defaults
        (the operator's, then the schema's), without validation. Params the
        class declares `inert` are left out (see inert_params)."""
        out = canonical_params(params, self.cls.param_aliases, self.params_known)
        for key in self.cls.inert_params:
            out.pop(key, None)
        for key, value in self.defaults.items():
            out.setdefault(key, value)
        return out

    def inert_params(self, params: dict[str, Any]) -> list[str]:
        """The params of `params` that mean nothing on this server (accepted, left out)."""
        return sorted(k for k in canonical_params(params, self.cls.param_aliases, self.params_known)
                      if k in self.cls.inert_params)

    def unavailable(self, params: dict[str, Any]) -> str | ParamUnavailable | None:
        """Why this node cannot run here with `params` (a model or package missing), or None."""
        return self.cls.unavailable(params)

    def describe(self) -> dict[str, Any]:
        """What `remotemedia-engine nodes --json` lists for this node type."""
        doc = (self.cls.__doc__ or "").strip()
        return {
            "node_type": self.node_type,
            "executor": self.executor,
            "executor_overridable": self.overridable,
            "input_types": [k.name.lower() for k in self.cls.input_types],
            "output_types": [k.name.lower() for k in self.cls.output_types],
            "source": self.source.describe(),
            "class": f"{self.module}:{self.qualname}",
            "description": doc.splitlines()[0] if doc else "",
            "params_schema": self.cls.params_schema,
        }


_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")


def snake_case(key: str) -> str:
    return _CAMEL.sub(lambda m: "_" + m.group(1).lower(), key)


def canonical_params(params: dict[str, Any], aliases: dict[str, str], known: frozenset[str]) -> dict[str, Any]:
    """`params` with each key in its canonical spelling: an alias's target, or
    the snake_case form of a camelCase key when that is a known param (existing
    clients write `minSpeechDurationMs` for `min_speech_duration_ms`). A key
    given in both spellings keeps the snake_case value."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = aliases.get(key) or (snake if (snake := snake_case(key)) in known else key)
        if name in out and name == key:
            out[name] = value
        else:
            out.setdefault(name, value)
    return out


def unimportable(cls: type[Node]) -> str:
    """Why a node process, which imports a node class by its module's name and its own,
    cannot import `cls`, with how to make it importable; "" when it can."""
    name = cls.__qualname__
    if cls.__module__ == "__main__":
        return (f"{name} is defined in __main__ (the script being run), which a node process cannot "
                f"import: move the class into a module beside the script (say mynodes.py) and "
                f"`from mynodes import {cls.__name__}`")
    if "<locals>" in name:
        return (f"{name} is defined inside a function, where a node process cannot find it: define it at "
                f"the top level of {cls.__module__}")
    return ""


class ExecutorRegistry:
    def __init__(self) -> None:
        self._specs: dict[str, NodeTypeSpec] = {}
        #: composite node types (engine.composite); a stand-in shares its name with a class
        self._composites: dict[str, CompositeType] = {}
        #: plugins that did not load (see engine.catalog); their node types are absent
        self.failures: list[PluginFailure] = []

    def register(self, cls: type[Node], *, node_type: str | None = None,
                 executor: ExecutorKind | None = None, source: NodeSource = REGISTERED) -> NodeTypeSpec:
        name = node_type or cls.node_type
        if not name:
            raise ValueError(f"{cls.__qualname__} declares no node_type")
        kind: ExecutorKind = executor or ("multiprocess" if cls.multiprocess else "native")
        not_importable = unimportable(cls)
        if kind == "multiprocess" and not_importable:
            raise ValueError(f"{not_importable}; or register it with executor='native' to run it in this process")
        schema = cls.params_schema
        jsonschema.Draft7Validator.check_schema(schema)
        defaults = {
            k: v["default"]
            for k, v in schema.get("properties", {}).items()
            if isinstance(v, dict) and "default" in v
        }
        spec = NodeTypeSpec(
            node_type=name,
            cls=cls,
            executor=kind,
            overridable=cls.executor_overridable and not not_importable,
            module=cls.__module__,
            qualname=cls.__qualname__,
            params_validator=jsonschema.Draft7Validator(schema),
            params_fast=fastjsonschema.compile(schema),
            defaults=MappingProxyType(defaults),
            source=source,
            params_known=frozenset(schema.get("properties", {})),
        )
        self._specs[name] = spec
        return spec

    def set_defaults(self, node_type: str, params: dict[str, Any]) -> None:
        """The operator's params for every node of `node_type` (runtime.toml
        `[node_params.TYPE]`): defaults that a manifest's own params override."""
        spec = self._specs[node_type]
        given = canonical_params(params, spec.cls.param_aliases, spec.params_known)
        self._specs[node_type] = replace(spec, defaults=MappingProxyType({**spec.defaults, **given}))

    def get(self, node_type: str) -> NodeTypeSpec | None:
        return self._specs.get(node_type)

    def add_composite(self, comp: CompositeType) -> None:
        self._composites[comp.node_type] = comp

    def composite(self, node_type: str) -> CompositeType | None:
        return self._composites.get(node_type)

    def composites(self) -> list[CompositeType]:
        return [self._composites[k] for k in sorted(self._composites)]

    def __contains__(self, node_type: str) -> bool:
        return node_type in self._specs or node_type in self._composites

    def names(self) -> list[str]:
        """Every node type a manifest may name: classes and composites."""
        return sorted({*self._specs, *self._composites})

    def specs(self) -> list[NodeTypeSpec]:
        return [self._specs[name] for name in sorted(self._specs)]

    def suggest(self, node_type: str, n: int = 3) -> list[str]:
        lower = {k.lower(): k for k in self.names()}
        hits = difflib.get_close_matches(node_type.lower(), list(lower), n=n, cutoff=0.5)
        return [lower[h] for h in hits]

    def multiprocess_modules(self) -> list[str]:
        return sorted({s.module for s in self._specs.values()
                       if s.executor == "multiprocess" or s.overridable})


"""The composition root of node types: the default registry, assembled.

Sources, in order (a node type already taken is refused, never replaced):

1. the built-in `nodes` package (and its test nodes when enabled), and the
   WASM executor's `WasmNode`;
2. node plugins: the `Node` classes that installed distributions declare in
   the `remotemedia.nodes` entry-point group (runtime.toml
   `[nodes] entry_points = false` turns this off);
3. the modules runtime.toml `[nodes] modules` names: each registers every
   `Node` subclass defined in it (not merely imported into it) that declares
   a node_type.

The operator's environment and configuration choose what code loads; a
manifest only names node types. A plugin that fails (import error, not a
Node subclass, a node type that is taken, a bad params schema) is logged with
its name and error and kept in `registry.failures`; the rest still load.

Built here and not in engine.registry so that importing the registry never
imports the nodes: `nodes` imports `engine`, and a node process should load
only what its node needs.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
from types import ModuleType

from . import composite
from .config import RuntimeConfig
from .errors import InternalError
from .executors.wasm.node import WasmNode
from .node import Node
from .registry import ExecutorRegistry, NodeSource, PluginFailure

log = logging.getLogger("engine.catalog")

ENTRY_POINT_GROUP = "remotemedia.nodes"
BUILTIN = NodeSource("builtin")
TEST = NodeSource("test")


class ShadowedNodesPackageError(InternalError):
    """Another module named `nodes` (often the app's own nodes.py) hides the
    built-in node package."""


def default_registry(config: RuntimeConfig | None = None, *, test_nodes: bool | None = None,
                     ) -> ExecutorRegistry:
    """The built-in node types, plus the plugins `config` allows.

    `test_nodes` overrides `config.test_nodes` (the nodes for tests and benchmarks).
    """
    cfg = config if config is not None else RuntimeConfig()
    registry = ExecutorRegistry()
    builtins = builtin_package()
    for cls in builtins.builtin_nodes():
        registry.register(cls, source=BUILTIN)
    registry.register(WasmNode, executor="wasm", source=BUILTIN)
    if cfg.test_nodes if test_nodes is None else test_nodes:
        for cls in builtins.test_nodes():
            registry.register(cls, source=TEST)
    if cfg.nodes.entry_points:
        load_entry_points(registry)
    for module in cfg.nodes.modules:
        load_module(registry, module)
    for node_type, params in cfg.node_params.items():
        if registry.get(node_type) is None:
            registry.failures.append(PluginFailure(NodeSource("module", f"[node_params.{node_type}]"),
                                                   f"no registered node type {node_type!r}"))
        else:
            spec = registry.get(node_type)
            problems = [e.message for e in spec.params_validator.iter_errors(
                spec.normalize_params(params)) if e.validator != "required"]
            if problems:
                registry.failures.append(PluginFailure(NodeSource("module", f"[node_params.{node_type}]"),
                                                       "; ".join(problems)))
            else:
                registry.set_defaults(node_type, params)
    load_composites(registry, cfg)
    for failure in registry.failures:
        log.warning("node plugin %s did not load: %s", failure.source, failure.error)
    return registry


def builtin_package() -> ModuleType:
    """The built-in `nodes` package, or a ShadowedNodesPackageError naming what hides it."""
    import nodes

    # `nodes` is a common name: a nodes.py beside the app's script (the
    # script's folder comes first on sys.path) or a package of that name
    # imports in place of ours, and without this check fails far from the cause
    # with "module 'nodes' has no attribute 'builtin_nodes'".
    if getattr(nodes, "REMOTEMEDIA_BUILTIN_NODES", False) is not True:
        where = getattr(nodes, "__file__", None) or ", ".join(getattr(nodes, "__path__", [])) or repr(nodes)
        raise ShadowedNodesPackageError(
            f"the module 'nodes' imported from {where} is not remotemedia-engine's built-in "
            f"node package: it hides it. Rename {where} (e.g. to my_nodes.py) and import your "
            "node classes under the new name.",
            context={"path": where},
        )
    return nodes


def load_composites(registry: ExecutorRegistry, cfg: RuntimeConfig) -> None:
    """The built-in stand-ins, then runtime.toml's `[composites]` (same name: the operator's wins)."""
    defined = [(name, data, "built-in") for name, data in composite.builtin_definitions().items()
               if name not in cfg.composites]
    defined += [(name, data, "runtime.toml") for name, data in cfg.composites.items()]
    for name, data, where in defined:
        source = NodeSource("module", f"[composites.{name}] ({where})")
        comp, problems = composite.parse(name, data, where)
        if comp is not None:
            comp, problems = composite.check(comp, registry)
        if comp is not None and registry.get(name) is not None and not (comp.stand_in or comp.override):
            problems = [f"node type {name!r} is a registered class; set stand_in = true to serve it only "
                        "where that class cannot run, or override = true to serve it always"]
        if comp is None or problems:
            registry.failures.append(PluginFailure(source, "; ".join(problems)))
            continue
        registry.add_composite(comp)


def load_entry_points(registry: ExecutorRegistry) -> None:
    """Register each class of the `remotemedia.nodes` entry-point group."""
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in sorted(eps, key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else ""
        source = NodeSource("entry_point", ep.name, dist, ep.value)
        try:
            cls = ep.load()
        except Exception as exc:  # any import-time failure of a plugin is the plugin's, not ours
            registry.failures.append(PluginFailure(source, _describe(exc)))
            continue
        if add_plugin(registry, cls, source) and cls.node_type != ep.name:
            log.warning("entry point %s (%s) registers node type %r: name the entry point after "
                        "the class's node_type", ep.name, dist or "?", cls.node_type)


def load_module(registry: ExecutorRegistry, name: str) -> None:
    """Register every Node subclass defined in module `name` that declares a node_type."""
    source = NodeSource("module", name)
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        registry.failures.append(PluginFailure(source, _describe(exc)))
        return
    classes = [obj for obj in vars(module).values()
               if inspect.isclass(obj) and issubclass(obj, Node) and obj.__module__ == module.__name__
               and obj.node_type]
    if not classes:
        registry.failures.append(PluginFailure(
            source, "defines no Node subclass with a node_type (classes imported into it do not count)"))
    for cls in classes:
        add_plugin(registry, cls, source)


def add_plugin(registry: ExecutorRegistry, cls: object, source: NodeSource) -> bool:
    """Register one plugin class; a failure is recorded, not raised."""
    if not (inspect.isclass(cls) and issubclass(cls, Node)):
        registry.failures.append(PluginFailure(
            source, f"TypeError: {cls!r} is not a subclass of engine.Node"))
        return False
    if not cls.node_type:
        registry.failures.append(PluginFailure(source, f"{cls.__qualname__} declares no node_type"))
        return False
    taken = registry.get(cls.node_type)
    if taken is not None:
        registry.failures.append(PluginFailure(
            source, f"node type {cls.node_type!r} is already registered by {taken.source} "
                    f"({taken.module}:{taken.qualname}); give the class another node_type"))
        return False
    try:
        registry.register(cls, source=source)
    except Exception as exc:  # a bad params schema, a class registry.register refuses
        registry.failures.append(PluginFailure(source, _describe(exc)))
        return False
    log.debug("node type %s from %s", cls.node_type, source)  # every CLI command loads them: not news
    return True


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"

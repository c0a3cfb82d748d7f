"""docs/nodes.md: every built-in node type and its params, from the params schemas.

    python scripts/gen_node_docs.py          # rewrites docs/nodes.md
    remotemedia-engine nodes --markdown      # the same page, for any configured node set

tests/test_node_docs.py fails when docs/nodes.md is not what this renders.
"""

from __future__ import annotations

from typing import Any

HEADER = """# Node reference

Every built-in node type, its data types and its params, generated from the
node classes' params schemas by `python scripts/gen_node_docs.py` (do not edit
by hand; `tests/test_node_docs.py` checks it is current). `remotemedia-engine
nodes` lists the node types a configured server loads, plugins included.

Params go in a manifest node's `params` object; the aliases (camelCase names
other RemoteMedia runtimes use) are accepted too.
"""


def _type(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return "one of " + ", ".join(f"`{v}`" for v in prop["enum"])
    kind = prop.get("type", "any")
    kind = " or ".join(kind) if isinstance(kind, list) else kind
    lo = prop.get("minimum", prop.get("exclusiveMinimum"))
    hi = prop.get("maximum", prop.get("exclusiveMaximum"))
    num = lambda v: f"{v:,}".replace(",", "_")  # noqa: E731
    if lo is not None and hi is not None:
        left = "(" if "exclusiveMinimum" in prop else "["
        right = ")" if "exclusiveMaximum" in prop else "]"
        kind += f" {left}{num(lo)}, {num(hi)}{right}"
    elif lo is not None:
        kind += f" {'>' if 'exclusiveMinimum' in prop else '≥'} {num(lo)}"
    elif hi is not None:
        kind += f" {'<' if 'exclusiveMaximum' in prop else '≤'} {num(hi)}"
    if "minLength" in prop:
        kind += f", ≥ {prop['minLength']} chars"
    return kind


def _default(prop: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in prop:
        return "—"
    value = prop["default"]
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if len(value) < 40 else f'"{value}"'
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_spec(spec: Any) -> str:
    cls = spec.cls
    doc = (cls.__doc__ or "").strip()
    lines = [f"## {spec.node_type}", ""]
    if doc:
        lines += [doc.split("\n\n")[0].replace("\n", " "), ""]
    kinds = lambda ks: ", ".join(k.name.lower() for k in ks)  # noqa: E731
    executor = spec.executor + ("" if spec.overridable else " (fixed)")
    lines += [f"- executor: {executor}", f"- input → output: {kinds(cls.input_types)} → {kinds(cls.output_types)}",
              f"- class: `{spec.module}:{spec.qualname}`"]
    aliases = getattr(cls, "param_aliases", {}) or {}
    schema = cls.params_schema or {}
    props = schema.get("properties", {})
    required = set(schema.get("required", ()))
    if not props:
        lines += ["", "No params" + (" (any given are passed through)." if schema.get("additionalProperties", True)
                                     else ".")]
        return "\n".join(lines) + "\n"
    lines += ["", "| param | type | default | meaning |", "|---|---|---|---|"]
    for name, prop in props.items():
        names = f"`{name}`" + "".join(f"<br>`{a}`" for a, t in aliases.items() if t == name)
        lines.append(f"| {names} | {_cell(_type(prop))} | {_cell(_default(prop, name in required))} | "
                     f"{_cell(prop.get('description', ''))} |")
    return "\n".join(lines) + "\n"


def render(registry: Any, *, builtin_only: bool = True) -> str:
    specs = [s for s in registry.specs() if not builtin_only or s.source.kind == "builtin"]
    toc = [f"- [{s.node_type}](#{s.node_type.lower()})" for s in specs]
    return "\n".join([HEADER, *toc, "", *(render_spec(s) for s in specs)])


__all__ = ["render", "render_spec"]

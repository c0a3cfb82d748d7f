"""WASM modules: where a WasmNode's module comes from, and its compiled form.

A module is named by a file inside the operator's `[wasm] modules_dir` (a
plain file name: never a path, never outside that directory, not through a
link) or, where the operator allows it, sent inline in the manifest. It is
compiled once per engine for each set of limits (the limits are part of an
Extism compiled plugin) and kept by its content hash, so a second session,
or a second node, running the same module only instantiates it.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import WasmSettings
from ...errors import Issue

#: WebAssembly's binary magic and version 1
WASM_MAGIC = b"\0asm\x01\0\0\0"
#: a WebAssembly memory page
PAGE_BYTES = 64 * 1024


class ModuleError(Exception):
    """A module that cannot be used; `field` is the WasmNode param at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one instance may use: per-call time and memory."""

    timeout_ms: int
    max_memory_mb: int

    @property
    def max_pages(self) -> int:
        return self.max_memory_mb * (1 << 20) // PAGE_BYTES


@dataclass(frozen=True)
class ModuleSource:
    wasm: bytes
    sha256: str
    #: how errors name it: the file name, or "inline module"
    label: str


class ModuleStore:
    """Resolves, bounds and compiles modules; thread-safe (compiling runs off the loop)."""

    def __init__(self, settings: WasmSettings) -> None:
        self.settings = settings
        self._compiled: collections.OrderedDict[tuple[str, Limits], Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        #: compilations done (a second session reusing a module adds none)
        self.compilations = 0

    # ------------------------------------------------------------ params

    def limits(self, params: Mapping[str, Any]) -> Limits:
        s = self.settings
        timeout = params.get("timeout_ms") or s.timeout_ms
        memory = params.get("max_memory_mb") or s.memory_mb
        if timeout > s.max_timeout_ms:
            raise ModuleError("timeout_ms", f"timeout_ms={timeout} exceeds the operator's cap "
                              f"[wasm] max_timeout_ms={s.max_timeout_ms}")
        if memory > s.max_memory_mb:
            raise ModuleError("max_memory_mb", f"max_memory_mb={memory} exceeds the operator's cap "
                              f"[wasm] max_memory_mb={s.max_memory_mb}")
        return Limits(int(timeout), int(memory))

    def source(self, params: Mapping[str, Any]) -> ModuleSource:
        name, inline = params.get("module"), params.get("module_base64")
        if (name is None) == (inline is None):
            raise ModuleError("module", "give exactly one of 'module' (a file in the operator's "
                              "[wasm] modules_dir) and 'module_base64' (an inline module)")
        wasm, label = self._read_file(name) if name is not None else (self._decode_inline(inline), "inline module")
        if not wasm.startswith(WASM_MAGIC):
            field = "module" if name is not None else "module_base64"
            raise ModuleError(field, f"{label} is not a WebAssembly binary (no \\0asm version-1 header)")
        return ModuleSource(wasm, hashlib.sha256(wasm).hexdigest(), label)

    def _read_file(self, name: str) -> tuple[bytes, str]:
        s = self.settings
        if not s.modules_dir:
            raise ModuleError("module", "no module files are served: the operator sets no "
                              "[wasm] modules_dir in runtime.toml")
        if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
                or os.path.isabs(name)):
            raise ModuleError("module", f"module {name!r} must be a plain file name inside the "
                              "operator's [wasm] modules_dir (no directories, no absolute path)")
        root = Path(s.modules_dir).resolve()
        path = (root / name).resolve()
        if path.parent != root:  # a link pointing out of the directory
            raise ModuleError("module", f"module {name!r} resolves outside the [wasm] modules_dir")
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise ModuleError("module", f"module {name!r} is not a file")
            if size > s.max_module_bytes:
                raise ModuleError("module", f"module {name!r} is {size} bytes; the cap is "
                                  f"[wasm] max_module_bytes={s.max_module_bytes}")
            return path.read_bytes(), name
        except FileNotFoundError:
            found = sorted(p.name for p in root.glob("*.wasm")) if root.is_dir() else []
            hint = f"; available: {', '.join(found)}" if found else ""
            raise ModuleError("module", f"no module {name!r} in the [wasm] modules_dir{hint}") from None
        except OSError as exc:
            raise ModuleError("module", f"module {name!r} cannot be read: {exc.strerror}") from None

    def _decode_inline(self, text: str) -> bytes:
        s = self.settings
        if not s.allow_inline:
            raise ModuleError("module_base64", "inline modules are refused: the operator has not "
                              "set [wasm] allow_inline = true")
        # base64 is 4/3 the size: refuse an oversized text before decoding it
        if len(text) > (s.max_inline_bytes + 2) // 3 * 4:
            raise ModuleError("module_base64", f"inline module over the cap [wasm] "
                              f"max_inline_bytes={s.max_inline_bytes}")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ModuleError("module_base64", f"module_base64 is not valid base64: {exc}") from None

    # ------------------------------------------------------------ compiled

    def compiled(self, source: ModuleSource, limits: Limits) -> Any:
        """The module compiled with these limits (an Extism CompiledPlugin), from the cache."""
        import extism.extism as ex

        key = (source.sha256, limits)
        with self._lock:
            hit = self._compiled.get(key)
            if hit is not None:
                self._compiled.move_to_end(key)
                return hit
        manifest = {
            "wasm": [{"data": source.wasm}],
            "memory": {"max_pages": limits.max_pages},
            "timeout_ms": limits.timeout_ms,
            # the sandbox: no host may be called, no directory is mapped
            "allowed_hosts": [],
            "allowed_paths": {},
        }
        try:
            compiled = ex.CompiledPlugin(manifest, wasi=False, functions=[])
        except ex.Error as exc:
            raise ModuleError("module", f"{source.label} does not compile: {_first_line(exc)}") from None
        with self._lock:
            self.compilations += 1
            self._compiled[key] = compiled
            while len(self._compiled) > self.settings.compiled_cache:
                self._compiled.popitem(last=False)  # instances keep their own reference
        return compiled

    def instantiate(self, compiled: Any, config: Mapping[str, str]) -> Any:
        """A new instance (its own memory) of a compiled module."""
        import extism.extism as ex

        try:
            return ex.Plugin(compiled, config=dict(config), functions=[])
        except ex.Error as exc:
            raise ModuleError("module", f"module does not instantiate: {_first_line(exc)}") from None

    # ------------------------------------------------------------ validation

    def check(self, node_id: str, path: str, params: Mapping[str, Any]) -> list[Issue]:
        """Everything about one WasmNode that can be known before a session:
        caps, the module (found, allowed, compiles) and its export."""
        try:
            limits = self.limits(params)
            source = self.source(params)
            compiled = self.compiled(source, limits)
            function = params.get("function", "process")
            plugin = self.instantiate(compiled, {})
            try:
                if not plugin.function_exists(function):
                    raise ModuleError("function", f"{source.label} exports no function {function!r}")
            finally:
                plugin.__del__()
        except ModuleError as exc:
            return [Issue(f"{path}.params.{exc.field}", exc.message, node_id=node_id, field=exc.field,
                          code=f"wasm.{exc.field}")]
        return []

    def clear(self) -> None:
        with self._lock:
            self._compiled.clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

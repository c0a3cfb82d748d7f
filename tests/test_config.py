"""Configuration: defaults, runtime.toml, environment, manifest overrides within caps."""

from __future__ import annotations

import pytest

from engine.config import RuntimeConfig
from engine.errors import ResourceLimitError, ValidationError


def test_defaults():
    cfg = RuntimeConfig.load(None, env={})
    s = cfg.session
    assert (s.max_processes_per_session, s.channel_capacity, s.init_timeout_secs, s.enable_backpressure) == (10, 100, 30, True)


def test_toml_file_and_unknown_keys(tmp_path):
    p = tmp_path / "runtime.toml"
    p.write_text('channel_capacity = 7\ntest_nodes = true\n[caps]\nmax_sessions = 3\n[server]\nport = 6000\n')
    cfg = RuntimeConfig.load(p, env={})
    assert cfg.session.channel_capacity == 7 and cfg.test_nodes and cfg.caps.max_sessions == 3
    assert cfg.server.port == 6000
    p.write_text("chanel_capacity = 7\n")
    with pytest.raises(ValidationError, match="unknown configuration key 'chanel_capacity'"):
        RuntimeConfig.load(p, env={})
    with pytest.raises(ValidationError, match="must be a number"):
        RuntimeConfig.load({"channel_capacity": "many"}, env={})


def test_shipped_example_loads():
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "runtime.toml.example"
    cfg = RuntimeConfig.load(example, env={})
    assert cfg.session.channel_capacity == RuntimeConfig().session.channel_capacity


def test_environment_flags():
    cfg = RuntimeConfig.load(None, env={"REMOTEMEDIA_MULTIPROCESS": "0", "REMOTEMEDIA_TEST_NODES": "1",
                                        "REMOTEMEDIA_API_KEYS": "a, b"})
    assert not cfg.session.multiprocess_enabled and cfg.test_nodes and cfg.server.api_keys == ("a", "b")


def test_manifest_overrides_within_caps():
    cfg = RuntimeConfig.load({"caps": {"max_channel_capacity": 500}}, env={})
    s = cfg.for_manifest({"channel_capacity": 400, "enabled": False, "overflow_policy": "drop_newest"})
    assert s.channel_capacity == 400 and not s.multiprocess_enabled and s.overflow_policy == "drop_newest"
    with pytest.raises(ResourceLimitError, match="channel_capacity"):
        cfg.for_manifest({"channel_capacity": 501})
    with pytest.raises(ValidationError, match="unknown setting"):
        cfg.for_manifest({"python_executable": "/bin/sh"})
    with pytest.raises(ValidationError):
        cfg.for_manifest({"channel_capacity": -1})
    with pytest.raises(ValidationError):
        cfg.for_manifest({"overflow_policy": "explode"})


def test_config_cannot_exceed_its_own_caps():
    with pytest.raises(ValidationError, match="exceeds caps"):
        RuntimeConfig.load({"max_processes_per_session": 50, "caps": {"max_processes_per_session": 20}}, env={})


def test_nodes_section(tmp_path):
    assert RuntimeConfig().nodes.entry_points is True and RuntimeConfig().nodes.modules == ()
    p = tmp_path / "runtime.toml"
    p.write_text('[nodes]\nentry_points = false\nmodules = ["mypkg.nodes", "other"]\n')
    cfg = RuntimeConfig.load(p, env={})
    assert cfg.nodes.entry_points is False and cfg.nodes.modules == ("mypkg.nodes", "other")
    with pytest.raises(ValidationError, match="nodes.modules: must be a list of strings"):
        RuntimeConfig.load({"nodes": {"modules": "mypkg.nodes"}}, env={})
    with pytest.raises(ValidationError, match="nodes.modules: must be a list of strings"):
        RuntimeConfig.load({"nodes": {"modules": [1]}}, env={})
    with pytest.raises(ValidationError, match="nodes.entry_points: must be true or false"):
        RuntimeConfig.load({"nodes": {"entry_points": "no"}}, env={})
    with pytest.raises(ValidationError, match="unknown configuration key 'module'"):
        RuntimeConfig.load({"nodes": {"module": ["x"]}}, env={})


def test_wasm_section(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "runtime.toml.example"
    assert RuntimeConfig.load(example, env={}).wasm == RuntimeConfig().wasm  # documents the defaults
    p = tmp_path / "runtime.toml"
    p.write_text('[wasm]\nmodules_dir = "plugins"\nallow_inline = true\n')
    cfg = RuntimeConfig.load(p, env={})
    assert cfg.wasm.modules_dir == str(tmp_path / "plugins")  # relative to the file
    assert cfg.wasm.allow_inline
    with pytest.raises(ValidationError, match="wasm.timeout_ms: must be between 1 and wasm.max_timeout_ms"):
        RuntimeConfig.load({"wasm": {"timeout_ms": 10_000}}, env={})
    with pytest.raises(ValidationError, match="unknown configuration key 'modules'"):
        RuntimeConfig.load({"wasm": {"modules": "x"}}, env={})

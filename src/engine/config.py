"""Runtime configuration: built-in defaults ← runtime.toml ← environment,
then per pipeline ← the manifest's `metadata.multiprocess`, bounded by the
service-wide caps (a manifest may lower a limit or raise it up to its cap,
never past it).

One module on purpose (~580 lines): it is mostly one frozen dataclass per
runtime.toml section, read together with runtime.toml.example, and the one
loader that checks them all; split per section, each piece would be a few
lines apart from the loader that must name every one.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import Issue, ResourceLimitError, ValidationError


@dataclass(frozen=True)
class Caps:
    """Service-wide caps; nothing a manifest or client says can exceed them."""

    max_sessions: int = 64
    max_total_processes: int = 128
    max_processes_per_session: int = 32
    max_channel_capacity: int = 10_000
    max_init_timeout_secs: float = 600.0
    max_process_timeout_secs: float = 3600.0
    max_session_memory_mb: int = 16_384
    max_message_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class SessionSettings:
    """Settings of one pipeline run; `metadata.multiprocess` may override these."""

    multiprocess_enabled: bool = True
    max_processes_per_session: int = 10
    channel_capacity: int = 100
    init_timeout_secs: float = 30.0
    spawn_timeout_secs: float = 10.0
    process_timeout_secs: float = 300.0
    enable_backpressure: bool = True
    #: "block" (backpressure) | "drop_newest"; only a manifest
    #: that asks for dropping gets it, and drops are counted
    overflow_policy: str = "block"
    shutdown_timeout_secs: float = 2.0
    max_session_memory_mb: int = 4096
    memory_sample_interval_ms: int = 500
    output_queue_capacity: int = 1024
    #: 0 = no limit; a client's ResourceLimits may set these (see ClientLimits)
    max_audio_samples: int = 0
    max_duration_secs: float = 0.0


@dataclass(frozen=True)
class ClientLimits:
    """A caller's own limits for one run (remotemedia.v1 ResourceLimits).

    They can only tighten what the configuration (already bounded by the
    caps) allows: each is applied as min(client, configured). 0 = not set.
    """

    max_memory_bytes: int = 0
    max_timeout_ms: int = 0
    max_audio_samples: int = 0

    def apply(self, s: SessionSettings) -> SessionSettings:
        changes: dict[str, Any] = {}
        if self.max_memory_bytes:
            mb = max(1, -(-self.max_memory_bytes // (1 << 20)))
            changes["max_session_memory_mb"] = min(s.max_session_memory_mb, mb)
        if self.max_timeout_ms:
            secs = self.max_timeout_ms / 1000
            changes["max_duration_secs"] = min(s.max_duration_secs, secs) if s.max_duration_secs else secs
        if self.max_audio_samples:
            n = self.max_audio_samples
            changes["max_audio_samples"] = min(s.max_audio_samples, n) if s.max_audio_samples else n
        return replace(s, **changes) if changes else s


#: keys a manifest's metadata.multiprocess may set, with the cap that bounds each
MANIFEST_OVERRIDES: dict[str, str | None] = {
    "enabled": None,
    "max_processes_per_session": "max_processes_per_session",
    "channel_capacity": "max_channel_capacity",
    "init_timeout_secs": "max_init_timeout_secs",
    "process_timeout_secs": "max_process_timeout_secs",
    "enable_backpressure": None,
    "overflow_policy": None,
    "max_session_memory_mb": "max_session_memory_mb",
}

OVERFLOW_POLICIES = ("block", "drop_newest")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 50051
    api_keys: tuple[str, ...] = ()
    metrics_port: int = 0  # 0 = no Prometheus endpoint
    metrics_every_n_chunks: int = 50
    drain_timeout_secs: float = 10.0
    pending_chunks_capacity: int = 256  # chunks queued while a stream starts
    #: `serve` allocates every buffer of this many KiB or more on its own pages and
    #: gives them back when freed (glibc mallopt M_MMAP_THRESHOLD); 0 = glibc's
    #: default, whose threshold rises with the first large free, after which such
    #: buffers stay in the heap and a burst of large messages keeps its memory
    mmap_threshold_kib: int = 128
    #: PEM files; with both set the server speaks TLS only
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)
    tls_client_ca_file: str = ""


@dataclass(frozen=True)
class NodeSettings:
    """Node types beyond the built-ins (runtime.toml `[nodes]`). The operator
    chooses what code loads; a manifest only names node types."""

    #: register the Node classes installed distributions declare in the
    #: `remotemedia.nodes` entry-point group
    entry_points: bool = True
    #: modules to import: each registers every Node subclass defined in it
    #: (not merely imported into it) that declares a node_type
    modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class HttpSettings:
    """The browser face (runtime.toml `[http]`; engine.web): the page to talk to a
    voice pipeline and its WebRTC signalling, on the gRPC host."""

    #: 0 = off (the default, so several engines can share a machine); `make run` uses 8080
    port: int = 0
    #: the pipelines a browser may ask for by name (`pipeline` in the offer): a
    #: manifest file's path, or `builtin:voice` (the speech-to-speech example)
    pipelines: MappingProxyType = field(default_factory=lambda: MappingProxyType({"voice": "builtin:voice"}))
    default_pipeline: str = "voice"
    #: the node the microphone's audio goes to ("" = the pipeline's first node)
    source_node: str = ""
    #: the rate and frame size of that audio (Silero VAD: 16 kHz, 512 samples)
    sample_rate: int = 16_000
    chunk_samples: int = 512
    #: a browser that sent no audio for this long is gone: its session ends
    idle_secs: float = 3.0
    #: audio packets aiortc holds before decoding the microphone: each is 20 ms
    #: of delay (aiortc's own default is 4); 1 suits a LAN, raise it on a lossy link
    jitter_prefetch_packets: int = 1
    max_offer_bytes: int = 65_536


@dataclass(frozen=True)
class TracingSettings:
    """OpenTelemetry traces (runtime.toml `[tracing]`; needs the otel extra). See engine.tracing."""

    enabled: bool = False
    service_name: str = "remotemedia-engine"
    #: OTLP/gRPC collector; "" = OTEL_EXPORTER_OTLP_ENDPOINT or localhost:4317
    otlp_endpoint: str = ""
    otlp_insecure: bool = True
    #: share of sessions traced (each whole: its span and every node call's)
    sample_ratio: float = 1.0


@dataclass(frozen=True)
class WasmSettings:
    """The WASM executor (runtime.toml `[wasm]`): where modules come from and
    the caps on what one plugin instance may use."""

    #: where a WasmNode's `module` names a file; a relative path is taken from
    #: the directory of the runtime.toml that sets it; "" = no module files
    modules_dir: str = ""
    #: accept a module sent in the manifest (`module_base64`): code the
    #: operator never saw, still sandboxed and capped
    allow_inline: bool = False
    max_inline_bytes: int = 4 * 1024 * 1024
    max_module_bytes: int = 64 * 1024 * 1024
    #: one call's time limit when a node sets none, and the most it may set
    timeout_ms: int = 100
    max_timeout_ms: int = 5000
    #: one instance's memory limit when a node sets none, and the most it may set
    memory_mb: int = 16
    max_memory_mb: int = 256
    #: compiled modules kept (by content hash and limits)
    compiled_cache: int = 64


@dataclass(frozen=True)
class RemoteHost:
    """How to reach one remote engine (runtime.toml `[remote.hosts."H:P"]`)."""

    #: sent as `authorization: Bearer <key>`
    api_key: str = ""
    #: the CA that signed the remote's certificate: TLS; "" = plaintext
    ca_file: str = ""
    #: the name its certificate carries, if not the host's
    server_name: str = ""


@dataclass(frozen=True)
class RemoteSettings:
    """Nodes on other engines (runtime.toml `[remote]`): a manifest node's
    `host` must be one of `allowed_hosts`; nothing else is ever dialled."""

    allowed_hosts: tuple[str, ...] = ()
    #: seconds to connect and open the stream
    connect_timeout_secs: float = 2.0
    #: keepalive ping interval and how long an unanswered ping is borne, in
    #: seconds: a remote that hangs or a network that drops is noticed within their sum
    keepalive_secs: float = 0.5
    keepalive_timeout_secs: float = 0.75
    hosts: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    def host(self, address: str) -> RemoteHost:
        return self.hosts.get(address) or RemoteHost()


def _remote(data: Any, issues: list[Issue]) -> RemoteSettings:
    if not isinstance(data, dict):
        issues.append(Issue("remote", "must be a table"))
        return RemoteSettings()
    data = dict(data)
    hosts_raw = data.pop("hosts", {})
    settings = _build(RemoteSettings, data, "remote", issues, skip={"hosts"})
    hosts: dict[str, RemoteHost] = {}
    if not isinstance(hosts_raw, dict):
        issues.append(Issue("remote.hosts", "must be a table of tables, one per host"))
        hosts_raw = {}
    for address, table in hosts_raw.items():
        if address not in settings.allowed_hosts:
            issues.append(Issue(f"remote.hosts.{address}", "settings for a host not in allowed_hosts"))
        hosts[address] = _build(RemoteHost, table, f"remote.hosts.{address}", issues)
    for address in settings.allowed_hosts:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            issues.append(Issue("remote.allowed_hosts", f"{address!r} is not host:port"))
    return replace(settings, hosts=MappingProxyType(hosts))


@dataclass(frozen=True)
class RaySettings:
    """The Ray executor (runtime.toml `[ray]`, `pip install 'remotemedia-engine[ray]'`):
    nodes placed on a Ray cluster, one actor per node and session."""

    #: the cluster: "auto", "H:P" of its head or "ray://H:10001"; "" = the executor is off
    address: str = ""
    #: the Ray namespace the engine's actors live in
    namespace: str = "remotemedia"
    #: also place a process node there when this machine cannot meet its
    #: `capabilities` (a GPU it lacks, more cores or memory than it has)
    place_by_capabilities: bool = False
    #: seconds to connect (the engine's Ray driver process started and joined)
    connect_timeout_secs: float = 15.0
    #: seconds the engine stays connected after the last session that used the cluster
    idle_disconnect_secs: float = 5.0
    #: CPUs an actor reserves when its node declares no `capabilities.cpu.cores`
    default_num_cpus: float = 1.0
    #: a custom Ray resource that counts GPU memory in GB (e.g. "gpu_memory_gb",
    #: declared by the cluster's GPU nodes); "" = `gpu.min_memory_gb` is not enforced
    gpu_memory_resource: str = ""
    #: seconds a node's cleanup() may take on the actor before it is killed
    cleanup_timeout_secs: float = 2.0
    #: each actor's heartbeat: one every heartbeat_secs; none for
    #: heartbeat_timeout_secs = its worker or machine is gone (the node's typed
    #: error; Ray itself confirms a lost machine only seconds later)
    heartbeat_secs: float = 0.2
    heartbeat_timeout_secs: float = 0.75


@dataclass(frozen=True)
class PrewarmNode:
    """One runtime.toml `[[prewarm_nodes]]` entry: node processes kept with this
    node type initialized, with these params, before any session asks."""

    node_type: str = ""
    #: as a manifest node's params (normalized the same way, `[node_params.TYPE]` included)
    params: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    count: int = 1


def _prewarm_nodes(data: Any, issues: list[Issue]) -> tuple[PrewarmNode, ...]:
    if not isinstance(data, list):
        issues.append(Issue("prewarm_nodes", "must be an array of tables ([[prewarm_nodes]])"))
        return ()
    entries = []
    for i, table in enumerate(data):
        where = f"prewarm_nodes[{i}]"
        if not isinstance(table, dict):
            issues.append(Issue(where, "must be a table"))
            continue
        table = dict(table)
        params = table.pop("params", {})
        if not isinstance(params, dict):
            issues.append(Issue(f"{where}.params", "must be a table"))
            params = {}
        entry = _build(PrewarmNode, table, where, issues, skip={"params"})
        if not entry.node_type:
            issues.append(Issue(f"{where}.node_type", "must name a node type"))
        entries.append(replace(entry, params=MappingProxyType(params)))
    return tuple(entries)


@dataclass(frozen=True)
class RuntimeConfig:
    session: SessionSettings = field(default_factory=SessionSettings)
    caps: Caps = field(default_factory=Caps)
    server: ServerSettings = field(default_factory=ServerSettings)
    nodes: NodeSettings = field(default_factory=NodeSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    wasm: WasmSettings = field(default_factory=WasmSettings)
    remote: RemoteSettings = field(default_factory=RemoteSettings)
    ray: RaySettings = field(default_factory=RaySettings)
    #: runtime.toml `[node_params.TYPE]`: the operator's params for every node of
    #: a type (a manifest's own params win), e.g. where a model's files are
    node_params: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    #: runtime.toml `[composites.TYPE]`: node types defined as small pipelines
    #: (engine.composite); they replace the built-in stand-ins of the same name
    composites: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    python_executable: str = sys.executable
    test_nodes: bool = False
    #: node processes kept started, never used, so a session's nodes skip the
    #: fork and channel set-up (each ~13 MiB PSS while idle); 0 = off
    prewarm_processes: int = 0
    #: runtime.toml `[[prewarm_nodes]]`: node processes kept with their node
    #: initialized (model loaded) ahead, so a session's node with that type and
    #: params is ready at once; see executors.process.prewarm_nodes
    prewarm_nodes: tuple[PrewarmNode, ...] = ()
    #: a manifest whose every node process is kept initialized so, one each
    #: ("" = none); relative to the directory of the runtime.toml that sets it
    prewarm_manifest: str = ""
    #: processes the zygote keeps forked ahead (loop and iceoryx2 node made,
    #: no channels yet), so a node process starts without a fork; 0 = off
    standby_processes: int = 1
    #: where iceoryx2 keeps its files; each engine uses its own prefix below it
    ipc_root: str = "/tmp/remotemedia-engine"
    #: times the node-process zygote is restarted after dying, within any
    #: minute; past that, node processes fail with INTERNAL until the engine restarts
    zygote_restarts_per_minute: int = 5

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, source: str | os.PathLike[str] | dict[str, Any] | RuntimeConfig | None = None,
             *, env: dict[str, str] | None = None) -> RuntimeConfig:
        if isinstance(source, RuntimeConfig):
            cfg = source
        else:
            data: dict[str, Any] = {}
            if isinstance(source, dict):
                data = source
            elif source is not None:
                data = _read_toml(Path(source))
            cfg = cls.from_dict(data)
            if isinstance(source, (str, os.PathLike)):
                cfg = cfg.relative_to(Path(source).resolve().parent)
        return cfg.with_env(os.environ if env is None else env)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeConfig:
        data = dict(data)
        issues: list[Issue] = []
        caps = _build(Caps, data.pop("caps", {}), "caps", issues)
        server = _build(ServerSettings, data.pop("server", {}), "server", issues)
        nodes = _build(NodeSettings, data.pop("nodes", {}), "nodes", issues)
        tracing = _build(TracingSettings, data.pop("tracing", {}), "tracing", issues)
        wasm = _build(WasmSettings, data.pop("wasm", {}), "wasm", issues)
        remote = _remote(data.pop("remote", {}), issues)
        prewarm_nodes = _prewarm_nodes(data.pop("prewarm_nodes", []), issues)
        ray = _build(RaySettings, data.pop("ray", {}), "ray", issues)
        http_data = dict(data.pop("http", {}) or {})
        pipelines = http_data.pop("pipelines", None)
        http = _build(HttpSettings, http_data, "http", issues)
        if pipelines is not None:
            if not isinstance(pipelines, dict) or not all(isinstance(v, str) for v in pipelines.values()):
                issues.append(Issue("http.pipelines", "must be a table of name = manifest path"))
            else:
                http = replace(http, pipelines=MappingProxyType(dict(pipelines)))
        tables = {}
        for section in ("node_params", "composites"):
            value = data.pop(section, {})
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                issues.append(Issue(section, "must be a table of tables, one per node type"))
                value = {}
            tables[section] = MappingProxyType({k: dict(v) for k, v in value.items()})
        session_keys = {f.name for f in fields(SessionSettings)}
        sess = {k: data.pop(k) for k in list(data) if k in session_keys}
        if "multiprocess" in data:  # [multiprocess] enabled = false
            mp = data.pop("multiprocess")
            if isinstance(mp, dict) and "enabled" in mp:
                sess["multiprocess_enabled"] = mp["enabled"]
        session = _build(SessionSettings, sess, "", issues)
        top = _build(cls, data, "", issues,
                     skip={"session", "caps", "server", "nodes", "tracing", "wasm", "remote", "ray",
                           "node_params", "composites", "http", "prewarm_nodes"})
        if issues:
            raise ValidationError(issues)
        cfg = replace(top, session=session, caps=caps, server=server, nodes=nodes, tracing=tracing, wasm=wasm,
                      remote=remote, ray=ray, http=http, prewarm_nodes=prewarm_nodes, **tables)
        cfg.check()
        return cfg

    def relative_to(self, base: Path) -> RuntimeConfig:
        """Relative paths of a runtime.toml are taken from its directory."""
        cfg, w = self, self.wasm
        if w.modules_dir and not Path(w.modules_dir).is_absolute():
            cfg = replace(cfg, wasm=replace(w, modules_dir=str(base / w.modules_dir)))
        tls = {key: str(base / value) for key in ("tls_cert_file", "tls_key_file", "tls_client_ca_file")
               if (value := getattr(cfg.server, key)) and not Path(value).is_absolute()}
        if tls:
            cfg = replace(cfg, server=replace(cfg.server, **tls))
        hosts = {address: replace(h, ca_file=str(base / h.ca_file))
                 for address, h in cfg.remote.hosts.items() if h.ca_file and not Path(h.ca_file).is_absolute()}
        if hosts:
            cfg = replace(cfg, remote=replace(cfg.remote, hosts=MappingProxyType({**cfg.remote.hosts, **hosts})))
        pipelines = {name: str(base / path) for name, path in cfg.http.pipelines.items()
                     if not path.startswith("builtin:") and not Path(path).is_absolute()}
        if pipelines:
            cfg = replace(cfg, http=replace(cfg.http, pipelines=MappingProxyType({**cfg.http.pipelines,
                                                                                  **pipelines})))
        if cfg.prewarm_manifest and not Path(cfg.prewarm_manifest).is_absolute():
            cfg = replace(cfg, prewarm_manifest=str(base / cfg.prewarm_manifest))
        return cfg

    def with_env(self, env: Any) -> RuntimeConfig:
        cfg = self
        if "REMOTEMEDIA_MULTIPROCESS" in env:
            cfg = replace(cfg, session=replace(cfg.session, multiprocess_enabled=_truthy(env["REMOTEMEDIA_MULTIPROCESS"])))
        if "REMOTEMEDIA_TEST_NODES" in env:
            cfg = replace(cfg, test_nodes=_truthy(env["REMOTEMEDIA_TEST_NODES"]))
        if env.get("REMOTEMEDIA_API_KEYS"):
            keys = tuple(k.strip() for k in env["REMOTEMEDIA_API_KEYS"].split(",") if k.strip())
            cfg = replace(cfg, server=replace(cfg.server, api_keys=keys))
        return cfg

    def check(self) -> None:
        s, c = self.session, self.caps
        issues = []
        for key, cap_key in MANIFEST_OVERRIDES.items():
            if cap_key is None:
                continue
            if getattr(s, key) > getattr(c, cap_key):
                issues.append(Issue(key, f"{key}={getattr(s, key)} exceeds caps.{cap_key}={getattr(c, cap_key)}"))
        if s.overflow_policy not in OVERFLOW_POLICIES:
            issues.append(Issue("overflow_policy", f"must be one of {OVERFLOW_POLICIES}"))
        for name in ("channel_capacity", "max_processes_per_session", "output_queue_capacity"):
            if getattr(s, name) < 1:
                issues.append(Issue(name, "must be >= 1"))
        tls = self.server
        if bool(tls.tls_cert_file) != bool(tls.tls_key_file):
            issues.append(Issue("server.tls_cert_file", "tls_cert_file and tls_key_file go together"))
        if tls.tls_client_ca_file and not tls.tls_cert_file:
            issues.append(Issue("server.tls_client_ca_file", "needs tls_cert_file and tls_key_file"))
        if not 0 <= self.tracing.sample_ratio <= 1:
            issues.append(Issue("tracing.sample_ratio", "must be between 0 and 1"))
        if not 0 <= self.standby_processes <= 16:
            issues.append(Issue("standby_processes", "must be between 0 and 16"))
        if not 0 <= self.zygote_restarts_per_minute <= 1000:
            issues.append(Issue("zygote_restarts_per_minute", "must be between 0 and 1000"))
        if not 0 <= self.prewarm_processes <= c.max_total_processes:
            issues.append(Issue("prewarm_processes", f"must be between 0 and caps.max_total_processes={c.max_total_processes}"))
        issues += self._prewarm_counts_issues()
        w = self.wasm
        for name, cap in (("timeout_ms", "max_timeout_ms"), ("memory_mb", "max_memory_mb")):
            if not 1 <= getattr(w, name) <= getattr(w, cap):
                issues.append(Issue(f"wasm.{name}", f"must be between 1 and wasm.{cap}={getattr(w, cap)}"))
        for name in ("max_inline_bytes", "max_module_bytes", "compiled_cache"):
            if getattr(w, name) < 1:
                issues.append(Issue(f"wasm.{name}", "must be >= 1"))
        if issues:
            raise ValidationError(issues)

    def _prewarm_counts_issues(self) -> list[Issue]:
        cap = self.caps.max_total_processes
        issues = [Issue(f"prewarm_nodes[{i}].count", f"must be a whole number between 1 and "
                        f"caps.max_total_processes={cap}")
                  for i, n in enumerate(self.prewarm_nodes) if not isinstance(n.count, int) or not 1 <= n.count <= cap]
        total = self.prewarm_processes + sum(n.count for n in self.prewarm_nodes)
        if not issues and total > cap:
            issues.append(Issue("prewarm_nodes", f"{total} prewarmed processes with prewarm_processes exceed "
                                f"caps.max_total_processes={cap}"))
        return issues

    @property
    def prewarming(self) -> bool:
        """Whether node processes are to be made ahead at the engine's start."""
        return bool(self.prewarm_processes or self.prewarm_nodes or self.prewarm_manifest)

    # ------------------------------------------------------------ per session

    def for_manifest(self, overrides: dict[str, Any]) -> SessionSettings:
        """Apply a manifest's metadata.multiprocess to the session defaults, within the caps."""
        settings = self.session
        changes: dict[str, Any] = {}
        issues: list[Issue] = []
        for key, value in overrides.items():
            path = f"$.metadata.multiprocess.{key}"
            if key not in MANIFEST_OVERRIDES:
                issues.append(Issue(path, f"unknown setting {key!r}; settable: {', '.join(MANIFEST_OVERRIDES)}",
                                    field=key))
                continue
            target = "multiprocess_enabled" if key == "enabled" else key
            current = getattr(settings, target)
            if isinstance(current, bool):
                if not isinstance(value, bool):
                    issues.append(Issue(path, "must be true or false", field=key))
                    continue
            elif isinstance(current, (int, float)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    issues.append(Issue(path, "must be a positive number", field=key))
                    continue
                cap_key = MANIFEST_OVERRIDES[key]
                cap = getattr(self.caps, cap_key) if cap_key else None
                if cap is not None and value > cap:
                    raise ResourceLimitError(
                        f"metadata.multiprocess.{key}={value} exceeds the service cap {cap}",
                        context={"field": key, "cap": cap, "requested": value},
                    )
                value = type(current)(value)
            elif key == "overflow_policy" and value not in OVERFLOW_POLICIES:
                issues.append(Issue(path, f"must be one of {', '.join(OVERFLOW_POLICIES)}", field=key))
                continue
            changes[target] = value
        if issues:
            raise ValidationError(issues)
        return replace(settings, **changes)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValidationError(Issue("$", f"cannot read config {path}: {exc.strerror or exc}")) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(Issue("$", f"{path} is not valid TOML: {exc}")) from None


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _build(cls: Any, data: Any, section: str, issues: list[Issue], skip: set[str] = frozenset()) -> Any:  # type: ignore[assignment]
    if not isinstance(data, dict):
        issues.append(Issue(section or "$", "must be a table"))
        return cls()
    known = {f.name: f for f in fields(cls) if f.name not in skip}
    kwargs = {}
    for key, value in data.items():
        path = f"{section}.{key}" if section else key
        f = known.get(key)
        if f is None:
            issues.append(Issue(path, f"unknown configuration key {key!r}"))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, bool) and not isinstance(value, bool):
            issues.append(Issue(path, "must be true or false"))
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and (
            isinstance(value, bool) or not isinstance(value, (int, float))
        ):
            issues.append(Issue(path, "must be a number"))
        elif isinstance(default, str) and not isinstance(value, str):
            issues.append(Issue(path, "must be a string"))
        elif isinstance(default, tuple) and (
            not isinstance(value, list) or not all(isinstance(v, str) for v in value)
        ):
            issues.append(Issue(path, "must be a list of strings"))
        else:
            kwargs[key] = tuple(value) if isinstance(default, tuple) else value
    return cls(**kwargs)

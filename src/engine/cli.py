"""Command line: `serve`, `run MANIFEST`, `validate MANIFEST`, `nodes`, `cleanup`, `bench`.

Only the CLI installs uvloop and signal handlers; the library never does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import orjson


def _engine_config(args: argparse.Namespace) -> Any:
    from .config import RuntimeConfig

    return RuntimeConfig.load(getattr(args, "config", None))


def cmd_validate(args: argparse.Namespace) -> int:
    from .catalog import default_registry
    from .engine import check_executors
    from .errors import ValidationError
    from .manifest import validate

    config = _engine_config(args)
    registry = default_registry(config)
    try:
        m = validate(Path(args.manifest), registry)
        check_executors(m, config)
    except ValidationError as exc:
        print(f"{args.manifest}: {len(exc.issues)} problem(s)", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2
    print(f"{args.manifest}: valid ({len(m.nodes)} nodes, {len(m.connections)} connections)")
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    from .catalog import default_registry
    from .errors import EngineError

    try:
        registry = default_registry(_engine_config(args))
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        listing = {"nodes": [spec.describe() for spec in registry.specs()],
                   "failed": [f.describe() for f in registry.failures]}
        print(orjson.dumps(listing, option=orjson.OPT_INDENT_2).decode())
    else:
        _print_nodes(registry)
    # a plugin that did not load is an operator's problem to fix: say so in the exit code too
    return 1 if registry.failures else 0


def _print_nodes(registry: Any) -> None:
    def kinds(types: tuple[Any, ...]) -> str:
        return ",".join(k.name.lower() for k in types)

    rows = [("NODE TYPE", "EXECUTOR", "INPUT -> OUTPUT", "SOURCE")]
    for spec in registry.specs():
        executor = spec.executor if spec.overridable else f"{spec.executor} (fixed)"
        rows.append((spec.node_type, executor,
                     f"{kinds(spec.cls.input_types)} -> {kinds(spec.cls.output_types)}", str(spec.source)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[3])
    if registry.failures:
        print(f"\nfailed to load ({len(registry.failures)}):")
        for failure in registry.failures:
            print(f"  {failure}")


def _summary(data: Any) -> str:
    from .data import AudioData, JsonData, TensorData, TextData

    if isinstance(data, AudioData):
        peak = float(abs(data.samples).max()) if data.samples.size else 0.0
        return (f"audio {data.frames} frames x {data.channels} ch @ {data.sample_rate} Hz "
                f"{data.format.name} ({data.duration_s:.3f} s, peak {peak:.3f})")
    if isinstance(data, TextData):
        return f"text {data.text!r}"
    if isinstance(data, JsonData):
        return f"json {orjson.dumps(data.value).decode()[:200]}"
    if isinstance(data, TensorData):
        return f"tensor {data.array.shape} {data.array.dtype}"
    return repr(data)


async def _run(args: argparse.Namespace) -> int:
    from .audio_io import read_wav, tone, write_wav
    from .data import AudioData
    from .engine import Engine
    from .errors import EngineError

    async with Engine(_engine_config(args)) as engine:
        try:
            manifest = engine.validate(Path(args.manifest))
        except EngineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        audio = read_wav(args.input) if args.input else tone(args.seconds, args.sample_rate)
        targets = [args.node] if args.node else [
            n.id for n in manifest.nodes if not any(c.target == n.id for c in manifest.connections)
        ]
        print(f"pipeline {manifest.name!r}: {len(manifest.nodes)} nodes; input "
              f"{'file ' + args.input if args.input else 'generated tone'} "
              f"({audio.duration_s:.2f} s @ {audio.sample_rate} Hz) → {', '.join(targets)}")
        try:
            result = await engine.execute(
                manifest, {t: audio for t in targets},
                on_progress=lambda p: print(f"  init {p.node_id}: {p.phase} {p.percent:.0f}% {p.message}"),
            )
        except EngineError as exc:
            print(f"error ({exc.error_type.name}): {exc}", file=sys.stderr)
            if exc.traceback_text:
                print(exc.traceback_text, file=sys.stderr)
            return 1
        print("outputs:")
        for node_id, data in result.outputs.items():
            n = len(result.all_outputs[node_id])
            print(f"  {node_id}: {_summary(data)}  [{n} item{'s' * (n != 1)}]")
            if args.output and isinstance(data, AudioData):
                write_wav(args.output, data)
                print(f"  wrote {args.output}")
        m = result.metrics
        print(f"timings: total {m['wall_time_ms']:.1f} ms, start-up {m['startup_ms']:.1f} ms")
        for node_id, st in m["nodes"].items():
            print(f"  {node_id:<20} in {st['items_in']:>5}  out {st['items_out']:>5}  "
                  f"busy {st['busy_s'] * 1000:8.2f} ms")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    _install_uvloop()
    return asyncio.run(_run(args))


def cmd_cleanup(args: argparse.Namespace) -> int:
    """What an engine does at start, on demand: remove the shared memory of dead engines."""
    from .ipc import iox, stale

    root = _engine_config(args).ipc_root
    report = stale.sweep(root, iox.PREFIX_RE)
    for prefix, paths in report.removed.items():
        print(f"removed {len(paths)} file(s) of dead engine {prefix.rstrip('_')}:")
        for path in paths:
            print(f"  {path}")
    for prefix in report.live:
        print(f"left alone: engine {prefix.rstrip('_')} is running")
    print(f"{len(report.paths)} file(s) of {len(report.removed)} dead engine(s) removed "
          f"({report.by_iceoryx2} of them by iceoryx2's dead-node cleanup) under {root} and /dev/shm")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path.cwd()))
    try:
        from bench.__main__ import main as bench_main
    except ImportError:
        print("bench/ not found: run from the repository root", file=sys.stderr)
        return 2
    return bench_main(args.rest)


def cmd_serve(args: argparse.Namespace) -> int:
    _install_uvloop()
    from .server.app import serve

    return asyncio.run(serve(_engine_config(args), host=args.host, port=args.port,
                             metrics_port=args.metrics_port))


def _session_context(record: logging.LogRecord) -> bool:
    # records of a session carry session_id/node_id (LoggerAdapter); others get "-"
    if not hasattr(record, "session_id"):
        record.session_id = "-"
    if not hasattr(record, "node_id"):
        record.node_id = "-"
    return True


def _install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="remotemedia-engine", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a manifest; exit 2 on any problem")
    p.add_argument("manifest")
    p.add_argument("--config")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run a manifest once on a WAV file or generated audio")
    p.add_argument("manifest")
    p.add_argument("--config")
    p.add_argument("--input", help="WAV file (default: a generated tone)")
    p.add_argument("--output", help="write the audio output of the sink to this WAV file")
    p.add_argument("--node", help="node to feed (default: every source node)")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--sample-rate", type=int, default=48_000)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="serve remotemedia.v1 over gRPC")
    p.add_argument("--config")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--metrics-port", type=int, default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("nodes", help="list every node type: executor, data types, source, params")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true", help="also each params schema, as JSON")
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("cleanup", help="remove shared memory left by engines that died (kill -9, OOM)")
    p.add_argument("--config")
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("bench", help="run benchmark scenarios (see bench/)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.addFilter(_session_context)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [session=%(session_id)s node=%(node_id)s] %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    return args.func(args)

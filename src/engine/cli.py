"""Command line: `serve`, `run MANIFEST`, `validate MANIFEST`, `nodes`, `cleanup`, `bench`.

Only the CLI installs uvloop and signal handlers; the library never does.
"""

from __future__ import annotations

import argparse
import asyncio
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
        check_executors(m, config, registry)
    except ValidationError as exc:
        print(f"{args.manifest}: {len(exc.issues)} problem(s)", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2
    outer = {n.public_id for n in m.nodes}
    print(f"{args.manifest}: valid ({len(outer)} nodes, {len(m.connections)} connections after composites)")
    shown: set[str] = set()
    for node_id, where in placement_lines(m, registry, config):
        public = node_id.split(".", 1)[0]
        if public in m.served_by and public not in shown:
            shown.add(public)
            print(f"  {public}: served by: {m.served_by[public]}")
        print(f"  {'  ' if public in m.served_by else ''}{node_id}: {where}")
    for note in m.notes:
        print(f"  note: {note}")
    return 0


def placement_lines(m: Any, registry: Any, config: Any) -> list[tuple[str, str]]:
    """Where each node of a valid manifest runs, and why there when it is not its default."""
    from .plan import build_plan

    ray = config.ray if config.ray.address else None
    plan = build_plan(m, registry, config.for_manifest(dict(m.multiprocess)), ray)
    why = {}
    if ray is not None:
        from .executors.ray_cluster import placements

        why = placements(m, registry, config.ray)
    out = []
    for decl in m.nodes:
        planned = plan.nodes[decl.id]
        where = planned.executor
        if planned.executor == "remote":
            where = f"remote ({decl.host})"
        elif decl.id in why:
            where = f"ray ({why[decl.id]}; cluster {config.ray.address})"
        out.append((decl.id, where))
    return out


def cmd_nodes(args: argparse.Namespace) -> int:
    from .catalog import default_registry
    from .errors import EngineError

    try:
        registry = default_registry(_engine_config(args))
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.markdown:
        from .nodedocs import render

        print(render(registry, builtin_only=False), end="")
    elif args.json:
        listing = {"nodes": [spec.describe() for spec in registry.specs()],
                   "composites": [comp.describe() for comp in registry.composites()],
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
    for comp in registry.composites():
        rows.append((comp.node_type, "composite", f"{kinds(comp.input_types)} -> {kinds(comp.output_types)}",
                     f"served by: {comp.served_by()}"))
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
        # "samples" as the protocol's num_samples means it: every channel's counted
        per_channel = f" ({data.frames} per channel)" if data.channels > 1 else ""
        return (f"audio {data.samples.size} samples{per_channel}, {data.channels} ch @ {data.sample_rate} Hz "
                f"{data.format.name} ({data.duration_s:.3f} s, peak {peak:.3f})")
    if isinstance(data, TextData):
        return f"text {data.text!r}"
    if isinstance(data, JsonData):
        return f"json {orjson.dumps(data.value).decode()[:200]}"
    if isinstance(data, TensorData):
        return f"tensor {data.array.shape} {data.array.dtype}"
    return repr(data)


def _target_rate(registry: Any, manifest: Any, node_id: str) -> int | None:
    """The input rate a node declares by its `sampling_rate` param (VAD, ...) or its default."""
    node = manifest.node(manifest.entry(node_id))  # a composite's input node takes what it is sent
    rate = node.params.get("sampling_rate")
    if rate is None:
        spec = registry.get(node.node_type)
        props = (spec.cls.params_schema or {}).get("properties", {}) if spec is not None else {}
        rate = props.get("sampling_rate", {}).get("default")
    return int(rate) if isinstance(rate, int) and not isinstance(rate, bool) else None


def _text_printer() -> Any:
    """Prints the text that passes a sink as the run goes: text outputs, a reply's text and
    the transcript it answers (speech pipelines tag reply audio with both)."""
    from .data import TextData

    heard: set[str] = set()

    def show(out: Any) -> None:
        data = out.data
        if isinstance(data, TextData):
            print(f"  {out.node_id}: {data.text!r}", flush=True)
            return
        transcript, text = data.metadata.get("transcript"), data.metadata.get("text")
        if transcript and transcript not in heard:
            heard.add(transcript)
            print(f"  heard: {transcript!r}", flush=True)
        if text:
            print(f"  {out.node_id}: {text!r}", flush=True)

    return show


async def _run(args: argparse.Namespace) -> int:
    from .audio_io import read_audio, resample, tone, write_wav
    from .data import AudioData
    from .engine import Engine
    from .errors import ValidationError

    async with Engine(_engine_config(args)) as engine:
        manifest = engine.validate(Path(args.manifest))
        if args.node and args.node not in manifest.public_ids:
            raise ValidationError(f"--node {args.node!r} is not a node of {args.manifest} (its nodes: "
                                  f"{', '.join(sorted(manifest.public_ids))})")
        audio = read_audio(args.input) if args.input else tone(args.seconds, args.sample_rate)
        targets = [args.node] if args.node else [
            n.id for n in manifest.nodes if not any(c.target == n.id for c in manifest.connections)
        ]
        inputs = {}
        for t in targets:
            rate = _target_rate(engine.registry, manifest, t)
            inputs[t] = resample(audio, rate) if rate and rate != audio.sample_rate else audio
        resampled = sorted({f"{d.sample_rate} Hz" for d in inputs.values() if d.sample_rate != audio.sample_rate})
        print(f"pipeline {manifest.name!r}: {len(manifest.nodes)} nodes; input "
              f"{'file ' + args.input if args.input else 'generated tone'} "
              f"({audio.duration_s:.2f} s @ {audio.sample_rate} Hz"
              f"{', resampled to ' + ', '.join(resampled) if resampled else ''}) → {', '.join(targets)}")
        # a failure is main()'s to report: one line, its traceback only with -v
        result = await engine.execute(
            manifest, inputs, on_output=_text_printer(),
            on_progress=lambda p: print(f"  init {p.node_id}: {p.phase} {p.percent:.0f}% {p.message}"),
        )
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
    # bench/ sits next to src/ in the checkout this package runs from (an
    # editable install); a checkout in the working directory also works
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "bench" / "__main__.py").is_file():
            sys.path.insert(0, str(root))
            break
    else:
        print("remotemedia-engine: error: bench/ not found: it ships with the source checkout, "
              "not the installed package", file=sys.stderr)
        return 2
    from bench.__main__ import main as bench_main

    return bench_main(args.rest)


def cmd_serve(args: argparse.Namespace) -> int:
    _install_uvloop()
    from .server.app import serve

    return asyncio.run(serve(_engine_config(args), host=args.host, port=args.port,
                             metrics_port=args.metrics_port, http_port=args.http_port))


def _install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        pass


def _one_line(exc: Exception) -> str:
    from .errors import ValidationError

    if isinstance(exc, ValidationError) and len(exc.issues) == 1:
        issue = exc.issues[0]
        return issue.message if issue.path == "$" else str(issue)  # the issue names its node itself
    return str(exc).replace("\n", "; ")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help shows its default (said in words where it comes from the config)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        if action.default is False:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    # -v and --log-format are accepted before or after the subcommand
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging from the engine and its nodes, not gRPC's internals (default: off)")
    common.add_argument("--log-format", choices=("text", "json"), default=argparse.SUPPRESS,
                        help="log lines as text or one JSON object per line (default: text)")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", metavar="TOML", default=None,
                        help="runtime.toml (see runtime.toml.example) (default: built-in defaults)")

    parser = argparse.ArgumentParser(prog="remotemedia-engine", description=__doc__.splitlines()[0],
                                     parents=[common], formatter_class=_Formatter,
                                     epilog="exit codes: 0 ok, 1 a run failed, 2 bad arguments, "
                                            "configuration or input")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common, *parents],
                              formatter_class=_Formatter)

    p = add("validate", "check a manifest; exit 2 on any problem", config)
    p.add_argument("manifest", help="manifest file (JSON)")
    p.set_defaults(func=cmd_validate)

    p = add("run", "run a manifest once on an audio file or generated audio", config)
    p.add_argument("manifest", help="manifest file (JSON)")
    p.add_argument("--input", metavar="FILE",
                   help="audio file: WAV (any PCM width or float), FLAC, OGG, MP3; resampled to a "
                        "source node's sampling_rate param (default: a generated tone)")
    p.add_argument("--output", metavar="WAV", help="write the audio output of the sink to this WAV file (default: not written)")
    p.add_argument("--node", help="node to feed (default: every source node)")
    p.add_argument("--seconds", type=float, default=2.0, help="length of the generated tone")
    p.add_argument("--sample-rate", type=int, default=48_000, help="rate of the generated tone (Hz)")
    p.set_defaults(func=cmd_run)

    p = add("serve", "serve remotemedia.v1 over gRPC", config)
    p.add_argument("--host", default=None, help="address to listen on (default: [server] host, 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve the page to talk to and its WebRTC signalling on this port (default: [http] port, "
                        "0 = off)")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default: [server] port, 50051)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics port (default: [server] metrics_port, 0 = off)")
    p.set_defaults(func=cmd_serve)

    p = add("nodes", "list every node type: executor, data types, source, params", config)
    p.add_argument("--json", action="store_true", help="also each params schema, as JSON")
    p.add_argument("--markdown", action="store_true",
                   help="a Markdown reference of every node type's params (docs/nodes.md is the built-ins')")
    p.set_defaults(func=cmd_nodes)

    p = add("cleanup", "remove shared memory left by engines that died (kill -9, OOM); prints what it removed",
            config)
    p.set_defaults(func=cmd_cleanup)

    p = add("bench", "run benchmark scenarios: bench list | bench all | bench SCENARIO... | bench report")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of python -m bench")
    p.set_defaults(func=cmd_bench)
    return parser


def _exit_code(exc: Exception) -> int:
    from .errors import EngineError

    if isinstance(exc, EngineError) and exc.error_type.name in ("VALIDATION", "TYPE_VALIDATION"):
        return 2
    return 1


def _traceback(exc: Exception) -> str:
    """Where `exc` came from: a node's own traceback (from its process) when it has one."""
    import traceback

    from .errors import EngineError

    if isinstance(exc, EngineError) and exc.traceback_text:
        return exc.traceback_text.rstrip()
    return "".join(traceback.format_exception(exc)).rstrip()


def _report_error(exc: Exception, *, verbose: bool, fmt: str) -> int:
    """Say why a command failed in one line (a JSON record with --log-format json), with
    its traceback only under -v; returns the exit code."""
    import logging

    from .errors import EngineError

    code = _exit_code(exc)
    line = _one_line(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
    if fmt == "json":
        fields: dict[str, Any] = {"error_type": exc.error_type.name if isinstance(exc, EngineError)
                                  else type(exc).__name__, "exit_code": code}
        if isinstance(exc, EngineError):
            # the node's traceback (its tail rides in the context) only under -v, as everywhere;
            # a context key that is a LogRecord attribute would make logging raise
            taken = {*vars(logging.makeLogRecord({})), "message", "asctime", "traceback_tail", *fields}
            fields.update({k: v for k, v in exc.context.items() if v is not None and k not in taken})
            if exc.node_id:
                fields["node_id"] = exc.node_id
        if verbose:
            fields["traceback"] = _traceback(exc)
        logging.getLogger("remotemedia-engine").error(line, extra=fields)
        return code
    if verbose:
        print(_traceback(exc), file=sys.stderr)
    hint = "" if verbose or isinstance(exc, EngineError) else " (-v shows the traceback)"
    print(f"remotemedia-engine: error: {line}{hint}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    from . import logs

    args = build_parser().parse_args(argv)
    verbose, fmt = getattr(args, "verbose", False), getattr(args, "log_format", "text")
    logs.configure(verbose=verbose, fmt=fmt)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a command's failure: one line, the traceback under -v
        return _report_error(exc, verbose=verbose, fmt=fmt)

"""python -m bench [--reference] [all | SCENARIO ... | plot | report] (see `python -m bench list`).

Results go to bench/out/ (ignored by git); with --reference, to bench/results/, the
committed reference runs the docs quote (`plot` and `report` read the same folder)."""

from __future__ import annotations

import json
import sys

from bench import (  # noqa: F401  (importing a scenarios module registers its scenarios)
    harness,
    plots,
    scenarios_app,
    scenarios_browser,
    scenarios_foundation,
    scenarios_matrix,
    scenarios_multiprocess,
    scenarios_node_host,
    scenarios_openai,
    scenarios_ray,
    scenarios_remote,
    scenarios_server,
    scenarios_soak,
    scenarios_speech,
    scenarios_wasm,
)

#: scenarios that draw their own figure (kept by `plot`)
OWN_PLOTS = {"voice_loop", "voice_matrix", "voice_density"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    reference = "--reference" in argv
    args = [a for a in argv if a != "--reference"]
    folder = harness.RESULTS if reference else harness.OUT
    if not args or args == ["list"]:
        print("scenarios:", ", ".join(harness.SCENARIOS))
        print("also: all, plot [SCENARIO ...] (PNGs from the saved results), report (REPORT.md); "
              "--reference: bench/results/ (committed) instead of bench/out/")
        return 0
    if args[0] == "report":
        print(f"wrote {plots.report(folder)}")
        return 0
    if args[0] == "plot":  # redraw from the saved JSON, without running anything
        argv = args
        for path in sorted(folder.glob("*.json")):
            result = json.loads(path.read_text())
            if argv[1:] and path.stem not in argv[1:]:
                continue
            if path.stem in OWN_PLOTS:
                continue
            png = plots.plot(result, path.with_suffix(".png"))
            print(f"wrote {png}" if png else f"{path.stem}: no series to plot")
        return 0
    names = list(harness.SCENARIOS) if args == ["all"] else args
    unknown = [n for n in names if n not in harness.SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; have {', '.join(harness.SCENARIOS)}")
        return 2
    harness.run(names, argv, reference=reference)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""python -m bench [all | SCENARIO ... | plot | report] (see `python -m bench list`)."""

from __future__ import annotations

import json
import sys

from bench import (  # noqa: F401  (importing a scenarios module registers its scenarios)
    harness,
    plots,
    scenarios_app,
    scenarios_browser,
    scenarios_foundation,
    scenarios_multiprocess,
    scenarios_node_host,
    scenarios_ray,
    scenarios_remote,
    scenarios_server,
    scenarios_soak,
    scenarios_speech,
    scenarios_wasm,
)

#: scenarios that draw their own figure (kept by `plot`)
OWN_PLOTS = {"voice_loop"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv == ["list"]:
        print("scenarios:", ", ".join(harness.SCENARIOS))
        print("also: all, plot [SCENARIO ...] (PNGs from the saved results), report (REPORT.md)")
        return 0
    if argv[0] == "report":
        print(f"wrote {plots.report(harness.RESULTS)}")
        return 0
    if argv[0] == "plot":  # redraw from the saved JSON, without running anything
        for path in sorted(harness.RESULTS.glob("*.json")):
            result = json.loads(path.read_text())
            if argv[1:] and path.stem not in argv[1:]:
                continue
            if path.stem in OWN_PLOTS:
                continue
            png = plots.plot(result, path.with_suffix(".png"))
            print(f"wrote {png}" if png else f"{path.stem}: no series to plot")
        return 0
    names = list(harness.SCENARIOS) if argv == ["all"] else argv
    unknown = [n for n in names if n not in harness.SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; have {', '.join(harness.SCENARIOS)}")
        return 2
    harness.run(names, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

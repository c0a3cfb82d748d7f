"""python -m bench [all | SCENARIO ...] (see `python -m bench list`)."""

from __future__ import annotations

import sys

from bench import (  # noqa: F401  (importing a scenarios module registers its scenarios)
    harness,
    scenarios_foundation,
    scenarios_multiprocess,
    scenarios_node_host,
    scenarios_remote,
    scenarios_server,
    scenarios_soak,
    scenarios_speech,
    scenarios_wasm,
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv == ["list"]:
        print("scenarios:", ", ".join(harness.SCENARIOS))
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

"""``nsdd-edge``: the device runtime (live reconstruction, calibration, info, benchmarks, capture host)."""

from __future__ import annotations

import sys

from nsdd_edge.cli_common import run_dispatcher

COMMANDS = {
    "run": "nsdd_edge.commands.run",
    "calibrate": "nsdd_edge.commands.calibrate",
    "info": "nsdd_edge.commands.info",
    "bench": "nsdd_edge.commands.bench",
    "serve-camera": "nsdd_edge.commands.serve_camera",
}


def main(argv=None) -> int:
    return run_dispatcher("nsdd-edge", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())

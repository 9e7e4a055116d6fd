"""``nsdd-export``: student + FFT pseudo-inverse → ONNX → FP16/INT8 → TensorRT plan → edge bundle."""

from __future__ import annotations

import sys

from nsdd_edge.cli_common import run_dispatcher

COMMANDS = {
    "onnx": "export.onnx_graph",
    "quantize": "export.quantize",
    "verify": "export.verify",
    "engine": "export.engine",
    "bundle": "export.make_bundle",
}


def main(argv=None) -> int:
    return run_dispatcher("nsdd-export", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())

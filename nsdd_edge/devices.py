"""The device targets as data: which JetPack/L4T ships which TensorRT, CUDA, Python and numpy.

The table lives in ``nsdd_edge/assets/device_versions.json``; ``deploy/jetson/setup.sh`` detects the release
with it (``python3 -m nsdd_edge.devices jetson /etc/nv_tegra_release``), ``nsdd-edge info`` shows the row of
the machine it runs on, and ``docs/DEVICES.md`` holds :func:`markdown_tables` (a test keeps them equal).
Standard library only: setup.sh runs this before anything is installed.
"""

from __future__ import annotations

import json
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

VERSIONS_FILE = Path(__file__).with_name("assets") / "device_versions.json"
NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")


class DeviceError(ValueError):
    """Not a Jetson, an unreadable release file, or a release nsdd-edge does not support."""


@cache
def versions() -> dict[str, Any]:
    """The parsed ``device_versions.json``."""
    return json.loads(VERSIONS_FILE.read_text())


def parse_nv_tegra_release(text: str, where: str = str(NV_TEGRA_RELEASE)) -> str:
    """``"# R36 (release), REVISION: 4.0, GCID: …"`` → ``"36.4.0"``; :class:`DeviceError` otherwise."""
    line = text.splitlines()[0] if text else ""
    m = re.match(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)", line)
    if not m:
        raise DeviceError(f"{where}: cannot read the L4T release from: {line.strip() or '(empty)'}")
    return f"{m.group(1)}.{m.group(2)}"


def jetson_row(l4t: str) -> dict[str, Any]:
    """The table row of L4T release ``l4t`` (``"36.4.0"``): the longest matching ``l4t`` prefix wins.

    :class:`DeviceError` for an unknown release, JetPack 5 or older, or a row marked unsupported."""
    parts = l4t.split(".")
    best: dict[str, Any] | None = None
    best_len = -1
    for row in versions()["jetson"]:
        for prefix in row["l4t"]:
            p = prefix.split(".")
            if parts[: len(p)] == p and len(p) > best_len:
                best, best_len = row, len(p)
    if best is None:
        major = int(parts[0]) if parts[0].isdigit() else 0
        if major and major < 36:
            raise DeviceError(f"L4T R{l4t} (JetPack 5 or older) is not supported: nsdd-edge needs TensorRT 10 "
                              "(JetPack 6.1 or later, L4T R36.4+)")
        known = ", ".join(f"R{p} = JetPack {r['jetpack']}" for r in versions()["jetson"] for p in r["l4t"])
        raise DeviceError(f"unknown L4T release R{l4t} (known: {known})")
    if not best["supported"]:
        raise DeviceError(f"L4T R{l4t} is JetPack {best['jetpack']} with TensorRT {best['tensorrt']}: not supported "
                          f"({best['note']})")
    return best


def detect_jetson(release_file: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """``(l4t, row)`` of this Jetson (``/etc/nv_tegra_release``); :class:`DeviceError` if none or unsupported."""
    path = Path(release_file or NV_TEGRA_RELEASE)
    try:
        text = path.read_text()
    except OSError:
        raise DeviceError(f"{path} not found: this is not a Jetson with JetPack (L4T)") from None
    l4t = parse_nv_tegra_release(text, str(path))
    return l4t, jetson_row(l4t)


def markdown_tables() -> str:
    """The version tables of ``docs/DEVICES.md`` (generated from the data, never edited by hand)."""
    v = versions()
    lines = ["| JetPack | L4T | Ubuntu | Python | numpy (apt) | TensorRT | CUDA | cuDNN | supported | source |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in v["jetson"]:
        l4t = ", ".join(f"R{p}" + ("" if p.count(".") == 2 else ".x") for p in r["l4t"])
        ok = "yes" if r["supported"] else f"no: {r['note']}"
        if r["supported"] and r["note"]:
            ok += f" ({r['note']})"
        lines.append(f"| {r['jetpack']} | {l4t} | {r['ubuntu']} | {r['python']} | {r['numpy']} | {r['tensorrt']} | "
                     f"{r['cuda']} | {r['cudnn']} | {ok} | {r['source']} |")
    lines += ["", "| board | OS | Python | numpy (apt) | camera stack | raw frames | source |", "|---|---|---|---|---|---|---|"]
    for r in v["raspberry_pi"]:
        lines.append(f"| {r['board']} | {r['os']} | {r['python']} | {r['numpy']} | {r['camera_stack']} | {r['raw']} | "
                     f"{r['source']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``jetson [RELEASE_FILE]``: print ``l4t=R… jetpack=… tensorrt=… cuda=… python=…`` (exit 1 with the reason
    on stderr if unsupported); ``table``: print the Markdown tables."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["table"]:
        print(markdown_tables(), end="")
        return 0
    if argv[:1] == ["jetson"] and len(argv) <= 2:
        try:
            l4t, row = detect_jetson(argv[1] if len(argv) == 2 else None)
        except DeviceError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"l4t=R{l4t} jetpack={row['jetpack']} tensorrt={row['tensorrt']} cuda={row['cuda']} "
              f"python={row['python']}")
        return 0
    print("usage: python -m nsdd_edge.devices jetson [RELEASE_FILE] | table", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""deploy/: shell scripts parse (bash -n) and pass shellcheck, systemd units verify, JetPack detection works."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCRIPTS = sorted(DEPLOY.rglob("*.sh"))
UNITS = sorted(DEPLOY.rglob("*.service"))


def test_deploy_files_exist():
    names = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    for required in ("jetson/setup.sh", "jetson/nsdd-edge.service", "jetson/Dockerfile", "pi/setup.sh",
                     "pi/nsdd-camera.service"):
        assert required in names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_scripts_parse_and_are_executable(script):
    r = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert script.stat().st_mode & 0o111, f"{script} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_shellcheck(script):
    r = subprocess.run(["shellcheck", "--severity=style", str(script)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _systemd_analyze_works() -> bool:
    if shutil.which("systemd-analyze") is None:
        return False
    r = subprocess.run(["systemd-analyze", "--version"], check=False, capture_output=True, text=True)
    return r.returncode == 0


@pytest.mark.skipif(not _systemd_analyze_works(), reason="systemd-analyze not available")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_units_verify(unit, tmp_path):
    """``systemd-analyze verify`` checks syntax and that ExecStart is executable, so the install prefix
    /opt/nsdd-edge is mapped to a temporary directory holding an executable nsdd-edge."""
    prefix = tmp_path / "opt-nsdd-edge"
    (prefix / "venv" / "bin").mkdir(parents=True)
    exe = prefix / "venv" / "bin" / "nsdd-edge"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    text = unit.read_text()
    assert "Restart=on-failure" in text and "RestartSec=" in text and "User=nsdd" in text
    copy = tmp_path / unit.name
    copy.write_text(text.replace("/opt/nsdd-edge", str(prefix)))
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], check=False, capture_output=True, text=True)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if unit.name in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


@pytest.mark.parametrize("release, expected", [
    ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 2024",
     "l4t=R36.4.0 jetpack=6"),
    ("# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, DATE: Fri Jul 19 2024",
     "l4t=R36.3.0 jetpack=6"),
    ("# R38 (release), REVISION: 2.0, GCID: 41844464, BOARD: generic, EABI: aarch64, DATE: Thu Aug 21 2025",
     "l4t=R38.2.0 jetpack=7"),
])
def test_jetson_setup_detects_the_jetpack_release(tmp_path, release, expected):
    f = tmp_path / "nv_tegra_release"
    f.write_text(release + "\n")
    r = subprocess.run(["bash", str(DEPLOY / "jetson/setup.sh"), "--detect-only"], check=False, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "NV_TEGRA_RELEASE": str(f)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected


@pytest.mark.parametrize("release, message", [
    ("# R35 (release), REVISION: 5.0, GCID: 1, BOARD: t186ref, EABI: aarch64, DATE: 2024", "JetPack 5"),
    ("garbage", "cannot read the L4T release"),
    (None, "not a Jetson"),
])
def test_jetson_setup_refuses_unsupported_systems(tmp_path, release, message):
    f = tmp_path / "nv_tegra_release"
    if release is not None:
        f.write_text(release + "\n")
    r = subprocess.run(["bash", str(DEPLOY / "jetson/setup.sh"), "--detect-only"], check=False, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "NV_TEGRA_RELEASE": str(f)})
    assert r.returncode == 1 and message in r.stderr


def test_jetson_setup_rejects_bad_options():
    r = subprocess.run(["bash", str(DEPLOY / "jetson/setup.sh"), "--precision", "fp8"], check=False,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "fp16 or int8" in r.stderr
    r = subprocess.run(["bash", str(DEPLOY / "pi/setup.sh"), "--frobnicate"], check=False, capture_output=True, text=True)
    assert r.returncode == 1 and "unknown option" in r.stderr


def test_register_engine_records_the_engine_in_the_bundle(tmp_path):
    from nsdd_edge.bundle import PreprocessConfig, load_bundle, write_bundle
    from nsdd_edge.optics import LenslessGeometry
    from nsdd_edge.psf_sim import simulate_psf

    (tmp_path / "model.onnx").write_bytes(b"onnx model bytes")
    np.save(tmp_path / "dark.npy", np.zeros((16, 16), np.float32))
    bundle = tmp_path / "bundle"
    write_bundle(bundle, psf=simulate_psf("contour", (16, 16), 0), geometry=LenslessGeometry.make("circular", (16, 16)),
                 lam=1e-2, channels=1, preprocess=PreprocessConfig(background_file="dark.npy"),
                 models={"onnx_fp32": {"path": tmp_path / "model.onnx", "opset": 18}},
                 extra_files={"dark.npy": tmp_path / "dark.npy"}, provenance={"by": "test"})
    (bundle / "engine.plan").write_bytes(b"serialized engine")
    r = subprocess.run([sys.executable, str(DEPLOY / "jetson/register_engine.py"), str(bundle),
                        str(bundle / "engine.plan"), "--tensorrt", "10.3.0", "--jetpack", "6"],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    b = load_bundle(bundle)  # verifies every file's SHA-256
    assert b.models["engine"]["file"] == "engine.plan" and b.models["engine"]["tensorrt"] == "10.3.0"
    assert b.models["onnx_fp32"]["opset"] == 18 and b.provenance == {"by": "test"}
    assert (bundle / "dark.npy").exists() and b.preprocess.background_file == "dark.npy"
    r = subprocess.run([sys.executable, str(DEPLOY / "jetson/register_engine.py"), str(bundle),
                        str(tmp_path / "missing.plan")], check=False, capture_output=True, text=True)
    assert r.returncode == 1 and "missing.plan" in r.stderr


def test_dockerfile_targets_jetpack6_l4t_images():
    text = (DEPLOY / "jetson/Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36." in text
    assert "--system-site-packages" in text and "ENTRYPOINT" in text
    assert "torch" not in text.replace("# ", "")


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value
    return out


def test_service_arguments_are_accepted_by_the_commands():
    """The units' command lines (with their environment files) parse with the real subcommand parsers."""
    import argparse
    import importlib
    import shlex

    jetson = _env_file(DEPLOY / "jetson/nsdd-edge.env")
    run = importlib.import_module("nsdd_edge.commands.run")
    p = argparse.ArgumentParser()
    run.configure_parser(p)
    args = p.parse_args(shlex.split(jetson["NSDD_EDGE_RUN_ARGS"]))
    assert args.source == "csi://0"

    pi = _env_file(DEPLOY / "pi/nsdd-camera.env")
    from nsdd_edge.commands import serve_camera
    from nsdd_edge.sources import PiCamera2Source, open_source

    p = argparse.ArgumentParser()
    serve_camera.configure_parser(p)
    args = p.parse_args(["--source", pi["NSDD_CAMERA_SOURCE"], "--bind", pi["NSDD_CAMERA_BIND"]])
    assert serve_camera.parse_bind(args.bind) == ("0.0.0.0", 5000)
    cam = open_source(args.source)  # parsed and validated, not opened
    assert isinstance(cam, PiCamera2Source) and cam.size == (2028, 1520) and cam.bits == 12

"""deploy/: shell scripts parse (bash -n) and pass shellcheck, systemd units verify, JetPack detection works
(from the release table nsdd_edge/assets/device_versions.json), the device venv keeps numpy 1.x, engines are
registered in place (bind-mounted bundle, read-only parent) without losing bundle fields, and the container
entry point rebuilds an engine the bundle does not register."""

from __future__ import annotations

import json
import os
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
     "l4t=R36.4.0 jetpack=6.1 tensorrt=10.3 cuda=12.6 python=3.10"),
    ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan 8 2025",
     "l4t=R36.4.3 jetpack=6.2 tensorrt=10.3 cuda=12.6 python=3.10"),
    ("# R36 (release), REVISION: 4.4, GCID: 41062509, BOARD: generic, EABI: aarch64, DATE: Mon Jun 16 2025",
     "l4t=R36.4.4 jetpack=6.1/6.2 tensorrt=10.3 cuda=12.6 python=3.10"),
    ("# R38 (release), REVISION: 2.0, GCID: 41844464, BOARD: generic, EABI: aarch64, DATE: Thu Aug 21 2025",
     "l4t=R38.2.0 jetpack=7.0 tensorrt=10.13 cuda=13.0 python=3.12"),
])
def test_jetson_setup_detects_the_jetpack_release(tmp_path, release, expected):
    f = tmp_path / "nv_tegra_release"
    f.write_text(release + "\n")
    r = subprocess.run(["bash", str(DEPLOY / "jetson/setup.sh"), "--detect-only"], check=False, capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], "NV_TEGRA_RELEASE": str(f)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected


@pytest.mark.parametrize("release, message", [
    ("# R35 (release), REVISION: 5.0, GCID: 1, BOARD: t186ref, EABI: aarch64, DATE: 2024", "JetPack 5"),
    # JetPack 6.0 (L4T R36.2/R36.3) ships TensorRT 8.6, not 10.x: refused, not mistaken for "JetPack 6"
    ("# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, DATE: Fri Jul 19 2024",
     "JetPack 6.0 with TensorRT 8.6.2: not supported"),
    ("# R36 (release), REVISION: 2.0, GCID: 35084178, BOARD: generic, EABI: aarch64, DATE: Tue Dec 19 2023",
     "JetPack 6.0 DP with TensorRT 8.6.2"),
    ("# R37 (release), REVISION: 1.0, GCID: 1, BOARD: generic, EABI: aarch64, DATE: 2026", "unknown L4T release R37.1.0"),
    ("garbage", "cannot read the L4T release"),
    (None, "not a Jetson"),
])
def test_jetson_setup_refuses_unsupported_systems(tmp_path, release, message):
    f = tmp_path / "nv_tegra_release"
    if release is not None:
        f.write_text(release + "\n")
    r = subprocess.run(["bash", str(DEPLOY / "jetson/setup.sh"), "--detect-only"], check=False, capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], "NV_TEGRA_RELEASE": str(f)})
    assert r.returncode == 1 and message in r.stderr, r.stderr


def test_info_shows_the_jetpack_row_on_a_jetson(tmp_path, monkeypatch):
    from nsdd_edge import devices, trt_runner
    from nsdd_edge.commands.info import versions

    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 1, BOARD: generic, EABI: aarch64, DATE: 2025\n")
    monkeypatch.setattr(devices, "NV_TEGRA_RELEASE", release)
    monkeypatch.setattr(trt_runner, "is_jetson", lambda: True)
    assert versions()["jetpack"] == "6.2 (L4T R36.4.3; expects TensorRT 10.3, CUDA 12.6)"
    release.write_text("# R36 (release), REVISION: 3.0, GCID: 1, BOARD: generic, EABI: aarch64, DATE: 2024\n")
    assert versions()["jetpack"].startswith("unsupported: L4T R36.3.0 is JetPack 6.0 with TensorRT 8.6.2")


def test_jetson_setup_rejects_bad_options():
    r = subprocess.run(["bash", str(DEPLOY / "jetson/setup.sh"), "--precision", "fp8"], check=False,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "fp16, int8 or fp32" in r.stderr
    r = subprocess.run(["bash", str(DEPLOY / "pi/setup.sh"), "--frobnicate"], check=False, capture_output=True, text=True)
    assert r.returncode == 1 and "unknown option" in r.stderr


def _support_bundle(tmp_path: Path) -> Path:
    """A small bundle with a background frame, provenance and a support window (like the default bundle)."""
    from nsdd_edge.bundle import PreprocessConfig, write_bundle
    from nsdd_edge.optics import LenslessGeometry
    from nsdd_edge.psf_sim import simulate_psf

    (tmp_path / "model.onnx").write_bytes(b"onnx model bytes")
    np.save(tmp_path / "dark.npy", np.zeros((16, 16), np.float32))
    bundle = tmp_path / "parent" / "bundle"
    write_bundle(bundle, psf=simulate_psf("contour", (16, 16), 0), geometry=LenslessGeometry.make("circular", (16, 16)),
                 lam=1e-2, channels=1, preprocess=PreprocessConfig(background_file="dark.npy"),
                 models={"onnx_fp32": {"path": tmp_path / "model.onnx", "opset": 18}},
                 extra_files={"dark.npy": tmp_path / "dark.npy"}, provenance={"by": "test"}, support_shape=(8, 8))
    return bundle


def _register(bundle: Path, engine: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEPLOY / "jetson/register_engine.py"), str(bundle), str(engine),
                           "--tensorrt", "10.3.0", "--jetpack", "6.1", *extra], check=False, capture_output=True, text=True)


def test_register_engine_records_the_engine_in_the_bundle(tmp_path):
    """issue 14 #4: registering keeps every field of bundle.json, geometry.support_shape included."""
    from nsdd_edge.bundle import load_bundle

    bundle = _support_bundle(tmp_path)
    before = json.loads((bundle / "bundle.json").read_text())
    tmp_engine = bundle / ".engine.abc123"  # where setup.sh lets trtexec write
    tmp_engine.write_bytes(b"serialized engine")
    r = _register(bundle, tmp_engine, "--precision", "fp16", "--source-model", "onnx_fp16")
    assert r.returncode == 0, r.stderr
    b = load_bundle(bundle)  # verifies every file's SHA-256
    assert b.models["engine"]["file"] == "engine.plan" and b.models["engine"]["tensorrt"] == "10.3.0"
    assert b.models["engine"]["typing"] == "strongly-typed" and not tmp_engine.exists()
    assert b.support_shape == (8, 8) and b.display_crop(np.zeros((16, 16))).shape == (8, 8)
    after = json.loads((bundle / "bundle.json").read_text())
    assert {k: v for k, v in after.items() if k != "models"} == {k: v for k, v in before.items() if k != "models"}
    assert after["models"]["onnx_fp32"] == before["models"]["onnx_fp32"]
    assert b.provenance == {"by": "test"} and (bundle / "dark.npy").exists()
    # a rebuild replaces the engine; the old file goes once bundle.json no longer names it
    (tmp_path / "new.plan").write_bytes(b"engine of the next TensorRT")
    r = _register(bundle, tmp_path / "new.plan")
    assert r.returncode == 0, r.stderr
    b = load_bundle(bundle)
    assert (bundle / b.models["engine"]["file"]).read_bytes() == b"engine of the next TensorRT"
    assert sorted(p.name for p in bundle.iterdir() if p.name.endswith(".plan")) == [b.models["engine"]["file"]]
    r = _register(bundle, tmp_path / "missing.plan")
    assert r.returncode == 2 and "missing.plan" in r.stderr


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], check=False, capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs root and unshare --mount (private mount namespace)")
@pytest.mark.parametrize("parent_read_only", [True, False], ids=["read-only-parent", "bind-mount-ebusy"])
def test_bundle_rewrites_in_place_on_a_bind_mount(tmp_path, parent_read_only):
    """issue 14 #3: the container's /bundle is a bind mount (rename → EBUSY) under a parent the service user
    cannot write. In a private mount namespace the bundle is bind-mounted onto itself (and its parent remounted
    read-only): registering an engine and rewriting the whole bundle (write_bundle) both succeed in place."""
    bundle = _support_bundle(tmp_path)
    parent = bundle.parent
    (tmp_path / "engine.plan").write_bytes(b"engine")
    script = f"""
import sys
from nsdd_edge.bundle import load_bundle, write_bundle
import runpy
sys.argv = ["register_engine.py", "{bundle}", "{tmp_path / 'engine.plan'}", "--tensorrt", "10.3.0"]
try:
    runpy.run_path("{DEPLOY / 'jetson/register_engine.py'}", run_name="__main__")
except SystemExit as exc:
    assert exc.code == 0, exc.code
b = load_bundle("{bundle}")
assert b.models["engine"]["file"] == "engine.plan" and b.support_shape == (8, 8)
models = {{k: {{"path": b.root / m["file"], **{{x: y for x, y in m.items() if x not in ("file", "sha256")}}}}
          for k, m in b.models.items() if k != "onnx_fp32"}}
b2 = write_bundle(b.root, psf=b.psf, geometry=b.geometry, lam=b.lam, channels=b.channels, preprocess=b.preprocess,
                  models=models, name="rewritten", provenance=b.provenance, support_shape=b.support_shape,
                  extra_files={{"dark.npy": b.root / "dark.npy"}})
assert b2.name == "rewritten" and set(b2.models) == {{"engine"}} and b2.support_shape == (8, 8)
print("in place OK")
"""
    mounts = f"mount --bind {bundle} {bundle}"
    if parent_read_only:
        mounts += f" && mount --rbind {parent} {parent} && mount -o remount,bind,ro {parent}"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f"{mounts} && touch {parent}/probe 2>/dev/null; {sys.executable} -c '{script}'"],
                       check=False, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "in place OK" in r.stdout, r.stdout + r.stderr
    assert sorted(p.name for p in parent.iterdir()) == ["bundle"] + (["probe"] if not parent_read_only else [])
    assert not (bundle / "student.onnx").exists() and not (bundle / "model.onnx").exists()  # dropped model removed
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_register_engine_needs_build(tmp_path):
    """The container's "build an engine?" decision: none registered, a stray engine.plan, another TensorRT."""
    bundle = _support_bundle(tmp_path)

    def needs(trt: str = "10.3.0") -> int:
        return subprocess.run([sys.executable, str(DEPLOY / "jetson/register_engine.py"), str(bundle), "--needs-build",
                               "--tensorrt", trt], check=False, capture_output=True, text=True).returncode

    assert needs() == 0
    (bundle / "engine.plan").write_bytes(b"left by an interrupted build")  # the old entrypoint trusted this file
    assert needs() == 0
    (tmp_path / "e.plan").write_bytes(b"engine")
    assert _register(bundle, tmp_path / "e.plan").returncode == 0
    assert needs("10.3.0") == 1 and needs("10.7.0") == 0


def test_entrypoint_builds_an_unregistered_engine(tmp_path):
    """entrypoint.sh with a fake install prefix: a stray engine.plan triggers setup.sh --build-engine; a bundle
    registering an engine of this TensorRT goes straight to nsdd-edge."""
    bundle = _support_bundle(tmp_path)
    prefix = tmp_path / "prefix"
    (prefix / "venv/bin").mkdir(parents=True)
    (prefix / "src/deploy/jetson").mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    tensorrt = tmp_path / "site" / "tensorrt"
    tensorrt.mkdir(parents=True)
    (tensorrt / "__init__.py").write_text("__version__ = '10.3.0'\n")
    py = prefix / "venv/bin/python"
    py.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path / 'site'}:{ROOT} exec {sys.executable} \"$@\"\n")
    for name, body in (("venv/bin/nsdd-edge", f"echo nsdd-edge \"$@\" >> {calls}"),
                       ("src/deploy/jetson/setup.sh", f"echo setup.sh \"$@\" >> {calls}")):
        (prefix / name).write_text(f"#!/bin/sh\n{body}\n")
    for f in (py, prefix / "venv/bin/nsdd-edge", prefix / "src/deploy/jetson/setup.sh"):
        f.chmod(0o755)
    shutil.copy(DEPLOY / "jetson/register_engine.py", prefix / "src/deploy/jetson/register_engine.py")

    def start() -> list[str]:
        calls.write_text("")
        r = subprocess.run(["bash", str(DEPLOY / "jetson/entrypoint.sh"), "run", "--model", str(bundle), "--frames", "0"],
                           check=False, capture_output=True, text=True, env={**os.environ, "NSDD_EDGE_PREFIX": str(prefix)})
        assert r.returncode == 0, r.stderr
        return calls.read_text().splitlines()

    (bundle / "engine.plan").write_bytes(b"stray engine of an interrupted build")
    assert start() == [f"setup.sh --build-engine {bundle} --prefix {prefix}",
                       f"nsdd-edge run --model {bundle} --frames 0"]
    (tmp_path / "e.plan").write_bytes(b"engine")
    assert _register(bundle, tmp_path / "e.plan").returncode == 0
    assert start() == [f"nsdd-edge run --model {bundle} --frames 0"]


def test_jetson_service_keeps_the_argus_socket_visible():
    """issue 14 #1: csi:// reaches nvargus-daemon through /tmp/argus_socket; a PrivateTmp=true unit never opens
    the default camera. The unit must not hide /tmp and must start after nvargus-daemon."""
    unit = (DEPLOY / "jetson/nsdd-edge.service").read_text()
    settings = {}
    for line in unit.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), value.strip())
    assert "csi://" in _env_file(DEPLOY / "jetson/nsdd-edge.env")["NSDD_EDGE_RUN_ARGS"]
    assert settings.get("PrivateTmp", "false").lower() in ("false", "no", "0")
    assert "nvargus-daemon.service" in settings["After"]
    for key in ("InaccessiblePaths", "TemporaryFileSystem"):
        assert "/tmp" not in settings.get(key, "")


def _pip_installs(text: str) -> list[str]:
    """The pip install commands of a shell script or Dockerfile (continuation lines joined)."""
    joined = text.replace("\\\n", " ")
    return [line for line in joined.splitlines() if "pip install" in line or '"${pip[@]}"' in line]


@pytest.mark.parametrize("path", ["jetson/setup.sh", "jetson/Dockerfile"])
def test_every_device_pip_install_keeps_numpy_1(path):
    """issue 14 #2: each pip install into the system-site-packages venv passes -c deploy/jetson/constraints.txt
    (numpy<2), so onnxruntime/cuda-python cannot replace the numpy 1.x that JetPack's cv2 is built on."""
    text = (DEPLOY / path).read_text()
    installs = [line for line in _pip_installs(text) if not line.lstrip().startswith("#")]
    assert installs
    for line in installs:
        if "local pip=(" in line:
            continue
        assert "constraints.txt" in line or '"${pip[@]}"' in line, line
    if path.endswith("setup.sh"):
        assert 'local pip=("$PYTHON" -m pip install -c "$SRC_DIR/deploy/jetson/constraints.txt")' in text
    assert [ln.strip() for ln in (DEPLOY / "jetson/constraints.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")] == ["numpy<2"]


def _manylinux_aarch64(glibc_minor: int) -> list[str]:
    return [arg for m in range(17, glibc_minor + 1) for arg in ("--platform", f"manylinux_2_{m}_aarch64")]


@pytest.mark.slow
def test_dockerfile_pip_resolution_keeps_numpy_below_2(tmp_path):
    """The Dockerfile's PyPI requirements resolved for the device (aarch64, CPython 3.10, glibc 2.35 = JetPack 6)
    with ``pip install --dry-run --report``: with the constraints numpy stays < 2. Needs PyPI (skipped offline)."""
    text = (DEPLOY / "jetson/Dockerfile").read_text().replace("\\\n", " ")
    reqs = [r for line in _pip_installs(text) for r in __import__("re").findall(r'"([a-z][a-z0-9_-]*[<>=][^"]*)"', line)]
    assert any(r.startswith("onnxruntime") for r in reqs) and any(r.startswith("cuda-python") for r in reqs)
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--report", str(report), "--quiet", "--ignore-installed",
           "--only-binary=:all:", *_manylinux_aarch64(35), "--python-version", "3.10", "--implementation", "cp",
           "--abi", "cp310", "--target", str(tmp_path / "t"), "-c", str(DEPLOY / "jetson/constraints.txt"), *reqs]
    try:
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("PyPI did not answer within 300 s")
    if r.returncode != 0 and any(w in r.stderr for w in ("Network", "connection", "resolve host", "No matching")):
        pytest.skip(f"PyPI unreachable or without aarch64 wheels here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    installed = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert "onnxruntime" in installed and "numpy" in installed
    assert int(installed["numpy"].split(".")[0]) < 2, installed


def test_dockerfile_targets_jetpack6_l4t_images():
    """The base image is an L4T release with TensorRT 10 (r36.4+, not JetPack 6.0's r36.2/r36.3)."""
    from nsdd_edge.devices import jetson_row

    text = (DEPLOY / "jetson/Dockerfile").read_text()
    tag = text.split("ARG BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r", 1)[1].split()[0]
    assert jetson_row(tag)["tensorrt"].startswith("10.")
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
    args = p.parse_args(["--source", pi["NSDD_CAMERA_SOURCE"], "--bind", pi["NSDD_CAMERA_BIND"],
                         *shlex.split(pi["NSDD_CAMERA_EXTRA_ARGS"])])
    assert serve_camera.parse_bind(args.bind) == ("0.0.0.0", 5000) and args.model is None
    example = next(line for line in (DEPLOY / "pi/nsdd-camera.env").read_text().splitlines()
                   if line.startswith("#   NSDD_CAMERA_EXTRA_ARGS="))
    assert p.parse_args(["--source", "sim://", *shlex.split(example.split("=", 1)[1])]).model
    assert "$NSDD_CAMERA_EXTRA_ARGS" in (DEPLOY / "pi/nsdd-camera.service").read_text()
    cam = open_source(args.source)  # parsed and validated, not opened
    assert isinstance(cam, PiCamera2Source) and cam.size == (2028, 1520) and cam.bits == 12


def test_devices_doc_holds_the_version_table_and_a_check_per_issue_item():
    """docs/DEVICES.md: the version tables are the data's (generated, not retyped), each of issue 14's twelve
    items has a manual check, and every test it names exists."""
    import re

    from nsdd_edge.devices import markdown_tables

    doc = (ROOT / "docs/DEVICES.md").read_text()
    table = doc.split("<!-- device-versions:begin -->\n", 1)[1].split("<!-- device-versions:end -->", 1)[0]
    assert table == markdown_tables()
    checks = doc.split("## Manual checks on the hardware", 1)[1]
    assert [int(n) for n in re.findall(r"^ ?(\d+)\. \*\*", checks, flags=re.MULTILINE)] == list(range(1, 13))
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", doc))
    defined = {m for f in (ROOT / "tests").glob("test_*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.MULTILINE)}
    assert named and named <= defined, named - defined


def test_bench_flops_counts_conv_and_matmul(tmp_path):
    """bench/bench_flops.py (the FLOPs and bytes behind DEVICES.md's frame-time estimates) on a two-node graph."""
    import importlib.util

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    w = numpy_helper.from_array(np.zeros((4, 1, 3, 3), np.float32), "w")
    m = numpy_helper.from_array(np.zeros((8, 8), np.float32), "m")
    nodes = [helper.make_node("MatMul", ["x", "m"], ["t"], name="physics/dft"),
             helper.make_node("Conv", ["t", "w"], ["y"], name="student/conv", pads=[1, 1, 1, 1])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, m]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "g.onnx"))
    spec = importlib.util.spec_from_file_location("bench_flops", ROOT / "bench" / "bench_flops.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.graph_flops(tmp_path / "g.onnx") == {"physics": 2 * 64 * 8, "student": 2 * 4 * 64 * 9}
    # bytes: the initializers once (float32), every node output (t: 64, y: 256 values) written and read once
    assert bench.graph_bytes(tmp_path / "g.onnx") == {"weights": 4 * (36 + 64), "activations": 2 * 4 * (64 + 256)}
    # the roofline is the slower of compute and memory
    assert bench.roofline_ms(1e9, 1e6, 100.0, 10.0, 0.5, 0.5) == pytest.approx(20.0)  # compute: 1 GFLOP at 50 GFLOP/s
    assert bench.roofline_ms(1e6, 1e9, 100.0, 10.0, 0.5, 0.5) == pytest.approx(200.0)  # memory: 1 GB at 5 GB/s
    pi = bench.devices()
    assert pi["Raspberry Pi 5 CPU, 1 core"] == pytest.approx((38.4, 17.068))  # 2 pipes × 4 lanes × FMA × 2.4 GHz
    assert pi["Raspberry Pi 5 CPU, 4 cores"][0] == pytest.approx(153.6)

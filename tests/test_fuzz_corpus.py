"""Replay the hostile-input corpus ``tests/fuzz/corpus.jsonl`` (made by ``tests/fuzz/make_corpus.py``; the
format is in its docstring): every case must end in a named error or a correct result — no traceback (an
exception of any other type fails the test) and no bad input accepted."""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from nsdd_edge import framing
from nsdd_edge.bundle import BundleError, PreprocessConfig, load_bundle, write_bundle
from nsdd_edge.cli import main
from nsdd_edge.commands.serve_camera import CameraServer
from nsdd_edge.engines import NumpyWienerEngine, OnnxRuntimeEngine
from nsdd_edge.optics import LenslessGeometry, array_hash, normalize, read_array
from nsdd_edge.preprocess import FrameRejected, Preprocessor
from nsdd_edge.psf_sim import simulate_psf
from nsdd_edge.recorder import read_recorded_raw
from nsdd_edge.sources import EndOfStream, FrameUnreadable, SourceError, SourceStalled, open_source
from nsdd_edge.validate import validate_profile

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "fuzz" / "corpus.jsonl"
CASES = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
HAS_ONNX = importlib.util.find_spec("onnx") is not None
SIZE = 16


def _cases(kind: str) -> list:
    return [pytest.param(c, id=c["id"]) for c in CASES if c["kind"] == kind]


def decode(v):
    """The corpus' JSON values with ``{"$f": "nan"|"inf"|"-inf"}`` turned into floats."""
    if isinstance(v, dict):
        if set(v) == {"$f"}:
            return float(v["$f"])
        return {k: decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [decode(x) for x in v]
    return v


def test_corpus_is_large_and_up_to_date():
    kinds = {c["kind"] for c in CASES}
    assert len(CASES) >= 200 and kinds == {"bundle", "camera_profile", "profile", "frame", "frame_file",
                                           "to_server", "to_client"}
    r = subprocess.run([sys.executable, str(HERE / "fuzz" / "make_corpus.py"), "--check"], check=False,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------------------
# Bundles: `nsdd-edge info` and `nsdd-edge run` must agree, name the problem, never raise
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory) -> Path:
    psf = normalize(simulate_psf("contour", (SIZE, SIZE), 0), "sum")
    cam = open_source("sim://?realtime=0", psf=psf, channels=3)
    b = write_bundle(tmp_path_factory.mktemp("fuzz") / "base", psf=psf,
                     geometry=LenslessGeometry.make("circular", (SIZE, SIZE)), lam=1e-2, channels=3,
                     preprocess=PreprocessConfig(**cam.matching_preprocess()), name="fuzz-base")
    return b.root


def _array(spec: dict) -> np.ndarray:
    shape = tuple(spec["shape"])
    fill = spec.get("fill", "contour")
    dtype = spec.get("dtype", "float32")
    if fill == "contour" and len(shape) >= 2 and min(shape[-2:]) >= 8:
        a = normalize(simulate_psf("contour", shape[-2:], 0), "sum")[0]
        a = np.broadcast_to(a, shape).copy()
    elif fill == "black":
        a = np.full(shape, 256.0)
    else:
        a = np.ones(shape) / max(1, int(np.prod(shape)))
    if fill == "negative":
        a = -a
    elif fill == "zeros":
        a = np.zeros(shape)
    elif fill == "nan":
        a = a.copy()
        a.flat[3] = np.nan
    elif fill == "inf":
        a = a.copy()
        a.flat[3] = np.inf
    elif fill == "slightly_negative":
        a = a - 1e-6 * a.max()
    if dtype == "uint16":
        a = np.rint(a / a.max() * 60000)
    return a.astype(dtype)


def _conv_onnx(path: Path, size: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((3, 3, 3, 3), np.float32)
    for c in range(3):
        w[c, c, 1, 1] = 0.5
    node = helper.make_node("Conv", ["y", "w"], ["x"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                            ["N", 3, size, size])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def apply_ops(root: Path, ops: list, meta_name: str = "bundle.json") -> None:
    """Apply a case's ``ops`` to the bundle (or camera profile: ``meta_name="camera.json"``) in ``root``."""
    meta_path = root / meta_name
    meta = json.loads(meta_path.read_text())
    text: bytes | None = None

    def at(path):
        node = meta
        for key in path[:-1]:
            node = node[key]
        return node, path[-1]

    for op in ops:
        kind = op["op"]
        if kind == "set":
            node, key = at(op["path"])
            node[key] = decode(op["value"])
        elif kind == "del":
            node, key = at(op["path"])
            del node[key]
        elif kind == "set_nested":
            node, key = at(op["path"])
            value: list = []
            for _ in range(op["depth"] - 1):
                value = [value]
            node[key] = value
        elif kind == "json_text":
            text = op["text"].encode()
        elif kind == "json_bytes":
            text = base64.b64decode(op["b64"])
        elif kind == "json_nested":
            text = b"[" * op["depth"] + b"]" * op["depth"]
        elif kind == "json_pad":
            meta[op.get("key", "provenance")] = {"pad": "x" * op["bytes"]}
        elif kind == "replace_with_dir":
            p = root / op["name"]
            p.unlink()
            p.mkdir()
            if op["name"] == "bundle.json":
                return
        elif kind == "psf":
            a = _array(op["array"])
            np.save(root / "psf.npy", a)
            try:  # the hash the bundle would have had, so that only the content checks can refuse it
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
                    meta["psf"]["sha256"] = array_hash(read_array(root / "psf.npy"))
            except ValueError:  # NaN, or a shape no reader takes: any hash, the PSF cannot pass anyway
                meta["psf"]["sha256"] = array_hash(np.real(a).astype(np.float32))
        elif kind == "psf_pickle":
            np.save(root / "psf.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
        elif kind == "truncate":
            p = root / op["name"]
            p.write_bytes(p.read_bytes()[: op["keep"]])
        elif kind == "write":
            (root / op["name"]).write_bytes(base64.b64decode(op["b64"]))
        elif kind == "npy_header":
            with open(root / op["name"], "wb") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                         "shape": tuple(op["shape"])})
        elif kind == "copy":
            shutil.copy(root / op["src"], root / op["dest"])
        elif kind == "copy_outside":
            shutil.copy(root / op["src"], root.parent / op["dest"])
        elif kind == "outside_model":
            (root.parent / op["dest"]).write_bytes(b"outside the bundle")
        elif kind == "symlink":
            p = root / op["name"]
            if p.exists() or p.is_symlink():
                p.unlink()
            p.symlink_to(op["target"])
        elif kind == "mkdir":
            (root / op["name"]).mkdir()
        elif kind == "model":
            path = root / op["file"] if "/" not in op["file"] else Path(op["file"])
            content = op.get("content")
            if content in ("conv16", "conv32"):
                if not HAS_ONNX:
                    pytest.skip("onnx is not installed (pip install -e .[export])")
                _conv_onnx(path, SIZE if content == "conv16" else 32)
            elif content == "garbage":
                path.write_bytes(b"\x08\x07garbage that is not a protobuf \xff\xfe" * 8)
            elif content == "empty":
                path.write_bytes(b"")
            record = {"file": op["file"], "precision": "fp32"}
            sha = op.get("sha", "file")
            if sha == "file":
                record["sha256"] = _sha(path)
            elif sha == "zeros":
                record["sha256"] = "0" * 64
            elif sha == "upper":
                record["sha256"] = _sha(path).upper()
            elif sha.startswith("of:"):
                record["sha256"] = _sha(Path(sha[3:]))
            if op.get("data_sha") == "zeros":
                record["data_sha256"] = "0" * 64
            meta.setdefault("models", {})[op["kind"]] = record
        elif kind == "background":
            np.save(root / "dark.npy", _array(op["array"]).astype(np.uint16))
            meta["preprocess"]["background_file"] = "dark.npy"
            meta["preprocess"]["background_sha256"] = {"file": _sha(root / "dark.npy"), "zeros": "0" * 64,
                                                       "none": None}[op["sha"]]
        else:
            raise AssertionError(f"unknown op {kind}")
    meta_path.write_bytes(text if text is not None else json.dumps(meta, indent=1).encode())


@pytest.mark.parametrize("case", _cases("bundle"))
def test_bundle_case(case, base_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "bundle"
    shutil.copytree(base_bundle, root)
    apply_ops(root, case["ops"])
    expect = case["expect"]
    if expect == "error_if_onnxruntime":
        expect = "error" if HAS_ORT else "ok"
    rc_info = main(["info", "--model", str(root), "--json"])
    out = capsys.readouterr().out
    report = json.loads(out)["bundle"]
    rc_run = main(["run", "--model", str(root), "--source", "sim://?realtime=0", "--frames", "2", "--quiet",
                   "--record", "rec", "--stats", "stats.json", "--snapshot", ""])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if expect == "error":
        assert rc_info == 2 and not report["verified"], report
        assert str(root) in report["error"] or "bundle.json" in report["error"], report["error"]
        assert rc_run == 2 and "nsdd-edge run: error:" in err and not Path("rec").exists(), err
        return
    assert rc_info == 0 and report["verified"] and report["checks"], report
    if expect == "camera_mismatch":
        assert rc_run == 2 and "camera profile" in err, err
        return
    assert rc_run == 0, err
    stats = json.loads(Path("stats.json").read_text())
    assert stats["frames_out"] == stats["recorded"] == 2
    bundle = load_bundle(root)
    prep = Preprocessor(bundle.preprocess, bundle.root)
    if stats["info"]["engine_kind"] == "onnx":
        reference = OnnxRuntimeEngine(bundle.model_path("onnx_fp32"), input_shape=bundle.input_shape)
    else:
        reference = NumpyWienerEngine(bundle)
    for meta_file in sorted(Path("rec").glob("0*.json")):  # the reconstruction is the right one, finite
        meta = json.loads(meta_file.read_text())
        x = np.load(Path("rec") / meta["recon"]["file"])
        want = reference.infer(prep(read_recorded_raw(Path("rec") / meta["raw"]["file"]))[None])[0]
        assert np.isfinite(x).all() and x.shape == (bundle.channels, *bundle.geometry.scene_shape)
        np.testing.assert_allclose(x, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


# ------------------------------------------------------------------------------------------------
# Camera profiles (camera.json)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_profile(tmp_path_factory) -> Path:
    from nsdd_edge.camera import CameraProfile, NoiseModel

    psf = normalize(simulate_psf("contour", (SIZE, SIZE), 0), "sum")
    profile = CameraProfile(name="fuzz-cam", preprocess=PreprocessConfig(black_level=64.0, normalization="fixed",
                                                                         scale=100.0),
                            psf=psf, geometry=LenslessGeometry.make("crop", (SIZE, SIZE), conv_shape=(32, 32),
                                                                    scene_shape=(32, 32)),
                            lam=1e-2, noise=NoiseModel(read_std=0.01))
    out = tmp_path_factory.mktemp("camera")
    profile.save(out)
    return out


@pytest.mark.parametrize("case", _cases("camera_profile"))
def test_camera_profile_case(case, base_profile, tmp_path):
    from nsdd_edge.camera import ProfileError, load_profile

    root = tmp_path / "profile"
    shutil.copytree(base_profile, root)
    apply_ops(root, case["ops"], "camera.json")
    if case["expect"] == "error":
        with pytest.raises(ProfileError) as err:
            load_profile(root)
        assert "camera.json" in str(err.value) or str(root) in str(err.value), str(err.value)
        return
    profile = load_profile(root)
    assert profile.name == "fuzz-cam" and profile.psf.shape == (1, SIZE, SIZE) and profile.lam == 1e-2


# ------------------------------------------------------------------------------------------------
# Profiles and frames
# ------------------------------------------------------------------------------------------------


def _frame(spec: dict):
    if "python" in spec:
        return {"list": [[1, 2], [3, 4]], "none": None, "bytes": b"\x00" * 64}[spec["python"]]
    shape, dtype, fill = tuple(spec["shape"]), np.dtype(spec["dtype"]), spec.get("fill", "ramp")
    n = int(np.prod(shape)) if shape else 1
    if dtype.kind in "OUM":
        return np.full(shape, 1).astype(dtype) if dtype.kind != "O" else np.full(shape, object(), dtype=object)
    ramp = (100 + np.arange(n) * 7 % 900).reshape(shape).astype(np.float64)
    if fill == "zeros":
        a = np.zeros(shape)
    elif fill == "ones":
        a = np.ones(shape)
    elif fill == "max":
        a = np.full(shape, 65535.0)
    elif fill == "fraction":
        a = ramp + 0.25
    elif fill == "negative":
        a = ramp - 2000
    else:
        a = ramp
    a = a.astype(dtype)
    if fill in ("nan", "inf"):
        a.flat[5] = np.nan if fill == "nan" else np.inf
    return a


@pytest.mark.parametrize("case", _cases("profile"))
def test_profile_case(case, tmp_path):
    settings = decode(case["settings"])
    raw = _frame(case["raw"])
    if case["expect"] == "error":
        with pytest.raises((BundleError, FrameRejected)):  # ProfileError is a BundleError; both are ValueErrors
            Preprocessor(validate_profile(settings), tmp_path)(raw)
        return
    y = Preprocessor(validate_profile(settings), tmp_path)(raw)
    assert y.dtype == np.float32 and list(y.shape) == case["expect"] and np.isfinite(y).all()


@pytest.mark.parametrize("case", _cases("frame"))
def test_frame_case(case):
    pre = Preprocessor(validate_profile(decode(case["settings"])))
    pre(_frame(case["first"]))  # the stream's first, good frame
    frame = _frame(case["frame"])
    if case["expect"] == "rejected":
        with pytest.raises(FrameRejected):
            pre(frame)
        pre(_frame(case["first"]))  # a rejected frame leaves the stream usable
        return
    y = pre(frame)
    assert np.isfinite(y).all() and y.shape == pre(_frame(case["first"])).shape


@pytest.mark.parametrize("case", _cases("frame_file"))
def test_frame_file_case(case, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    content, path = case["content"], folder / ("a_" + case["name"])
    expected = None
    if "b64" in content:
        path.write_bytes(base64.b64decode(content["b64"]))
    elif "npy_pickle" in content:
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif "npy" in content:
        expected = _frame(content["npy"])
        np.save(path, expected)
    else:
        expected = _frame(content["image"])
        assert cv2.imwrite(str(path), expected[..., ::-1] if expected.ndim == 3 else expected)
    if "truncate" in content.get("npy", content.get("image", {})):
        path.write_bytes(path.read_bytes()[: content.get("npy", content.get("image"))["truncate"]])
        expected = None
    following = np.arange(16, dtype=np.uint16).reshape(4, 4)
    np.save(folder / "b_next.npy", following)
    src = open_source(f"file://{folder}")
    try:
        if case["expect"] == "unreadable":
            with pytest.raises(FrameUnreadable, match="a_"):
                src.read()
        else:
            np.testing.assert_array_equal(src.read().data, expected)
        np.testing.assert_array_equal(src.read().data, following)  # the source goes on with the next file
        with pytest.raises(EndOfStream):
            src.read()
    finally:
        src.close()


# ------------------------------------------------------------------------------------------------
# Network messages
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def camera_server(tmp_path_factory):
    stack = np.arange(2 * 4 * 5, dtype=np.uint16).reshape(2, 4, 5)
    path = tmp_path_factory.mktemp("served") / "stack.npy"
    np.save(path, stack)
    source = open_source(f"file://{path}?loop=1")
    server = CameraServer(source, "127.0.0.1", 0, token="tok", log=lambda m: None, handshake_timeout=0.5)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_s": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join(5)
    source.close()


def _read_answer(sock: socket.socket, limit_s: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or ``limit_s`` passes (False)."""
    sock.settimeout(0.1)
    data, end = b"", time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
        if data.startswith(framing.MAGIC) and len(data) >= framing.PREFIX.size:
            _, _, head_len, _ = framing.PREFIX.unpack(data[: framing.PREFIX.size])
            if b"welcome" in data[framing.PREFIX.size: framing.PREFIX.size + head_len]:
                return data, False
    return data, False


@pytest.mark.parametrize("case", _cases("to_server"))
def test_to_server_case(case, camera_server):
    port = camera_server.address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(base64.b64decode(case["b64"]))
            if case["close"]:
                s.shutdown(socket.SHUT_WR)
        except OSError:  # the server hung up before everything was sent: refused early
            pass
        answer, closed = _read_answer(s, 3.0)
    if case["expect"] == "welcome":
        assert b'"welcome"' in answer
    else:
        assert closed, "the server must hang up on a bad handshake within its deadline"
        assert b'"welcome"' not in answer
    client = open_source(f"tcp://127.0.0.1:{port}?token=tok")  # and it still serves a real client
    deadline = time.monotonic() + 5
    while True:
        try:
            assert client.read(timeout=2).data.shape == (4, 5)
            break
        except SourceError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    client.close()


class _Host:
    """A capture host that welcomes the client, then answers its read with the case's bytes."""

    def __init__(self, data: bytes, close: bool):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port, self.data, self.close_after = self.listener.getsockname()[1], data, close
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.listener.settimeout(5)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            try:
                conn.settimeout(5)
                framing.recv_message(conn)
                framing.send_message(conn, {"type": "welcome", "source": {}})
                framing.recv_message(conn)
                conn.sendall(self.data)
                if not self.close_after:
                    self.done.wait(10)
            except OSError:
                pass

    def stop(self):
        self.done.set()
        self.thread.join(5)
        self.listener.close()


@pytest.mark.parametrize("case", _cases("to_client"))
def test_to_client_case(case):
    host = _Host(base64.b64decode(case["b64"]), case["close"])
    client = open_source(f"tcp://127.0.0.1:{host.port}?reconnect=0&grace=0.3&connect_timeout=2")
    expect = case["expect"]
    try:
        if isinstance(expect, dict):
            f = client.read(timeout=0.2)
            want = np.arange(12).reshape(3, 4).astype(expect["frame"]["dtype"])
            assert f.data.dtype == want.dtype
            np.testing.assert_array_equal(f.data, want)
            return
        t0 = time.monotonic()
        with pytest.raises(SourceError) as err:
            client.read(timeout=0.2)
        assert time.monotonic() - t0 < 3.0
        kinds = {"stalled": SourceStalled, "end": EndOfStream}
        if expect in kinds:
            assert isinstance(err.value, kinds[expect])
        else:
            assert not isinstance(err.value, (SourceStalled, EndOfStream)), repr(err.value)
    finally:
        client.close()
        host.stop()


def test_corpus_json_is_plain(tmp_path):
    """The corpus holds no absolute paths of this machine and no secrets beyond the dummy 'tok'."""
    text = CORPUS.read_text()
    assert str(Path.home()) not in text and os.getcwd() not in text
    assert copy.deepcopy(CASES) == [json.loads(line) for line in text.splitlines()]

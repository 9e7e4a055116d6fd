"""Generate the hostile-input corpus ``tests/fuzz/corpus.jsonl`` (issue 15): bundles, preprocessing profiles,
frames, frame files and network messages, each with what must happen to it.

    python tests/fuzz/make_corpus.py            # rewrite the corpus
    python tests/fuzz/make_corpus.py --check    # exit 1 if the committed corpus differs from what this makes

Deterministic (no randomness, no clock): the corpus is data, reviewed in diffs; ``tests/test_fuzz_corpus.py``
replays every case in CI and checks it ends in a named error or a correct result, never in a traceback or in
a bad input accepted. One JSON object per line::

    {"id", "kind": "bundle" | "camera_profile" | "profile" | "frame" | "frame_file" | "to_server" | "to_client",
     "expect", ...}

- ``bundle``: ``ops`` applied to a tiny valid bundle the test makes (16×16 sensor, 3 channels, contour PSF):
  ``set``/``del`` a field of ``bundle.json``, replace its text or bytes, rewrite ``psf.npy`` (``rehash`` keeps
  the hash matching, so only the content checks can refuse it), add models, files, links, a background.
  ``expect``: ``error`` (``info`` and ``run`` both refuse it with exit 2 and a message naming it), ``ok`` (both
  succeed, the reconstruction matches an independent one), ``error_if_onnxruntime``, or ``camera_mismatch`` (a
  valid bundle ``info`` accepts, made for another camera: ``run`` on ``sim://`` stops at the first frame, exit 2).
- ``camera_profile``: the same kind of ``ops`` on a valid camera profile (``camera.json`` + ``psf.npy``,
  :mod:`nsdd_edge.camera`): ``error`` (``ProfileError``) or ``ok`` (it loads).
- ``profile``: preprocessing ``settings`` and a raw frame ``raw``; ``expect`` ``error`` or the output shape.
- ``frame``: a frame given to a preprocessor after a good first frame: ``rejected`` or ``ok``.
- ``frame_file``: the bytes of one file of a ``file://`` folder: ``unreadable`` (skipped, named) or ``ok``.
- ``to_server``: bytes a client sends to ``serve-camera`` first: ``refused`` or ``welcome`` (valid hello).
- ``to_client``: bytes a capture host answers to a read: ``error``, ``stalled``, ``end`` or ``frame``.

Floats JSON cannot hold are written ``{"$f": "nan" | "inf" | "-inf"}``.
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.jsonl"
PREFIX = struct.Struct(">4sB3xIQ")  # nsdd_edge.framing.PREFIX, restated so the corpus does not depend on it
NAN, INF, NINF = {"$f": "nan"}, {"$f": "inf"}, {"$f": "-inf"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def message(header, payload: bytes = b"", *, magic=b"NSDF", version=1, head_len=None, payload_len=None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return (PREFIX.pack(magic, version, len(head) if head_len is None else head_len,
                        len(payload) if payload_len is None else payload_len) + head + payload)


def bundle_cases() -> list[dict]:
    cases: list[dict] = []

    def add(name: str, ops: list, expect: str = "error") -> None:
        cases.append({"id": f"bundle-{name}", "kind": "bundle", "ops": ops, "expect": expect})

    def setv(path, value):
        return {"op": "set", "path": path if isinstance(path, list) else [path], "value": value}

    add("valid", [], "ok")
    # bundle.json as a whole
    for name, text in [("list", "[]"), ("null", "null"), ("number", "42"), ("string", '"bundle"'), ("empty", ""),
                       ("truncated", '{"format": "nsdd-edge-bundle", "version": 1, "geo'),
                       ("trailing-garbage", '{"format": "nsdd-edge-bundle"} xx'), ("bom", "\ufeff{}"),
                       ("single-quotes", "{'format': 'nsdd-edge-bundle'}")]:
        add(f"json-{name}", [{"op": "json_text", "text": text}])
    add("json-not-utf8", [{"op": "json_bytes", "b64": b64(b"{\"name\": \"\xff\xfe\"}")}])
    add("json-deep-nesting-100000", [{"op": "json_nested", "depth": 100000}])
    add("json-deep-provenance-40", [{"op": "set_nested", "path": ["provenance", "x"], "depth": 40}])
    add("json-over-1mib", [{"op": "json_pad", "bytes": 1_100_000}])
    add("json-big-but-bounded", [{"op": "json_pad", "bytes": 200_000}], "ok")
    add("json-is-a-directory", [{"op": "replace_with_dir", "name": "bundle.json"}])
    # format and version
    add("format-missing", [{"op": "del", "path": ["format"]}])
    add("format-other", [setv("format", "onnx-bundle")])
    add("format-number", [setv("format", 1)])
    for name, v in [("abc", "abc"), ("float", 1.5), ("bool", True), ("zero", 0), ("negative", -1), ("future", 2),
                    ("null", None), ("string-1", "1"), ("huge", 10**30), ("nan", NAN)]:
        add(f"version-{name}", [setv("version", v)])
    add("unknown-top-level-field", [setv("engine_hint", "trt")])
    for key in ("geometry", "lam", "channels", "psf"):
        add(f"missing-{key}", [{"op": "del", "path": [key]}])
    add("missing-name", [{"op": "del", "path": ["name"]}], "ok")
    # a valid bundle (default preprocessing: black level 0) for another camera than sim:// (black level 256)
    add("missing-preprocess", [{"op": "del", "path": ["preprocess"]}], "camera_mismatch")
    add("missing-models", [{"op": "del", "path": ["models"]}], "ok")
    for name, v in [("number", 5), ("empty", ""), ("newline", "a\nb"), ("long", "n" * 300), ("list", ["a"])]:
        add(f"name-{name}", [setv("name", v)])
    # λ
    for name, v in [("text", "abc"), ("nan", NAN), ("inf", INF), ("-inf", NINF), ("zero", 0), ("negative", -1e-3),
                    ("huge", 1e6), ("bool", True), ("null", None), ("list", [1e-3]), ("complex", {"re": 1e-3}),
                    ("string-number", "1e-3")]:
        add(f"lam-{name}", [setv("lam", v)])
    add("lam-tiny", [setv("lam", 1e-12)], "ok")
    add("lam-integer", [setv("lam", 1)], "ok")
    # projector
    for name, v in [("svd", "svd"), ("number", 5), ("null", None), ("upper", "TIKHONOV")]:
        add(f"projector-{name}", [setv("projector", v)])
    add("projector-truncated", [setv("projector", "truncated")], "ok")
    # channels
    for name, v in [("two", 2), ("zero", 0), ("four", 4), ("string", "3"), ("float", 3.0), ("bool", True),
                    ("negative", -3)]:
        add(f"channels-{name}", [setv("channels", v)])
    add("channels-one", [setv("channels", 1)], "ok")
    add("channels-one-with-rgb-psf", [setv("channels", 1), {"op": "psf", "array": {"shape": [3, 16, 16]}}])
    # geometry
    add("geometry-list", [setv("geometry", [16, 16])])
    add("geometry-null", [setv("geometry", None)])
    add("geometry-model-sphere", [setv(["geometry", "model"], "sphere")])
    add("geometry-model-missing", [{"op": "del", "path": ["geometry", "model"]}])
    for name, v in [("one-side", [16]), ("string-side", [16, "16"]), ("zero", [0, 16]), ("negative", [-16, 16]),
                    ("float", [16.0, 16.0]), ("huge-200000", [200000, 200000]), ("over-limit", [8193, 8193]),
                    ("bool", [True, 16]), ("nested", [[16], 16]), ("text", "16x16")]:
        add(f"sensor-{name}", [setv(["geometry", "sensor_shape"], v), setv(["geometry", "scene_shape"], v),
                               setv(["geometry", "conv_shape"], v)])
    add("sensor-4096-over-memory", [setv(["geometry", "sensor_shape"], [4096, 4096]),
                                    setv(["geometry", "scene_shape"], [4096, 4096]),
                                    setv(["geometry", "conv_shape"], [4096, 4096])])
    add("circular-scene-differs", [setv(["geometry", "scene_shape"], [8, 8])])
    add("crop-conv-smaller-than-sensor", [setv(["geometry", "model"], "crop"),
                                          setv(["geometry", "conv_shape"], [8, 8])])
    add("geometry-unknown-key", [setv(["geometry", "pixel_pitch_um"], 1.55)])
    add("support-larger-than-grid", [setv(["geometry", "support_shape"], [32, 32])])
    add("support-float", [setv(["geometry", "support_shape"], [8.5, 8])])
    add("support-8", [setv(["geometry", "support_shape"], [8, 8])], "ok")
    add("sensor-18x20", [setv(["geometry", "sensor_shape"], [18, 20]), setv(["geometry", "scene_shape"], [18, 20]),
                         setv(["geometry", "conv_shape"], [18, 20])], "ok")
    # the PSF record
    add("psf-string", [setv("psf", "psf.npy")])
    add("psf-no-sha", [{"op": "del", "path": ["psf", "sha256"]}])
    add("psf-sha-short", [setv(["psf", "sha256"], "abc")])
    add("psf-sha-wrong", [setv(["psf", "sha256"], "0" * 64)])
    add("psf-extra-key", [setv(["psf", "scale"], 2.0)])
    for name, v in [("parent", "../psf.npy"), ("absolute", "/etc/passwd"), ("subdir", "sub/psf.npy"),
                    ("hidden", ".psf.npy"), ("missing", "missing.npy"), ("not-npy", "psf.txt"), ("empty", ""),
                    ("number", 7), ("dotdot", ".."), ("backslash", "..\\psf.npy")]:
        ops = [setv(["psf", "file"], v)]
        if name == "not-npy":
            ops.insert(0, {"op": "copy", "src": "psf.npy", "dest": "psf.txt"})
        add(f"psf-file-{name}", ops)
    add("psf-file-outside-copy", [{"op": "copy_outside", "src": "psf.npy", "dest": "psf_outside.npy"},
                                  setv(["psf", "file"], "../psf_outside.npy")])
    add("psf-symlink-outside", [{"op": "copy_outside", "src": "psf.npy", "dest": "psf_outside.npy"},
                                {"op": "symlink", "name": "psf.npy", "target": "../psf_outside.npy"}])
    add("psf-symlink-etc-passwd", [{"op": "symlink", "name": "psf.npy", "target": "/etc/passwd"}])
    # the PSF's content (hash recomputed: only the content checks can refuse these)
    for name, spec in [("complex", {"shape": [1, 16, 16], "dtype": "complex64"}),
                       ("negative", {"shape": [1, 16, 16], "fill": "negative"}),
                       ("zeros", {"shape": [1, 16, 16], "fill": "zeros"}),
                       ("nan", {"shape": [1, 16, 16], "fill": "nan"}),
                       ("inf", {"shape": [1, 16, 16], "fill": "inf"}),
                       ("two-channels", {"shape": [2, 16, 16]}),
                       ("larger-than-sensor", {"shape": [1, 32, 32]}),
                       ("four-d", {"shape": [1, 1, 16, 16]}),
                       ("one-d", {"shape": [256]}),
                       ("bool", {"shape": [1, 16, 16], "dtype": "bool"}),
                       ("tiny", {"shape": [1, 1, 1]})]:
        add(f"psf-{name}", [{"op": "psf", "array": spec}])
    for name, spec in [("two-d", {"shape": [16, 16]}), ("rgb", {"shape": [3, 16, 16]}),
                       ("float64", {"shape": [1, 16, 16], "dtype": "float64"}),
                       ("uint16", {"shape": [1, 16, 16], "dtype": "uint16"}),
                       ("smaller-than-sensor", {"shape": [1, 8, 8]}),
                       ("slightly-negative", {"shape": [1, 16, 16], "fill": "slightly_negative"})]:
        add(f"psf-{name}", [{"op": "psf", "array": spec}], "ok")
    add("psf-object-pickle", [{"op": "psf_pickle"}])
    add("psf-truncated", [{"op": "truncate", "name": "psf.npy", "keep": 100}])
    add("psf-empty-file", [{"op": "write", "name": "psf.npy", "b64": ""}])
    add("psf-text-file", [{"op": "write", "name": "psf.npy", "b64": b64(b"this is not an array\n")}])
    add("psf-header-claims-10g", [{"op": "npy_header", "name": "psf.npy", "shape": [1, 100000, 100000]}])
    add("psf-is-a-directory", [{"op": "replace_with_dir", "name": "psf.npy"}])
    # preprocessing inside a bundle (standalone profiles are below)
    add("preprocess-list", [setv("preprocess", [])])
    add("preprocess-unknown-gamma", [setv(["preprocess", "gamma"], 2.2)])
    add("preprocess-grayscale-with-3-channels", [setv(["preprocess", "grayscale"], True)])
    add("preprocess-crop-not-sensor-size", [setv(["preprocess", "crop"], [0, 0, 8, 8])])
    add("preprocess-crop-sensor-size", [setv(["preprocess", "crop"], [0, 0, 16, 16])], "ok")
    add("preprocess-channel-order-bgr", [setv(["preprocess", "channel_order"], "BGR")], "ok")
    add("preprocess-scale-nan", [setv(["preprocess", "scale"], NAN)])
    add("preprocess-black-level-string", [setv(["preprocess", "black_level"], "256")])
    add("background-outside", [setv(["preprocess", "background_file"], "../dark.npy")])
    add("background-no-hash", [{"op": "background", "array": {"shape": [16, 16, 3], "fill": "black"}, "sha": "none"}])
    add("background-wrong-hash", [{"op": "background", "array": {"shape": [16, 16, 3], "fill": "black"},
                                   "sha": "zeros"}])
    add("background-ok", [{"op": "background", "array": {"shape": [16, 16, 3], "fill": "black"}, "sha": "file"}],
        "ok")
    add("background-other-shape", [{"op": "background", "array": {"shape": [8, 8, 3], "fill": "black"},
                                    "sha": "file"}])
    add("background-missing-file", [setv(["preprocess", "background_file"], "dark.npy"),
                                    setv(["preprocess", "background_sha256"], "0" * 64)])
    # models
    add("models-list", [setv("models", [])])
    add("models-string", [setv("models", "student.onnx")])
    add("model-record-string", [setv("models", {"onnx_fp32": "student.onnx"})])
    # (refused before any runtime reads them: the content is garbage; only the two graphs below need onnx)
    add("model-kind-unknown", [{"op": "model", "kind": "pytorch", "file": "m.onnx", "content": "garbage"}])
    add("model-no-sha", [{"op": "model", "kind": "onnx_fp32", "file": "m.onnx", "content": "garbage", "sha": "none"}])
    add("model-sha-mismatch", [{"op": "model", "kind": "onnx_fp32", "file": "m.onnx", "content": "garbage",
                                "sha": "zeros"}])
    add("model-sha-upper", [{"op": "model", "kind": "onnx_fp32", "file": "m.onnx", "content": "garbage",
                             "sha": "upper"}])
    add("model-etc-passwd", [{"op": "model", "kind": "onnx_fp32", "file": "../../../../etc/passwd",
                              "content": None, "sha": "of:/etc/passwd"}])
    add("model-absolute", [{"op": "model", "kind": "onnx_fp32", "file": "/etc/passwd", "content": None,
                            "sha": "of:/etc/passwd"}])
    add("model-missing-file", [{"op": "model", "kind": "onnx_fp32", "file": "m.onnx", "content": None,
                                "sha": "zeros"}])
    add("model-not-onnx-suffix", [{"op": "model", "kind": "onnx_fp32", "file": "m.bin", "content": "garbage"}])
    add("model-empty-file", [{"op": "model", "kind": "onnx_fp32", "file": "m.onnx", "content": "empty"}])
    add("model-is-a-directory", [{"op": "mkdir", "name": "m.onnx"},
                                 {"op": "model", "kind": "onnx_fp32", "file": "m.onnx", "content": None,
                                  "sha": "zeros"}])
    add("model-symlink-outside", [{"op": "outside_model", "dest": "m_outside.onnx"},
                                  {"op": "symlink", "name": "m.onnx", "target": "../m_outside.onnx"},
                                  {"op": "model", "kind": "onnx_fp32", "file": "m.onnx", "content": None,
                                   "sha": "file"}])
    add("model-sidecar-unhashed", [{"op": "model", "kind": "onnx_fp32", "file": "m.onnx", "content": "garbage"},
                                   {"op": "write", "name": "m.onnx.data", "b64": b64(b"\x00" * 64)}])
    add("model-sidecar-hash-but-no-file", [{"op": "model", "kind": "onnx_fp32", "file": "m.onnx",
                                            "content": "garbage", "data_sha": "zeros"}])
    add("model-corrupt-onnx-matching-hash", [{"op": "model", "kind": "onnx_fp32", "file": "m.onnx",
                                              "content": "garbage"}], "error_if_onnxruntime")
    add("model-onnx-wrong-input-size", [{"op": "model", "kind": "onnx_fp32", "file": "m.onnx", "content": "conv32"}],
        "error_if_onnxruntime")
    add("model-onnx-valid", [{"op": "model", "kind": "onnx_fp32", "file": "m.onnx", "content": "conv16"}], "ok")
    add("model-engine-plan-unloadable-here", [{"op": "model", "kind": "engine", "file": "m.plan",
                                               "content": "garbage"}], "ok")
    # provenance
    add("provenance-string", [setv("provenance", "made by hand")])
    add("provenance-list", [setv("provenance", [1, 2])])
    add("provenance-free-form", [setv("provenance", {"note": "anything", "n": [1, {"a": None}]})], "ok")
    return cases


def camera_profile_cases() -> list[dict]:
    """``camera.json`` (nsdd_edge.camera) mutations of a valid profile the test saves: ``error`` (ProfileError
    naming the field) or ``ok`` (it loads)."""
    cases: list[dict] = []

    def add(name: str, ops: list, expect: str = "error") -> None:
        cases.append({"id": f"camera-{name}", "kind": "camera_profile", "ops": ops, "expect": expect})

    def setv(path, value):
        return {"op": "set", "path": path if isinstance(path, list) else [path], "value": value}

    add("valid", [], "ok")
    for name, text in [("list", "[]"), ("null", "null"), ("truncated", '{"format": "nsdd-camera-profile", "ver'),
                       ("empty", "")]:
        add(f"json-{name}", [{"op": "json_text", "text": text}])
    add("json-deep-nesting", [{"op": "json_nested", "depth": 50000}])
    add("json-deep-signal", [{"op": "set_nested", "path": ["signal", "x"], "depth": 40}])
    add("json-over-1mib", [{"op": "json_pad", "bytes": 1_100_000, "key": "signal"}])
    add("format-other", [setv("format", "nsdd-edge-bundle")])
    for name, v in [("string", "1"), ("future", 2), ("zero", 0), ("bool", True), ("nan", NAN)]:
        add(f"version-{name}", [setv("version", v)])
    for name, v in [("empty", ""), ("number", 5), ("long", "n" * 300)]:
        add(f"name-{name}", [setv("name", v)])
    add("preprocess-list", [setv("preprocess", [])])
    add("preprocess-unknown", [setv(["preprocess", "gamma"], 2.2)])
    add("preprocess-black-nan", [setv(["preprocess", "black_level"], NAN)])
    add("preprocess-background-etc-passwd", [setv(["preprocess", "background_file"], "/etc/passwd")])
    add("preprocess-reference-exposure-zero", [setv(["preprocess", "reference_exposure_us"], 0)])
    add("geometry-missing", [{"op": "del", "path": ["geometry"]}])
    add("geometry-huge", [setv(["geometry", "sensor_shape"], [200000, 200000])])
    add("geometry-model-sphere", [setv(["geometry", "model"], "sphere")])
    add("geometry-conv-smaller", [setv(["geometry", "conv_shape"], [8, 8])])
    add("geometry-sensor-floats", [setv(["geometry", "sensor_shape"], [16.0, 16.0])])
    add("psf-parent", [setv(["psf", "file"], "../psf.npy")])
    add("psf-sha-mismatch", [setv(["psf", "sha256"], "0" * 64)])
    add("psf-complex", [{"op": "psf", "array": {"shape": [1, 16, 16], "dtype": "complex64"}}])
    add("psf-negative", [{"op": "psf", "array": {"shape": [1, 16, 16], "fill": "negative"}}])
    add("psf-nan", [{"op": "psf", "array": {"shape": [1, 16, 16], "fill": "nan"}}])
    add("psf-larger-than-conv", [{"op": "psf", "array": {"shape": [1, 64, 64]}}])
    add("psf-pickle", [{"op": "psf_pickle"}])
    add("psf-header-claims-10g", [{"op": "npy_header", "name": "psf.npy", "shape": [1, 100000, 100000]}])
    add("psf-symlink-etc-passwd", [{"op": "symlink", "name": "psf.npy", "target": "/etc/passwd"}])
    add("psf-truncated", [{"op": "truncate", "name": "psf.npy", "keep": 100}])
    add("recon-missing", [{"op": "del", "path": ["recon"]}])
    for name, v in [("nan", NAN), ("negative", -1.0), ("text", "abc"), ("inf", INF), ("bool", True)]:
        add(f"recon-lam-{name}", [setv(["recon", "lam"], v)])
    add("recon-projector-svd", [setv(["recon", "projector"], "svd")])
    for name, v in [("negative", -0.1), ("text", "a"), ("inf", INF)]:
        add(f"noise-read-std-{name}", [setv(["noise", "read_std"], v)])
    add("noise-shot-gain-nan", [setv(["noise", "shot_gain"], NAN)])
    add("support-too-big", [setv("support", {"shape": [9999, 9999], "taper": 0})])
    add("support-taper-too-big", [setv("support", {"shape": [8, 8], "taper": 99})])
    add("support-taper-float", [setv("support", {"shape": [8, 8], "taper": 1.5})])
    add("support-list", [setv("support", [8, 8])])
    for name, v in [("zero", 0), ("negative", -5), ("text", "x")]:
        add(f"exposure-{name}", [setv("exposure", {"reference_us": v})])
    add("support-ok", [setv("support", {"shape": [8, 8], "taper": 2})], "ok")
    add("exposure-ok", [setv("exposure", {"reference_us": 2000.0})], "ok")
    add("noise-shot-gain-ok", [setv(["noise", "shot_gain"], 0.001)], "ok")
    return cases


def profile_cases() -> list[dict]:
    cases: list[dict] = []

    def add(name, settings, raw, expect):
        cases.append({"id": f"profile-{name}", "kind": "profile", "settings": settings,
                      "raw": {"shape": raw[0], "dtype": raw[1]}, "expect": expect})

    mono, rgb, mosaic = ([8, 8], "uint16"), ([8, 8, 3], "uint16"), ([8, 8], "uint16")
    add("defaults-mono", {}, mono, [1, 8, 8])
    add("defaults-rgb", {}, rgb, [3, 8, 8])
    add("bayer-bin2x2", {"bayer_pattern": "RGGB"}, mosaic, [3, 4, 4])
    add("bayer-lower-case", {"bayer_pattern": "bggr"}, mosaic, [3, 4, 4])
    add("bayer-bilinear", {"bayer_pattern": "GRBG", "demosaic": "bilinear"}, mosaic, [3, 8, 8])
    add("downsample-2", {"downsample": 2}, rgb, [3, 4, 4])
    add("crop", {"crop": [1, 2, 4, 5]}, mono, [1, 4, 5])
    add("grayscale", {"grayscale": True}, rgb, [1, 8, 8])
    add("channel-order", {"channel_order": "BGR"}, rgb, [3, 8, 8])
    add("flips", {"flip_vertical": True, "flip_horizontal": True}, mono, [1, 8, 8])
    add("fixed", {"normalization": "fixed", "scale": 4095.0, "black_level": 64}, mono, [1, 8, 8])
    add("none", {"normalization": "none", "white_level": 4095}, mono, [1, 8, 8])
    add("float-frame", {"normalization": "fixed", "scale": 2.5}, ([8, 8], "float32"), [1, 8, 8])
    add("uint8-frame", {}, ([8, 8, 3], "uint8"), [3, 8, 8])
    add("downsample-crop-bayer", {"bayer_pattern": "RGGB", "downsample": 2, "crop": [0, 0, 2, 2]},
        ([16, 16], "uint16"), [3, 2, 2])
    add("raw-crop", {"raw_crop": [2, 1, 4, 5]}, mono, [1, 4, 5])
    add("raw-crop-bayer", {"raw_crop": [2, 2, 4, 4], "bayer_pattern": "RGGB"}, mosaic, [3, 2, 2])
    add("reference-exposure", {"reference_exposure_us": 1000.0, "normalization": "none"}, mono, [1, 8, 8])
    bad = [("not-an-object", [1, 2]), ("string", "fixed"), ("unknown", {"gamma": 2.2}),
           ("black-negative", {"black_level": -1}), ("black-nan", {"black_level": NAN}),
           ("black-inf", {"black_level": INF}), ("black-string", {"black_level": "64"}),
           ("black-bool", {"black_level": True}), ("black-huge", {"black_level": 1e300}),
           ("white-below-black", {"black_level": 100, "white_level": 50}), ("white-nan", {"white_level": NAN}),
           ("bayer-unknown", {"bayer_pattern": "RGBG"}), ("bayer-number", {"bayer_pattern": 1}),
           ("demosaic-unknown", {"demosaic": "ahd"}), ("demosaic-null", {"demosaic": None}),
           ("background-path", {"background_file": "../dark.npy"}),
           ("background-absolute", {"background_file": "/etc/passwd"}),
           ("background-sha-bad", {"background_sha256": "xyz"}),
           ("downsample-zero", {"downsample": 0}), ("downsample-float", {"downsample": 2.5}),
           ("downsample-huge", {"downsample": 1000}), ("downsample-string", {"downsample": "2"}),
           ("downsample-bool", {"downsample": True}),
           ("crop-three", {"crop": [0, 0, 4]}), ("crop-negative", {"crop": [-1, 0, 4, 4]}),
           ("crop-zero-size", {"crop": [0, 0, 0, 4]}), ("crop-float", {"crop": [0, 0, 4.5, 4]}),
           ("crop-string", {"crop": "0,0,4,4"}), ("crop-huge", {"crop": [0, 0, 10**9, 4]}),
           ("flip-string", {"flip_vertical": "yes"}), ("flip-int", {"flip_horizontal": 1}),
           ("grayscale-null", {"grayscale": None}),
           ("channel-order-rgr", {"channel_order": "RGR"}), ("channel-order-long", {"channel_order": "RGBA"}),
           ("channel-order-number", {"channel_order": 123}),
           ("normalization-mean", {"normalization": "mean"}), ("scale-zero", {"scale": 0}),
           ("scale-negative", {"scale": -1.0}), ("scale-inf", {"scale": INF}), ("scale-text", {"scale": "1"}),
           ("raw-crop-three", {"raw_crop": [0, 0, 4]}), ("raw-crop-negative", {"raw_crop": [0, -2, 4, 4]}),
           ("raw-crop-odd-on-bayer", {"raw_crop": [1, 0, 4, 4], "bayer_pattern": "RGGB"}),
           ("raw-crop-string", {"raw_crop": "0 0 4 4"}), ("reference-exposure-zero", {"reference_exposure_us": 0}),
           ("reference-exposure-nan", {"reference_exposure_us": NAN}),
           ("reference-exposure-text", {"reference_exposure_us": "1000"}),
           ("reference-exposure-negative", {"reference_exposure_us": -5.0})]
    for name, settings in bad:
        add(name, settings, mono, "error")
    # settings of the right types that cannot fit the frames: an error at the first frame, named
    add("fit-crop-outside", {"crop": [4, 4, 8, 8]}, mono, "error")
    add("fit-downsample-too-big", {"downsample": 16}, mono, "error")
    add("fit-channel-order-mono", {"channel_order": "BGR"}, mono, "error")
    add("fit-bayer-on-rgb", {"bayer_pattern": "RGGB"}, rgb, "error")
    add("fit-bayer-odd", {"bayer_pattern": "RGGB"}, ([7, 8], "uint16"), "error")
    add("fit-background-needs-bundle", {"background_file": "dark.npy"}, mono, "error")
    add("fit-raw-crop-outside", {"raw_crop": [4, 4, 8, 8]}, mono, "error")
    return cases


def frame_cases() -> list[dict]:
    cases: list[dict] = []
    settings = {"black_level": 16, "normalization": "max"}

    def add(name, frame, expect, first=None, profile=None):
        cases.append({"id": f"frame-{name}", "kind": "frame", "settings": profile or settings,
                      "first": first or {"shape": [8, 8, 3], "dtype": "uint16"}, "frame": frame, "expect": expect})

    add("same-as-first", {"shape": [8, 8, 3], "dtype": "uint16"}, "ok")
    add("float-finite", {"shape": [8, 8, 3], "dtype": "float32"}, "ok")
    add("float64", {"shape": [8, 8, 3], "dtype": "float64"}, "ok")
    add("int32", {"shape": [8, 8, 3], "dtype": "int32"}, "ok")
    add("saturated", {"shape": [8, 8, 3], "dtype": "uint16", "fill": "max"}, "ok")
    add("other-shape", {"shape": [8, 9, 3], "dtype": "uint16"}, "rejected")
    add("transposed", {"shape": [3, 8, 8], "dtype": "uint16"}, "rejected")
    add("mono", {"shape": [8, 8], "dtype": "uint16"}, "rejected")
    add("one-d", {"shape": [192], "dtype": "uint16"}, "rejected")
    add("four-d", {"shape": [1, 8, 8, 3], "dtype": "uint16"}, "rejected")
    add("empty", {"shape": [0, 8, 3], "dtype": "uint16"}, "rejected")
    add("scalar", {"shape": [], "dtype": "uint16"}, "rejected")
    add("bool", {"shape": [8, 8, 3], "dtype": "bool"}, "rejected")
    add("complex", {"shape": [8, 8, 3], "dtype": "complex64"}, "rejected")
    add("object", {"shape": [8, 8, 3], "dtype": "object"}, "rejected")
    add("text", {"shape": [8, 8, 3], "dtype": "<U2"}, "rejected")
    add("datetime", {"shape": [8, 8, 3], "dtype": "datetime64[s]"}, "rejected")
    add("nan", {"shape": [8, 8, 3], "dtype": "float32", "fill": "nan"}, "rejected")
    add("inf", {"shape": [8, 8, 3], "dtype": "float32", "fill": "inf"}, "rejected")
    add("all-dark", {"shape": [8, 8, 3], "dtype": "uint16", "fill": "zeros"}, "rejected")
    add("below-black", {"shape": [8, 8, 3], "dtype": "uint16", "fill": "ones"}, "rejected")
    add("python-list", {"python": "list"}, "rejected")
    add("none", {"python": "none"}, "rejected")
    add("bytes", {"python": "bytes"}, "rejected")
    bayer = {"bayer_pattern": "RGGB", "normalization": "fixed", "scale": 100.0}
    add("bayer-ok", {"shape": [8, 8], "dtype": "uint16"}, "ok", {"shape": [8, 8], "dtype": "uint16"}, bayer)
    add("bayer-rgb", {"shape": [8, 8, 3], "dtype": "uint16"}, "rejected", {"shape": [8, 8], "dtype": "uint16"}, bayer)
    bilinear = {"bayer_pattern": "RGGB", "demosaic": "bilinear", "normalization": "none"}
    add("bilinear-fractional-float", {"shape": [8, 8], "dtype": "float32", "fill": "fraction"}, "rejected",
        {"shape": [8, 8], "dtype": "float32"}, bilinear)
    add("bilinear-negative-float", {"shape": [8, 8], "dtype": "float32", "fill": "negative"}, "rejected",
        {"shape": [8, 8], "dtype": "float32"}, bilinear)
    add("bilinear-integer-float", {"shape": [8, 8], "dtype": "float32"}, "ok", {"shape": [8, 8], "dtype": "float32"},
        bilinear)
    add("bilinear-int32", {"shape": [8, 8], "dtype": "int32"}, "rejected", {"shape": [8, 8], "dtype": "uint16"},
        bilinear)
    return cases


def frame_file_cases() -> list[dict]:
    cases: list[dict] = []

    def add(name, file, content, expect):
        cases.append({"id": f"file-{name}", "kind": "frame_file", "name": file, "content": content,
                      "expect": expect})

    png_sig = b"\x89PNG\r\n\x1a\n"
    add("png-garbage", "f.png", {"b64": b64(png_sig + bytes(range(256)))}, "unreadable")
    add("png-signature-only", "f.png", {"b64": b64(png_sig)}, "unreadable")
    add("png-empty", "f.png", {"b64": ""}, "unreadable")
    add("png-text", "f.png", {"b64": b64(b"hello, I am not a picture\n")}, "unreadable")
    add("png-truncated", "f.png", {"image": {"shape": [16, 16], "dtype": "uint16", "truncate": 60}}, "unreadable")
    add("jpg-garbage", "f.jpg", {"b64": b64(b"\xff\xd8\xff" + b"\x00" * 50)}, "unreadable")
    add("tiff-garbage", "f.tif", {"b64": b64(b"II*\x00" + b"\x01" * 40)}, "unreadable")
    add("npy-pickle", "f.npy", {"npy_pickle": True}, "unreadable")
    add("npy-truncated", "f.npy", {"npy": {"shape": [16, 16], "dtype": "uint16", "truncate": 90}}, "unreadable")
    add("npy-text", "f.npy", {"b64": b64(b"not numpy")}, "unreadable")
    add("png-8bit-mono", "f.png", {"image": {"shape": [16, 16], "dtype": "uint8"}}, "ok")
    add("png-16bit-mono", "f.png", {"image": {"shape": [16, 16], "dtype": "uint16"}}, "ok")
    add("png-16bit-rgb", "f.png", {"image": {"shape": [16, 16, 3], "dtype": "uint16"}}, "ok")
    add("png-8bit-rgb", "f.png", {"image": {"shape": [16, 16, 3], "dtype": "uint8"}}, "ok")
    add("tiff-16bit", "f.tif", {"image": {"shape": [16, 16], "dtype": "uint16"}}, "ok")
    add("npy-uint16", "f.npy", {"npy": {"shape": [16, 16], "dtype": "uint16"}}, "ok")
    add("npy-float32-rgb", "f.npy", {"npy": {"shape": [16, 16, 3], "dtype": "float32"}}, "ok")
    return cases


def to_server_cases() -> list[dict]:
    cases: list[dict] = []

    def add(name, data: bytes, expect="refused", close=True):
        cases.append({"id": f"server-{name}", "kind": "to_server", "b64": b64(data), "close": close,
                      "expect": expect})

    hello = {"type": "hello", "version": 1, "token": "tok"}
    add("valid-hello", message(hello), "welcome")
    add("wrong-token", message({**hello, "token": "nope"}))
    add("no-token", message({"type": "hello", "version": 1}))
    add("token-number", message({**hello, "token": 12345}))
    add("token-null", message({**hello, "token": None}))
    add("token-list", message({**hello, "token": ["tok"]}))
    add("token-huge", message({**hello, "token": "t" * 5000}))
    add("version-2", message({**hello, "version": 2}))
    add("version-string", message({**hello, "version": "1"}))
    add("version-missing", message({"type": "hello", "token": "tok"}))
    add("read-before-hello", message({"type": "read", "timeout": 1}))
    add("bye-before-hello", message({"type": "bye"}))
    add("type-missing", message({"version": 1, "token": "tok"}))
    add("type-number", message({"type": 1}))
    add("header-list", message(b"[1, 2, 3]"))
    add("header-not-json", message(b"{hello"))
    add("header-not-utf8", message(b"{\"type\": \"\xff\"}"))
    add("header-deep", message(b"[" * 2000 + b"]" * 2000))
    add("header-nested-object", message(("{\"type\":\"hello\",\"x\":" + "[" * 100 + "]" * 100 + "}").encode()))
    add("header-over-4k", message({**hello, "pad": "x" * 5000}))
    add("header-announces-16mib", PREFIX.pack(b"NSDF", 1, 16 << 20, 0))
    add("payload-announces-1gib", PREFIX.pack(b"NSDF", 1, 40, 1 << 30) + json.dumps(hello).encode()[:40])
    add("hello-with-payload", message(hello, b"\x00" * 16))
    add("wrong-magic", message(hello, magic=b"HTTP"))
    add("http-request", b"GET / HTTP/1.1\r\nHost: pi\r\n\r\n")
    add("tls-client-hello", bytes.fromhex("160301002a0100002603030000000000"))
    add("wrong-version-byte", message(hello, version=9))
    add("prefix-only", PREFIX.pack(b"NSDF", 1, 30, 0))
    add("half-prefix", PREFIX.pack(b"NSDF", 1, 30, 0)[:7])
    add("nothing", b"")
    add("half-prefix-held-open", PREFIX.pack(b"NSDF", 1, 30, 0)[:7], close=False)
    add("header-shorter-than-announced-held-open", PREFIX.pack(b"NSDF", 1, 100, 0) + b"{\"type\":", close=False)
    add("zero-length-header", PREFIX.pack(b"NSDF", 1, 0, 0))
    add("nan-in-header", message(b"{\"type\": \"hello\", \"version\": NaN, \"token\": \"tok\"}"))
    return cases


def to_client_cases() -> list[dict]:
    cases: list[dict] = []

    def add(name, data: bytes, expect, close=True):
        cases.append({"id": f"client-{name}", "kind": "to_client", "b64": b64(data), "close": close,
                      "expect": expect})

    good = struct.pack("<12H", *range(12))  # (3, 4) uint16, little-endian

    def frame(shape=(3, 4), dtype="uint16", payload=good, **over):
        header = {"type": "frame", "shape": list(shape), "dtype": dtype, "index": 5, "timestamp": 1.5, "meta": {}}
        header.update(over)
        return header, payload

    add("valid-frame", message(*frame()), {"frame": {"shape": [3, 4], "dtype": "uint16"}})
    add("valid-frame-float32", message(*frame(dtype="float32", payload=struct.pack("<12f", *range(12)))),
        {"frame": {"shape": [3, 4], "dtype": "float32"}})
    add("stalled", message({"type": "stalled", "message": "no frame"}), "stalled")
    add("end", message({"type": "end", "message": "done"}), "end")
    add("error", message({"type": "error", "message": "camera failed"}), "error")
    add("unknown-type", message({"type": "surprise"}), "error")
    add("length-lie-1gib", message(frame()[0], b"", payload_len=1 << 30), "error", close=False)
    add("length-lie-short", message(*frame(payload=good[:10]), payload_len=10), "error")
    add("length-over-protocol", PREFIX.pack(b"NSDF", 1, 60, 1 << 40), "error")
    add("shape-over-client-limit", message(*frame(shape=(20000, 20000), payload=b""), payload_len=800_000_000),
        "error", close=False)
    add("shape-negative", message(*frame(shape=(-3, -4), payload=good)), "error")
    add("shape-zero", message(*frame(shape=(0, 4), payload=b"")), "error")
    add("shape-1d", message(*frame(shape=(12,), payload=good)), "error")
    add("shape-4d", message(*frame(shape=(1, 1, 3, 4), payload=good)), "error")
    add("shape-string", message(*frame(shape="3x4", payload=good)), "error")
    add("shape-floats", message(*frame(shape=(3.0, 4.0), payload=good)), "error")
    add("shape-bools", message(*frame(shape=(True, 12), payload=good)), "error")
    add("dtype-object", message(*frame(dtype="object", payload=good)), "error")
    add("dtype-complex", message(*frame(dtype="complex64", payload=good)), "error")
    add("dtype-garbage", message(*frame(dtype="not-a-dtype", payload=good)), "error")
    add("dtype-missing", message({"type": "frame", "shape": [3, 4], "index": 0, "timestamp": 0.0}, good), "error")
    add("index-string", message(*frame(index="five")), "error")
    add("timestamp-nan", message(b"{\"type\":\"frame\",\"shape\":[3,4],\"dtype\":\"uint16\",\"index\":0,"
                                 b"\"timestamp\":NaN}", good), "error")
    add("meta-list", message(*frame(meta=[1, 2])), "error")
    add("header-deep", message(b"{\"type\":\"frame\",\"meta\":" + b"[" * 3000 + b"]" * 3000 + b"}", good), "error")
    add("header-over-1mib", PREFIX.pack(b"NSDF", 1, 2 << 20, 0), "error")
    add("header-not-json", message(b"{frame", good), "error")
    add("wrong-magic", message(*frame(), magic=b"XXXX"), "error")
    add("wrong-version", message(*frame(), version=3), "error")
    add("closed-mid-payload", message(*frame())[:-5], "error")
    add("closed-mid-header", message(*frame())[:PREFIX.size + 10], "error")
    add("silent-then-held", b"", "stalled", close=False)
    add("half-frame-held", message(*frame())[:-5], "stalled", close=False)
    return cases


def make_corpus() -> list[dict]:
    cases = (bundle_cases() + camera_profile_cases() + profile_cases() + frame_cases() + frame_file_cases()
             + to_server_cases() + to_client_cases())
    ids = [c["id"] for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise SystemExit(f"duplicate case ids: {duplicates}")
    return cases


def render(cases: list[dict]) -> str:
    return "".join(json.dumps(c, sort_keys=True, ensure_ascii=True) + "\n" for c in cases)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the committed corpus instead of writing it")
    args = ap.parse_args(argv)
    text = render(make_corpus())
    if args.check:
        if not CORPUS.exists() or CORPUS.read_text() != text:
            print(f"{CORPUS} is out of date: run python {Path(__file__).relative_to(HERE.parents[1])}", file=sys.stderr)
            return 1
        return 0
    CORPUS.write_text(text)
    counts: dict[str, int] = {}
    for c in make_corpus():
        counts[c["kind"]] = counts.get(c["kind"], 0) + 1
    print(f"wrote {CORPUS}: {sum(counts.values())} cases " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

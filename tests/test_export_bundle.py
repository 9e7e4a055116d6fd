# ruff: noqa: F811  (pytest fixtures imported from test_export_helpers)
"""``nsdd-export bundle``: a bundle that loads, records provenance, and refuses mismatches and corruption."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from test_export_helpers import LAM, SIZE, export_env, exported  # noqa: F401

from export.make_bundle import configure_parser, main
from export.quantize import quantize_file
from nsdd_edge.bundle import BundleError, load_bundle
from nsdd_edge.optics import array_hash


def _cli(argv):
    p = argparse.ArgumentParser()
    configure_parser(p)
    return main(p.parse_args(argv))


@pytest.fixture(scope="module")
def fp16_model(export_env, exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("b16") / "student.fp16.onnx"
    quantize_file(exported["student"], "fp16", out, data=export_env["data"], fp16_mode="all")
    return out


def test_bundle_loads_with_models_preprocess_and_provenance(export_env, exported, fp16_model, tmp_path):
    pre = tmp_path / "pre.json"
    np.save(tmp_path / "dark.npy", np.zeros((3, 64, 64), np.float32))
    pre.write_text(json.dumps({"downsample": 2, "normalization": "fixed", "scale": 4095.0,
                               "background_file": "dark.npy"}))
    out = tmp_path / "bundle"
    assert _cli(["--onnx", f"{exported['student']},{fp16_model}", "--psf", str(export_env["psf_file"]),
                 "--preprocess", str(pre), "--out", str(out)]) == 0
    b = load_bundle(out)
    assert set(b.models) == {"onnx_fp32", "onnx_fp16"}
    assert b.geometry.sensor_shape == SIZE and b.lam == LAM and b.channels == 3
    assert b.psf_sha256 == array_hash(export_env["psf"])
    assert b.preprocess.downsample == 2 and b.preprocess.scale == 4095.0 and b.preprocess.background_file == "dark.npy"
    assert (out / "dark.npy").exists()
    prov = b.provenance
    assert prov["psf"]["sha256"] == b.psf_sha256 and prov["objective"] == "nullspace"
    assert prov["student"]["config"]["psf_sha256"] == b.psf_sha256
    assert prov["student"]["training_data"]["training"]["num_samples"] == 6
    assert "numpy" in prov["packages"] and "onnx" in prov["packages"]
    assert set(prov["models"]) == {"onnx_fp32", "onnx_fp16"}
    b.check_compatible(sensor_shape=SIZE, psf_sha256=array_hash(export_env["psf"]))


def test_bundle_refuses_wrong_psf_and_mixed_models(export_env, exported, tmp_path, capsys):
    np.save(tmp_path / "other.npy", np.roll(export_env["psf"], 1, axis=-1))
    assert _cli(["--onnx", str(exported["student"]), "--psf", str(tmp_path / "other.npy"),
                 "--out", str(tmp_path / "b1")]) == 2
    assert "is not the PSF" in capsys.readouterr().err
    assert _cli(["--onnx", f"{exported['student']},{exported['wiener']}", "--psf", str(export_env["psf_file"]),
                 "--out", str(tmp_path / "b2")]) == 2
    assert "objective" in capsys.readouterr().err  # student and Wiener-only graphs do not mix
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gamma": 2.2}))
    assert _cli(["--onnx", str(exported["student"]), "--psf", str(export_env["psf_file"]), "--preprocess", str(bad),
                 "--out", str(tmp_path / "b3")]) == 2
    assert "gamma" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("b1", "b2", "b3"))


def test_corrupted_bundle_is_refused(export_env, exported, tmp_path):
    out = tmp_path / "bundle"
    assert _cli(["--onnx", str(exported["wiener"]), "--psf", str(export_env["psf_file"]), "--out", str(out)]) == 0
    load_bundle(out)
    model = out / exported["wiener"].name
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupted"):
        load_bundle(out)
    with pytest.raises(BundleError, match="expects measurements"):
        load_bundle(out, verify_files=False).check_compatible(sensor_shape=(64, 64))

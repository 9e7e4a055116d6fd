"""Live refocus: ``sim://`` with a scene at a changing depth, the :class:`Refocuser` that follows it by swapping the
engine's spectra between frames, and ``nsdd-edge run --refocus`` with its figures and named errors."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from nsdd_edge.bundle import PreprocessConfig, write_bundle
from nsdd_edge.cli import main as edge_main
from nsdd_edge.commands.run import make_preprocessor, open_camera
from nsdd_edge.engines import Engine, NumpyWienerEngine
from nsdd_edge.loop import LoopConfig, ReconstructionLoop
from nsdd_edge.optics import ForwardModel, LenslessGeometry, center_pad
from nsdd_edge.psf_sim import simulate_psf
from nsdd_edge.psf_warp import psf_at_scale
from nsdd_edge.refocus import ConsistencyGauge, Refocuser, RefocusError, RefocusSettings
from nsdd_edge.sources import open_source
from nsdd_edge.telemetry import Telemetry

SIZE = 32
SIM_RAW = PreprocessConfig(black_level=256, white_level=4095, normalization="fixed", scale=3800, grayscale=True)
FAST = RefocusSettings(downsample=1, iters=20, frames=2, every_frames=5, span=0.15)


@pytest.fixture
def bundle(tmp_path):
    """A Wiener-only mono bundle on a 32² contour PSF whose scenes fill the centred 16² window."""
    psf = simulate_psf("contour", (SIZE, SIZE), 0)
    return write_bundle(tmp_path / "bundle", psf=psf, geometry=LenslessGeometry.make("circular", (SIZE, SIZE)),
                        lam=1e-3, channels=1, support_shape=(16, 16), preprocess=SIM_RAW)


def test_sim_psf_scale_schedule_steps_ramps_and_images_through_the_warped_psf(bundle):
    uri = "sim://?realtime=0&fps=10&psf_scale=1.0,1.2,0.9&psf_scale_hold=1&frames=40&noise=0&photons=0"
    cam = open_camera(uri, bundle)
    assert [cam.psf_scale_at(k) for k in (0, 9, 10, 19, 20, 39)] == [1.0, 1.0, 1.2, 1.2, 0.9, 0.9]
    ramp = open_camera(uri + "&psf_scale_ramp=1", bundle)
    assert ramp.psf_scale_at(5) == pytest.approx(1.1) and ramp.psf_scale_at(15) == pytest.approx(1.05)
    assert ramp.psf_scale_at(25) == 0.9  # the last scale holds on
    g = bundle.sim_geometry()
    scene = cam.scene(12)
    want = ForwardModel(psf_at_scale(bundle.psf, g, 1.2), g)(center_pad(scene, g.scene_shape))
    np.testing.assert_allclose(cam.measurement(12), want, atol=1e-6)
    cam.open()
    frames = [cam.read(1.0) for _ in range(12)]
    assert frames[0].meta["psf_scale"] == 1.0 and frames[11].meta["psf_scale"] == 1.2
    assert cam.describe()["psf_scale"] == [1.0, 1.2, 0.9]
    assert open_camera("sim://?realtime=0", bundle).describe()["psf_scale"] is None
    for bad, why in (("psf_scale=1,big", "numbers"), ("psf_scale=0.1", r"\[0.25, 4\]"), ("psf_scale_hold=0", "hold")):
        with pytest.raises(ValueError, match=why):
            open_source(f"sim://?{bad}", psf=bundle.psf)


def run_loop(bundle, uri, refocuser=None, frames=30):
    """The real loop, lossless, with the refocuser inline (deterministic); the consistency gauge every frame."""
    engine = refocuser.engine if refocuser else NumpyWienerEngine(bundle)
    tel = refocuser.telemetry if refocuser else Telemetry()
    gauge = refocuser.consistency if refocuser else ConsistencyGauge.for_bundle(bundle)
    values = []

    def consistency(x, y):
        values.append(gauge(x, y))
        return values[-1]

    loop = ReconstructionLoop(open_camera(uri, bundle), make_preprocessor(bundle), engine, telemetry=tel,
                              config=LoopConfig(max_frames=frames, console_interval=0, consistency_every=1),
                              consistency=consistency, observe=refocuser.observe if refocuser else None,
                              log=lambda m: None)
    return loop.run(), {name: [v[name] for v in values] for name in values[0]}


def test_refocus_follows_a_depth_change_and_brings_the_consistency_back(bundle):
    uri = "sim://?realtime=0&fps=10&psf_scale=1.0,1.15&psf_scale_hold=1&frames=30&noise=0.002"
    tel, messages = Telemetry(), []
    refocuser = Refocuser(bundle.psf, bundle.sim_geometry(), NumpyWienerEngine(bundle), FAST,
                          gauge=ConsistencyGauge.for_bundle(bundle), inline=True, telemetry=tel, log=messages.append)
    summary, with_refocus = run_loop(bundle, uri, refocuser)
    _, without = run_loop(bundle, uri)
    report = summary["refocus"]
    assert report["swaps"] >= 1 and report["failures"] == 0 and report["mode"] == "inline"
    assert report["scale"] == pytest.approx(1.15, rel=0.02)  # the depth found, within 2%
    first = report["recent_swaps"][0]
    assert first["scale_from"] == 1.0 and first["frames_seen"] > 10  # swapped after the change, not before
    assert first["criterion_to"] < first["criterion_from"]
    assert "1.0000 →" in messages[0]
    assert set(summary) >= {"consistency", "consistency_support"}
    for name in ("consistency", "consistency_support"):
        assert with_refocus[name][:10] == pytest.approx(without[name][:10])  # identical until the depth changes
    # x̂ black outside the scenes' window, under the camera model: the gauge that shows a wrong PSF (docs/refocus.md)
    in_focus = float(np.mean(without["consistency_support"][:10]))
    drifted = float(np.mean(without["consistency_support"][-5:]))
    refocused = float(np.mean(with_refocus["consistency_support"][-5:]))
    assert drifted > 2 * in_focus  # the mismatch shows in the gauge ...
    assert (drifted - refocused) > 0.6 * (drifted - in_focus)  # ... and refocus takes most of it back (tiny 32² PSF)


class _BrokenEngine(Engine):
    name = "broken"
    refocusable = True

    def __init__(self, inner):
        self.inner = inner

    def infer(self, y):
        return self.inner.infer(y)

    def set_psf(self, psf):
        raise RuntimeError("device lost")


def test_a_failing_search_is_counted_and_the_loop_goes_on(bundle):
    uri = "sim://?realtime=0&fps=10&psf_scale=1.15&frames=12&noise=0.002"
    tel, messages = Telemetry(), []
    refocuser = Refocuser(bundle.psf, bundle.sim_geometry(), _BrokenEngine(NumpyWienerEngine(bundle)), FAST,
                          gauge=ConsistencyGauge.for_bundle(bundle), inline=True, telemetry=tel, log=messages.append)
    summary, _ = run_loop(bundle, uri, refocuser, frames=12)
    assert summary["frames_out"] == 12
    assert summary["refocus"]["failures"] >= 1 and summary["refocus"]["swaps"] == 0
    assert "device lost" in summary["refocus"]["last_error"] and "search failed" in messages[0]
    assert refocuser.scale == 1.0


def test_refocus_thread_swaps_without_the_caller_waiting(bundle):
    refocuser = Refocuser(bundle.psf, bundle.sim_geometry(), NumpyWienerEngine(bundle),
                          RefocusSettings(downsample=1, iters=20, frames=2, span=0.15, period_s=0.05),
                          gauge=ConsistencyGauge.for_bundle(bundle))
    cam = open_camera("sim://?realtime=0&psf_scale=1.15&noise=0.002", bundle)
    pre = make_preprocessor(bundle)
    cam.open()
    refocuser.start()
    try:
        deadline = time.monotonic() + 60.0
        while not refocuser.swaps and time.monotonic() < deadline:
            frame = cam.read(1.0)
            refocuser.observe(pre(frame.data, meta=frame.meta))  # returns at once: the search is elsewhere
            time.sleep(0.01)
    finally:
        refocuser.stop()
    assert refocuser.swaps and refocuser.scale == pytest.approx(1.15, rel=0.03)
    assert refocuser.report()["mode"] == "thread" and not refocuser._thread.is_alive()
    with pytest.raises(RefocusError, match="inline"):
        Refocuser(bundle.psf, bundle.sim_geometry(), NumpyWienerEngine(bundle), inline=True,
                  gauge=ConsistencyGauge.for_bundle(bundle)).start()


def test_settings_are_checked_by_name():
    for kw, why in (({"span": 0}, "span"), ({"n_scales": 2}, "n_scales"), ({"scale_limits": (1.1, 2.0)}, "limits"),
                    ({"downsample": 0}, "downsample"), ({"period_s": float("nan")}, "period")):
        with pytest.raises(RefocusError, match=why):
            RefocusSettings(**kw)
    assert RefocusSettings(scale_limits=(0.8, 1.3)).search_range(1.25) == (pytest.approx(1.25 / 1.12), 1.3)


def test_run_refocus_cli_figures_in_the_stats_and_named_errors(bundle, tmp_path, capsys):
    stats = tmp_path / "stats.json"
    uri = "sim://?realtime=0&psf_scale=1.0,1.15&psf_scale_hold=0.5&frames=40&noise=0.002"
    assert edge_main(["run", "--model", str(bundle.root), "--source", uri, "--engine", "wiener", "--refocus",
                      "--refocus-period", "0.2", "--refocus-span", "0.15", "--refocus-frames", "2",
                      "--refocus-iters", "20", "--consistency-every", "5", "--quiet", "--stats", str(stats),
                      "--snapshot", ""]) == 0
    err = capsys.readouterr().err
    assert "refocus: every 0.2 s" in err and "refocus: PSF scale" in err
    s = json.loads(stats.read_text())
    assert {"scale", "swaps", "searches", "failures", "mean_search_ms", "recent_swaps"} <= set(s["refocus"])
    assert s["refocus"]["settings"]["span"] == 0.15 and s["consistency"]["every_frames"] == 5
    assert s["consistency"]["count"] == 8
    # a bundle whose model holds fixed spectra cannot refocus: said by name, nothing runs
    assert edge_main(["run", "--source", "sim://?realtime=0", "--frames", "2", "--refocus", "--quiet"]) == 2
    assert "fixed spectra" in capsys.readouterr().err
    assert edge_main(["run", "--refocus-period", "1", "--frames", "2", "--quiet"]) == 2
    assert "--refocus-period without --refocus" in capsys.readouterr().err
    assert edge_main(["run", "--model", str(bundle.root), "--refocus", "--refocus-span", "-1", "--quiet"]) == 2
    assert "--refocus-span" in capsys.readouterr().err
    assert edge_main(["run", "--model", str(bundle.root), "--consistency-every", "-1", "--quiet"]) == 2
    assert "--consistency-every" in capsys.readouterr().err


def test_default_iterations_follow_the_camera(bundle):
    """30 FISTA iterations where the scenes have a support window, 150 on a full-field camera (where 30 favour the
    smaller PSF: on the real radial prototype the search ran to the lower limit); a given value is kept."""
    from nsdd_edge.refocus import FULL_FIELD_ITERS, SUPPORT_ITERS

    gauge = ConsistencyGauge.for_bundle(bundle)
    sensor = bundle.geometry.sensor_shape
    with_support = LenslessGeometry.make("crop", sensor, bundle.psf.shape[-2:], scene_shape=(16, 16),
                                         conv_shape=(2 * sensor[0], 2 * sensor[1]))
    full_field = LenslessGeometry.make("crop", sensor, bundle.psf.shape[-2:])
    engine = NumpyWienerEngine(bundle)
    assert Refocuser(bundle.psf, with_support, engine, gauge=gauge).settings.iters == SUPPORT_ITERS == 30
    assert Refocuser(bundle.psf, full_field, engine, gauge=gauge).settings.iters == FULL_FIELD_ITERS == 150
    assert Refocuser(bundle.psf, full_field, engine, RefocusSettings(iters=40), gauge=gauge).settings.iters == 40
    with pytest.raises(RefocusError, match="iters must be"):
        RefocusSettings(iters=0)


def test_refocus_never_goes_beyond_its_limits(bundle):
    """A scene beyond the upper limit (×2.3 with limits 0.5–2.0, starting at 2.0): the scale stays at the limit."""
    settings = RefocusSettings(downsample=1, iters=20, frames=2, every_frames=3, span=0.15, scale_limits=(0.5, 2.0))
    refocuser = Refocuser(bundle.psf, bundle.sim_geometry(), NumpyWienerEngine(bundle), settings,
                          gauge=ConsistencyGauge.for_bundle(bundle), inline=True, telemetry=Telemetry(),
                          initial_scale=2.0)
    run_loop(bundle, "sim://?realtime=0&fps=10&psf_scale=2.3&frames=9&noise=0.002", refocuser, frames=9)
    assert refocuser.searches >= 2 and refocuser.scale <= 2.0
    assert all(s.scale_to <= 2.0 for s in refocuser.swaps)

"""``nsdd-edge run``: live reconstruction from a camera (default: the simulated camera and the bundled model).

With no arguments: ``sim://`` through the default bundle shipped in the package for 60 frames, writing
the last side-by-side frame to ``runs/nsdd-edge-preview.png`` and the figures to ``runs/nsdd-edge-stats.json``
(``runs/`` under the current directory, made when missing: ignored by git in a checkout, so a first run
leaves the checkout clean).

Exit status: 0 done; 1 nothing was reconstructed; 2 bad input (bundle, source, option) or a failure named in
the message; 3 recording stopped (disk full, I/O error: the frames already recorded are intact); 130 a
second Ctrl-C. Tokens (``--token``, ``tcp://…?token=``) never appear in the stats, the session files or the
console (:mod:`nsdd_edge.redact`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import threading
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from nsdd_edge.bundle import Bundle, BundleError, load_bundle
from nsdd_edge.cli_common import add_threads_argument, resolve_threads
from nsdd_edge.engines import PRECISION_HELP, PRECISIONS
from nsdd_edge.optics import array_hash
from nsdd_edge.refocus import ConsistencyGauge, RefocusError, RefocusSettings

RefocusDefaults = RefocusSettings()

HELP = "live reconstruction: camera → preprocess → engine → preview / recorder (default: simulated camera)"

# The sim:// query options as `nsdd-edge run --help` lists them: (option, meaning, default).
SIM_OPTIONS = (
    ("images=DIR", "image the files of DIR (sorted) instead of procedural shapes and text", None),
    ("start=N", "first image number of DIR (0: the first file)", "0"),
    ("hold=S", "seconds each image is shown before the next one", "3; motion=static: image start throughout"),
    ("motion=pan|zoom|static", "camera motion over the scene", "pan"),
    ("scene=shapes|images|point|dark", "what is imaged (point: for calibrate; dark: lens cap on)",
     "images with images=, else shapes"),
    ("fps=F", "frame rate", "30"),
    ("realtime=0|1", "1: frames come at fps like a camera's (late ones dropped); 0: as fast as read", "1"),
    ("frames=N", "end after N frames", "no end"),
    ("seed=N", "seed of the procedural scene, the default PSF and the noise", "0"),
    ("noise=S", "read-noise std on the [0, 1] scale", "0.005"),
    ("photons=P", "photons at full scale, for shot noise (0: off)", "20000"),
    ("black_level=C", "raw counts = C + gain · y", "256"),
    ("gain=G", "counts per unit of y", "3800"),
    ("bits=B", "counts are rounded and clipped to B bits", "12"),
    ("format=rgb|mono|bayer", "raw frame layout", "rgb"),
    ("bayer=RGGB|BGGR|GRBG|GBRG", "mosaic of format=bayer", "RGGB"),
    ("channels=1|3", "colour channels", "the bundle's"),
    ("point_level=L", "brightest measurement pixel of scene=point", "0.8"),
    ("psf=FILE", "the simulated camera's PSF (with a bundle: must be the bundle's)", "the bundle's"),
    ("size=N", "size of the simulated contour PSF when there is no psf=", "256"),
    ("support=HxW", "render the scene at HxW in the centre of the scene grid", "a crop bundle's support window"),
    ("lam=λ", "Wiener λ of the simulated camera's spectra", "1e-3"),
    ("psf_scale=S1,S2,…", "a scene at a changing depth: the PSF magnified by S1, then S2, … (see --refocus)", "1"),
    ("psf_scale_hold=S", "seconds of frame time each psf_scale is held (the last one holds on)", "2"),
    ("psf_scale_ramp=0|1", "1: move linearly from one psf_scale to the next instead of stepping", "0"),
)
EPILOG = ('sim:// options (the query of --source, e.g. "sim://?images=DIR&motion=static&start=1"):\n'
          + "\n".join(f"  {opt:<31} {text} [{default}]" if default else f"  {opt:<31} {text}"
                      for opt, text, default in SIM_OPTIONS))

DEFAULT_SOURCE = "sim://"
DEFAULT_SIM_FRAMES = 60
DEFAULT_STATS = "runs/nsdd-edge-stats.json"
DEFAULT_SNAPSHOT = "runs/nsdd-edge-preview.png"
PREVIEW_TOKEN_ENV = "NSDD_PREVIEW_TOKEN"


def default_bundle_path() -> Path:
    """The bundle shipped in the package (``nsdd_edge/assets/default_bundle``)."""
    return Path(str(resources.files("nsdd_edge").joinpath("assets", "default_bundle")))


def bundle_sha256(bundle: Bundle) -> str:
    """SHA-256 of the bundle's ``bundle.json`` (which itself pins the PSF and model hashes)."""
    return hashlib.sha256((bundle.root / "bundle.json").read_bytes()).hexdigest()


def open_bundle(path: str | None) -> Bundle:
    """Load and verify ``path`` (or the default bundle); :class:`BundleError` names the problem."""
    root = Path(path) if path else default_bundle_path()
    if path is None and not (root / "bundle.json").exists():
        raise BundleError(f"{root}: the default bundle is missing from the package; reinstall nsdd-edge or "
                          "give --model BUNDLE_DIR")
    return load_bundle(root)


def open_camera(uri: str, bundle: Bundle, **options: Any):
    """``open_source`` with, for ``sim://``, the bundle's PSF, forward model and channels (unless the URI
    sets them), so the simulated camera is the one the bundle was made for: with a support window the scenes
    are rendered at the support size and simulated with the crop model on a 2× sensor grid
    (:meth:`Bundle.sim_geometry`); a crop-model bundle simulates through its own geometry (a support-size
    scene zero-padded into its scene grid). A sim PSF given in the URI that differs from the bundle's is
    refused (:class:`BundleError`)."""
    from nsdd_edge.sources import open_source, parse_uri

    parsed = parse_uri(uri)
    if parsed.scheme == "sim":
        q = parsed.query
        if not {"psf", "size", "geometry"} & set(q):  # the URI chose its own optics: checked below
            options.setdefault("psf", bundle.psf)
            options.setdefault("geometry", bundle.sim_geometry())
            if bundle.geometry.model == "crop" and bundle.support_shape is not None:
                options.setdefault("support", bundle.scene_support)
        if "channels" not in q and "format" not in q:
            options.setdefault("channels", bundle.channels)
    source = open_source(uri, **options)
    psf = getattr(source, "psf", None)
    if psf is not None:
        bundle.check_compatible(psf_sha256=array_hash(psf))
    return source


def make_preprocessor(bundle: Bundle):
    from nsdd_edge.preprocess import Preprocessor

    return Preprocessor(bundle.preprocess, bundle.root)


@contextmanager
def stop_on_signals(stop):
    """SIGINT/SIGTERM call ``stop(reason)`` (a second SIGINT interrupts hard); restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    hits = {"n": 0}

    def handler(signum, _frame):
        hits["n"] += 1
        if hits["n"] > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        print(f"\nnsdd-edge: {signal.Signals(signum).name}: stopping (flushing the recorder, closing the camera)…",
              file=sys.stderr, flush=True)
        stop(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default=DEFAULT_SOURCE,
                   help="camera URI: sim://, file:///path, picamera2://, csi://0, v4l2:///dev/video0, tcp://HOST:PORT")
    p.add_argument("--model", default=None, metavar="BUNDLE",
                   help="model bundle directory (default: the bundle shipped with nsdd-edge)")
    p.add_argument("--engine", default="auto", choices=["auto", "trt", "onnx", "wiener"],
                   help="reconstruction engine (auto: TensorRT plan > ONNX Runtime > numpy Wiener)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="ONNX Runtime device")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS), help=PRECISION_HELP)
    add_threads_argument(p, "ONNX Runtime intra-op threads", "loop")
    p.add_argument("--preview", default="none", help="window, http://HOST:PORT or none")
    p.add_argument("--token", default=None,
                   help=f"access token for the HTTP preview (default: ${PREVIEW_TOKEN_ENV}); required off loopback: "
                        "without one a token is generated and written to --token-file (mode 0600), never printed")
    p.add_argument("--token-file", default="runs/nsdd-edge-preview.token", metavar="FILE",
                   help="where a generated preview token is written (mode 0600)")
    p.add_argument("--record", default=None, metavar="DIR",
                   help="record every raw frame, its reconstruction and metadata (lossless, back-pressure)")
    p.add_argument("--on-record-error", default="stop", choices=["stop", "continue"],
                   help="when recording cannot go on (disk full): stop the run with exit status 3, or continue "
                        "reconstructing WITHOUT recording (said every few seconds; exit status 3 at the end)")
    p.add_argument("--live", action="store_true",
                   help="drop stale frames to stay live even with a file/folder/video or sim://?realtime=0 source "
                        "(default: such sources are processed losslessly, cameras live)")
    p.add_argument("--frames", type=int, default=None,
                   help=f"stop after N frames (default {DEFAULT_SIM_FRAMES} for sim://, else until Ctrl-C; "
                        "0: no limit)")
    p.add_argument("--stats", default=DEFAULT_STATS, metavar="FILE",
                   help="write the telemetry as JSON here (periodically and at the end); '' to skip")
    p.add_argument("--view-scale", type=view_scale_arg, default=None, metavar="auto|X",
                   help="the reconstruction value shown as white in the preview, snapshot and recorded 8-bit views: "
                        "a number, or auto (follows the 99.5th percentile, smoothed); default: auto for a bundle "
                        "with a camera profile's fixed scale (scenes in y's units), 1 otherwise")
    p.add_argument("--snapshot", default=DEFAULT_SNAPSHOT, metavar="FILE.png",
                   help="write the last measurement | reconstruction frame here at the end; '' to skip")
    p.add_argument("--quiet", action="store_true", help="no live console line")
    p.add_argument("--max-reconnects", type=int, default=None,
                   help="give up after this many failed camera reopen attempts in a row (default: never)")
    p.add_argument("--consistency-every", type=int, default=30, metavar="N",
                   help="report ‖A x̂ − y‖/‖y‖ under the bundle's forward model every N frames (0: never)")
    r = p.add_argument_group("live refocus (a scene at another depth: the PSF scaled; docs/refocus.md)")
    r.add_argument("--refocus", action="store_true",
                   help="re-estimate the PSF scale from recent frames in a background thread and swap the "
                        "pseudo-inverse spectra when it fits better (needs a bundle exported with nsdd-export onnx "
                        "--spectra-input, or --engine wiener); the stats report the scale, swaps and consistency")
    r.add_argument("--refocus-span", type=float, default=None, metavar="F",
                   help=f"each search covers scales s/(1+F) … s·(1+F) around the current s [{RefocusDefaults.span}]")
    r.add_argument("--refocus-limits", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help=f"never refocus beyond these scales [{RefocusDefaults.scale_limits[0]} "
                        f"{RefocusDefaults.scale_limits[1]}]")
    r.add_argument("--refocus-period", type=float, default=None, metavar="S",
                   help=f"seconds between two searches [{RefocusDefaults.period_s}]")
    r.add_argument("--refocus-frames", type=int, default=None, metavar="N",
                   help=f"recent measurements each search uses [{RefocusDefaults.frames}]")
    r.add_argument("--refocus-iters", type=int, default=None, metavar="K",
                   help="FISTA iterations per scale evaluated (more: sharper, slower) [30 when the bundle's scenes "
                        "have a support window, 150 on a full-field camera]")


def view_scale_arg(text: str) -> str | float:
    """``--view-scale``: ``auto`` or a finite number > 0."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is neither auto nor a finite number > 0")
    return value


def view_scale(arg: str | float | None, bundle: Bundle) -> float | None:
    """The loop's ``view_scale``: the given number, ``None`` (auto) for ``auto``; unset: auto when the bundle
    preprocesses to a camera profile's fixed scale (its scenes are in y's units), else 1."""
    if arg is None:
        return None if bundle.preprocess.normalization == "fixed" else 1.0
    return None if arg == "auto" else float(arg)


def _err(msg: str) -> int:
    print(f"nsdd-edge run: error: {msg}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    from nsdd_edge.engines import EngineError, select_engine
    from nsdd_edge.loop import LoopConfig, LoopError, ReconstructionLoop
    from nsdd_edge.preview import PreviewError, open_preview
    from nsdd_edge.recorder import Recorder, RecorderError
    from nsdd_edge.redact import redact, redact_argv
    from nsdd_edge.sources import SourceError
    from nsdd_edge.telemetry import Telemetry

    if args.frames is not None and args.frames < 0:
        return _err(f"--frames {args.frames}: must be ≥ 0")
    if args.live and args.record:
        return _err("--live drops frames, --record keeps every frame: choose one")
    if args.consistency_every < 0:
        return _err(f"--consistency-every {args.consistency_every}: must be ≥ 0")
    try:
        refocus_settings = refocus_settings_from_args(args)
    except RefocusError as exc:
        return _err(str(exc))
    shown_source = redact(args.source)
    for opt, value, default in (("--snapshot", args.snapshot, DEFAULT_SNAPSHOT), ("--stats", args.stats, DEFAULT_STATS)):
        if value and not Path(value).parent.exists():
            if value != default:
                return _err(f"{opt} {value}: directory {Path(value).parent} does not exist")
            try:
                Path(value).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                return _err(f"{opt} {value}: cannot make {Path(value).parent} ({exc}); give {opt} FILE or {opt} ''")
    try:
        bundle = open_bundle(args.model)
    except BundleError as exc:
        return _err(f"--model: {exc}")
    try:
        source = open_camera(args.source, bundle)
    except BundleError as exc:
        return _err(f"--source {shown_source} does not match the bundle: {exc}")
    except (ValueError, SourceError) as exc:
        return _err(f"--source: {exc}")
    try:
        preprocess = make_preprocessor(bundle)
    except (BundleError, ValueError) as exc:
        return _err(f"--model {bundle.root}: preprocessing settings: {exc}")
    try:
        engine, choice = select_engine(bundle, args.engine, device=args.device, precision=args.precision,
                                      threads=resolve_threads(args.threads, "loop"))
    except (EngineError, BundleError) as exc:
        return _err(str(exc) if str(exc).startswith("--engine") else f"--engine {args.engine}: {exc}")
    telemetry = Telemetry()
    refocuser = None
    if refocus_settings is not None:
        from nsdd_edge.refocus import Refocuser

        try:
            refocuser = Refocuser(bundle.psf, bundle.sim_geometry(), engine, refocus_settings,
                                  gauge=ConsistencyGauge.for_bundle(bundle), telemetry=telemetry,
                                  log=lambda m: print(m, file=sys.stderr, flush=True))
        except (RefocusError, EngineError) as exc:
            engine.close()
            return _err(str(exc))

    frames = args.frames
    if frames is None:
        frames = DEFAULT_SIM_FRAMES if args.source.startswith("sim://") else 0
    telemetry.info.update({"bundle": str(bundle.root), "bundle_name": bundle.name, "engine_kind": choice.kind,
                           "engine_reason": choice.reason, "source": shown_source})

    def alert(message: str) -> None:  # faults are said even with --quiet
        print(message, file=sys.stderr, flush=True)

    log = (lambda m: None) if args.quiet else alert
    g = bundle.geometry
    print(f"nsdd-edge run: bundle {bundle.name} ({bundle.root}), sensor {g.sensor_shape}, "
          + (f"crop model → scene {g.scene_shape} (convolution grid {g.conv_shape}), " if g.model == "crop" else "")
          + f"{bundle.channels} channel(s)" + (f", scene support {bundle.support_shape} (shown: its centred crop)"
                                               if bundle.support_shape else ""), file=sys.stderr)
    print(f"nsdd-edge run: engine {engine.describe()} — {choice.reason}", file=sys.stderr)
    unused = [k for k in bundle.models if k.startswith("onnx_") or k == "engine"]
    if choice.kind == "wiener" and unused and args.engine == "auto":
        from nsdd_edge.engines import runtime_availability

        advice = ""
        if any(k.startswith("onnx_") for k in unused) and not runtime_availability()["onnx"][0]:
            advice = " Install ONNX Runtime to use the student: pip install 'nsdd-edge[onnxruntime]'"
        print(f"nsdd-edge run: note: the bundle's trained model ({', '.join(sorted(unused))}) is NOT used "
              f"({'; '.join(choice.skipped)}); the numpy Wiener filter A†y runs instead.{advice}", file=sys.stderr)
    print(f"nsdd-edge run: source {shown_source}" + (f", {frames} frames" if frames else ", until Ctrl-C"),
          file=sys.stderr)
    if refocuser is not None:
        s = refocuser.settings
        print(f"nsdd-edge run: refocus: every {s.period_s:g} s, scales ×/÷ {1 + s.span:g} around the current one "
              f"(limits {s.scale_limits[0]:g}–{s.scale_limits[1]:g}), {s.frames} frame(s) at 1/{refocuser.downsample} "
              f"resolution, {s.iters} FISTA iterations per scale", file=sys.stderr)

    preview = recorder = None
    loop: ReconstructionLoop | None = None
    try:
        frame_meta = {"bundle": bundle.name, "bundle_sha256": bundle_sha256(bundle),
                      "psf_sha256": bundle.psf_sha256, "engine": choice.kind, "engine_detail": engine.describe()}
        if args.record:
            session = {**frame_meta, "source": shown_source, "argv": redact_argv(sys.argv),
                       "source_describe": _safe_describe(source)}
            recorder = Recorder(Path(args.record), session=session)
            print(f"nsdd-edge run: recording every frame to {recorder.root}", file=sys.stderr)
        holder: dict = {}
        token = args.token if args.token is not None else os.environ.get(PREVIEW_TOKEN_ENV) or None
        preview = open_preview(args.preview, token=token, token_file=Path(args.token_file) if args.token_file else None,
                               stats=lambda: telemetry.snapshot(),
                               on_quit=lambda: holder["loop"].request_stop("window closed"),
                               log=lambda m: print(m, file=sys.stderr, flush=True))
        if preview is not None:
            print(f"nsdd-edge run: preview: {preview.describe()}", file=sys.stderr, flush=True)
        config = LoopConfig(max_frames=frames or None, stats_path=Path(args.stats) if args.stats else None,
                            snapshot_path=Path(args.snapshot) if args.snapshot else None,
                            console_interval=0.0 if args.quiet else 1.0, max_reopen_attempts=args.max_reconnects,
                            expected_input_shape=bundle.input_shape, display_support=bundle.support_shape,
                            lossless=False if args.live else None, on_record_error=args.on_record_error,
                            consistency_every=args.consistency_every,
                            view_scale=view_scale(args.view_scale, bundle))
        consistency, observe = ConsistencyGauge.for_bundle(bundle), None
        if refocuser is not None:
            consistency, observe = refocuser.consistency, refocuser.observe
        loop = ReconstructionLoop(source, preprocess, engine, config=config, preview=preview, recorder=recorder,
                                  telemetry=telemetry, frame_meta=frame_meta, log=log, alert=alert,
                                  consistency=consistency, observe=observe)
        holder["loop"] = loop
        if refocuser is not None:
            refocuser.start()
        with stop_on_signals(loop.request_stop):
            summary = loop.run()
    except (PreviewError, RecorderError) as exc:
        return _err(str(exc))
    except (LoopError, BundleError) as exc:
        return _err(str(exc))
    except EngineError as exc:
        return _err(f"reconstruction failed: {exc}")
    except SourceError as exc:
        return _err(f"--source {shown_source}: {exc}")
    except KeyboardInterrupt:
        print("nsdd-edge run: interrupted", file=sys.stderr)
        return 130
    finally:
        if refocuser is not None:  # a search still running when the loop ended: its figures go in the stats too
            refocuser.stop()
            if args.stats and loop is not None and loop.written.get("stats"):
                try:
                    telemetry.write_json(args.stats)
                except OSError:
                    pass  # the loop has said that the stats file cannot be written
        if preview is not None:
            preview.close()
        engine.close()
    print(f"nsdd-edge run: {summary['frames_out']} frames reconstructed, {summary['dropped']} dropped, "
          f"{summary['rejected']} rejected, {summary['unreadable']} unreadable, {summary['recorded']} recorded"
          + (f", {summary['unrecorded']} NOT recorded" if summary["unrecorded"] else "")
          + f", {summary['fps']:.1f} fps ({loop.end_reason})", file=sys.stderr)
    if args.snapshot and loop.written.get("snapshot"):
        print(f"nsdd-edge run: preview frame written to {args.snapshot}", file=sys.stderr)
    if args.stats and loop.written.get("stats"):
        print(f"nsdd-edge run: figures written to {args.stats}", file=sys.stderr)
    if summary["output_failures"]:
        print(f"nsdd-edge run: warning: {summary['output_failures']} stats/snapshot write(s) failed (see above)",
              file=sys.stderr)
    if loop.recording_stopped:
        print(f"nsdd-edge run: error: recording stopped: {loop.recording_stopped}", file=sys.stderr)
        return 3
    if refocuser is not None:
        r = refocuser.report()
        print(f"nsdd-edge run: refocus: PSF scale {r['scale']:.4f} after {r['swaps']} swap(s) in {r['searches']} "
              f"search(es) ({r['mean_search_ms'] or 0:.0f} ms each on average"
              + (f", {r['failures']} failed" if r["failures"] else "") + ")", file=sys.stderr)
    if summary["frames_out"] == 0:
        print("nsdd-edge run: error: no frame was reconstructed", file=sys.stderr)
        return 1
    return 0


def refocus_settings_from_args(args: argparse.Namespace) -> RefocusSettings | None:
    """``--refocus`` and its options as :class:`RefocusSettings` (None without ``--refocus``); an option without
    ``--refocus``, or a value out of range, is a :class:`RefocusError` naming it."""
    given = {"span": args.refocus_span, "scale_limits": tuple(args.refocus_limits) if args.refocus_limits else None,
             "period_s": args.refocus_period, "frames": args.refocus_frames, "iters": args.refocus_iters}
    flags = {"span": "--refocus-span", "scale_limits": "--refocus-limits", "period_s": "--refocus-period",
             "frames": "--refocus-frames", "iters": "--refocus-iters"}
    if not args.refocus:
        stray = [flags[k] for k, v in given.items() if v is not None]
        if stray:
            raise RefocusError(f"{', '.join(stray)} without --refocus: add --refocus, or leave them out")
        return None
    try:
        return RefocusSettings(**{k: v for k, v in given.items() if v is not None})
    except RefocusError as exc:
        names = [flags[k] for k, v in given.items() if v is not None]
        raise RefocusError(f"{' / '.join(names) or '--refocus'}: {exc}") from None


def _safe_describe(source) -> Any:
    try:
        return source.describe()
    except Exception as exc:  # noqa: BLE001 - metadata only
        return f"describe() failed: {exc}"

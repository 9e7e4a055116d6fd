"""Reconstruction engines: TensorRT plan, ONNX Runtime, numpy Wiener — one interface.

``engine.infer(y)`` takes measurements ``(N, C, H, W)`` float32 (already preprocessed, sensor size) and
returns reconstructions ``(N, C', H', W')`` float32 on the bundle's scene grid (:attr:`Bundle.output_shape`:
the sensor size for the circular model, the scene grid of the crop model; a model whose output has another
shape is refused with :class:`EngineError`). ``select_engine(bundle, prefer)`` picks
TensorRT plan > ONNX Runtime > numpy Wiener from the bundle's models and what is installed, and says why.

Refocus: ``engine.set_psf(psf)`` swaps the pseudo-inverse spectra for those of another PSF (a warped one) between
two frames: the numpy Wiener engine always can; an ONNX/TensorRT model only when it takes the spectra as inputs
(a bundle with ``spectra: input``, :class:`nsdd_edge.graph_spectra.SpectraFeed`). The new spectra are computed
in the caller's thread and take effect at the next :meth:`Engine.infer`; a frame in flight is never touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nsdd_edge.bundle import Bundle, BundleError
from nsdd_edge.graph_spectra import SpectraFeed, check_feeds
from nsdd_edge.optics import OpticsError, WienerFilter
from nsdd_edge.trt_runner import TrtUnavailable, available_cuda_bindings, module_available

ENGINE_NAMES = ("trt", "onnx", "wiener")
ONNX_MODEL_ORDER = ("onnx_fp32", "onnx_fp16", "onnx_int8")


class EngineError(RuntimeError):
    """An engine cannot be built or run here; the message says which engine and why."""


class ModelLoadError(EngineError):
    """The runtime is installed but cannot load the bundle's model file (corrupt or incompatible graph)."""


class Engine:
    """Common interface. Subclasses set ``name`` and implement :meth:`infer`; refocusable ones
    :meth:`set_psf`."""

    name = "engine"
    refocusable = False  # whether set_psf can swap the spectra (see the module docstring)

    def infer(self, y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def set_psf(self, psf: np.ndarray) -> None:
        """Use the pseudo-inverse of ``psf`` (same box and channels as the bundle's) from the next frame on."""
        raise EngineError(f"{self.describe()}: its model holds fixed spectra, they cannot be swapped (export the "
                          "model with nsdd-export onnx --spectra-input)")

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _check_input(y: np.ndarray, expected: tuple[int, int, int] | None, who: str) -> np.ndarray:
        if y.ndim != 4:
            raise EngineError(f"{who}: expected a batch (N, C, H, W), got shape {y.shape}")
        if expected is not None and tuple(y.shape[1:]) != tuple(expected):
            raise EngineError(f"{who}: expected measurements of shape (N, {', '.join(map(str, expected))}), "
                              f"got {y.shape}")
        return np.ascontiguousarray(y, dtype=np.float32)

    @staticmethod
    def _check_output(x: np.ndarray, expected: tuple[int, int, int] | None, who: str) -> np.ndarray:
        """``x`` if it is ``(N, *expected)``: a model that does not return the bundle's scene grid is refused."""
        if expected is not None and tuple(x.shape[1:]) != tuple(expected):
            raise EngineError(f"{who}: the model returns reconstructions of shape {tuple(x.shape)}, the bundle's "
                              f"scene grid is (N, {', '.join(map(str, expected))}): a model made for another geometry")
        return x


class NumpyWienerEngine(Engine):
    """``x = A†y = F⁻¹[conj(H) Y / (|H|² + λ)]`` with :class:`nsdd_edge.optics.WienerFilter` (no model)."""

    name = "wiener"
    refocusable = True

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.filter = WienerFilter(bundle.psf, bundle.geometry, bundle.lam, bundle.projector)
        self.input_shape = bundle.input_shape

    def infer(self, y: np.ndarray) -> np.ndarray:
        y = self._check_input(y, self.input_shape, "wiener engine")
        return self.filter(y)  # one read of the attribute: a filter swapped meanwhile serves the next frame

    def set_psf(self, psf: np.ndarray) -> None:
        b = self.bundle
        try:
            self.filter = WienerFilter(psf, b.geometry, b.lam, b.projector)  # built first, then one assignment
        except OpticsError as exc:
            raise EngineError(f"wiener engine: cannot use the new PSF: {exc}") from None

    def describe(self) -> str:
        g = self.bundle.geometry
        grids = f"sensor {g.sensor_shape}" + (f" → scene {g.scene_shape}" if g.model == "crop" else "")
        return f"numpy Wiener A† ({g.model}, {grids}, λ={self.bundle.lam:g})"


class SpectraInputEngine(Engine):
    """An engine whose model may take the pseudo-inverse spectra as inputs (``spectra``: their feed, None for a
    model that holds fixed spectra). :meth:`set_psf` computes them once per swap; :meth:`_use_spectra` hands
    them to the runtime."""

    spectra: SpectraFeed | None = None

    @property
    def refocusable(self) -> bool:  # type: ignore[override]
        return self.spectra is not None

    def set_psf(self, psf: np.ndarray) -> None:
        if self.spectra is None:
            Engine.set_psf(self, psf)
        try:
            feeds = self.spectra.feeds(psf)  # type: ignore[union-attr]
        except OpticsError as exc:
            raise EngineError(f"{self.name} engine: cannot use the new PSF: {exc}") from None
        self._use_spectra(feeds)

    def _use_spectra(self, feeds: dict[str, np.ndarray]) -> None:  # pragma: no cover - every subclass has one
        raise NotImplementedError


class OnnxRuntimeEngine(SpectraInputEngine):
    """ONNX Runtime session; ``device='cpu'`` or ``'cuda'`` (IO binding keeps the output on the GPU
    until copied back once). ``threads`` sets intra-op threads (0 = ONNX Runtime's default)."""

    name = "onnx"

    def __init__(self, model_path: str | os.PathLike, *, device: str = "cpu", threads: int = 0,
                 input_shape: tuple[int, int, int] | None = None, output_shape: tuple[int, int, int] | None = None,
                 spectra: SpectraFeed | None = None, psf: np.ndarray | None = None):
        """``spectra`` and ``psf``: a model that takes its spectra as inputs is fed ``spectra.feeds(psf)``
        (:meth:`set_psf` changes them); such a model without them, or a fixed one with them, is refused."""
        ok, why = module_available("onnxruntime")
        if not ok:
            raise EngineError(f"ONNX Runtime engine: {why}; pip install onnxruntime (or onnxruntime-gpu)")
        import onnxruntime as ort

        self.ort = ort
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise EngineError(f"{self.model_path}: ONNX model file does not exist")
        if device not in ("cpu", "cuda"):
            raise EngineError(f"ONNX Runtime engine: device must be 'cpu' or 'cuda', got {device!r}")
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise EngineError(f"ONNX Runtime {ort.__version__} has no CUDAExecutionProvider here "
                              f"(available: {available}); install onnxruntime-gpu or use device='cpu'")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=providers)
        except Exception as exc:
            raise ModelLoadError(f"{self.model_path}: ONNX Runtime cannot load the model "
                                 f"({type(exc).__name__}: {str(exc)[:300]})") from exc
        inputs = self.session.get_inputs()
        self.spectra = spectra
        self.device = device
        self._binding = self.session.io_binding() if device == "cuda" else None
        self._feeds: dict[str, np.ndarray] = {}
        self._device_feeds: dict[str, Any] = {}  # with CUDA: the spectra on the GPU, uploaded once per swap
        extra = [i.name for i in inputs[1:]]
        if spectra is None and extra:
            raise ModelLoadError(f"{self.model_path}: the model takes {[i.name for i in inputs]}: the spectra "
                                 "inputs need a bundle that says spectra: input")
        if spectra is not None:
            if sorted(extra) != sorted(spectra.names):
                raise ModelLoadError(f"{self.model_path}: the bundle says the model takes the spectra "
                                     f"{list(spectra.names)} beside y, the model takes {[i.name for i in inputs]}")
            self._shapes = {i.name: tuple(i.shape) for i in inputs[1:]}
            if psf is None:
                raise EngineError(f"{self.model_path}: a spectra-input model needs the PSF to compute them from")
            self.set_psf(psf)
        self.input_name = inputs[0].name
        self.output_name = self.session.get_outputs()[0].name
        model_shape = inputs[0].shape
        if input_shape is not None and len(model_shape) == 4:
            for got, want in zip(model_shape[1:], input_shape):
                if isinstance(got, int) and got != want:
                    raise ModelLoadError(f"{self.model_path}: model input {self.input_name} has shape {model_shape}, "
                                         f"the bundle's measurements are (N, {', '.join(map(str, input_shape))})")
        out_shape = self.session.get_outputs()[0].shape
        if output_shape is not None and len(out_shape) == 4:
            for got, want in zip(out_shape[1:], output_shape):
                if isinstance(got, int) and got != want:
                    raise ModelLoadError(f"{self.model_path}: model output {self.output_name} has shape {out_shape}, "
                                         f"the bundle's reconstructions are (N, {', '.join(map(str, output_shape))}) "
                                         "(its scene grid): a model made for another geometry")
        self.input_shape = input_shape
        self.output_shape = output_shape
        self.threads = threads

    def _use_spectra(self, feeds: dict[str, np.ndarray]) -> None:
        try:
            feeds = check_feeds(feeds, self.spectra.names, self._shapes,  # type: ignore[union-attr]
                                f"onnx engine {self.model_path.name}")
        except OpticsError as exc:
            raise EngineError(str(exc)) from None
        if self._binding is not None:  # upload once here, not on every frame (OrtValue on the CUDA device)
            self._device_feeds = {name: self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0)
                                  for name, value in feeds.items()}
        self._feeds = feeds  # one assignment: infer reads the dict once per frame

    def infer(self, y: np.ndarray) -> np.ndarray:
        y = self._check_input(y, self.input_shape, f"onnx engine {self.model_path.name}")
        who = f"onnx engine {self.model_path.name}"
        feeds = self._feeds
        if self._binding is None:
            x = np.asarray(self.session.run([self.output_name], {self.input_name: y, **feeds})[0], dtype=np.float32)
            return self._check_output(x, self.output_shape, who)
        b = self._binding
        for name, value in self._device_feeds.items():  # already on the GPU: binding is a pointer, no copy
            b.bind_ortvalue_input(name, value)
        b.bind_cpu_input(self.input_name, y)
        b.bind_output(self.output_name, "cuda")
        self.session.run_with_iobinding(b)
        return self._check_output(np.asarray(b.copy_outputs_to_cpu()[0], dtype=np.float32), self.output_shape, who)

    def describe(self) -> str:
        return (f"ONNX Runtime {self.ort.__version__} {self.device.upper()} {self.model_path.name}"
                + (f", {self.threads} threads" if self.threads else ""))

    def close(self) -> None:
        self._binding = None
        self.session = None


class TensorRTEngine(SpectraInputEngine):
    """A serialized TensorRT plan through :class:`nsdd_edge.trt_runner.TrtRunner`."""

    name = "trt"

    def __init__(self, plan_path: str | os.PathLike, *, input_shape: tuple[int, int, int] | None = None,
                 output_shape: tuple[int, int, int] | None = None, spectra: SpectraFeed | None = None,
                 psf: np.ndarray | None = None, **options):
        from nsdd_edge.trt_runner import TrtRunner

        try:
            self.runner = TrtRunner(plan_path, **options)
        except TrtUnavailable as exc:
            raise EngineError(str(exc)) from exc
        self.input_shape = input_shape
        self.output_shape = output_shape
        self.spectra = spectra
        extra = sorted(self.runner.extra_inputs)
        if (spectra is None) != (not extra) or (spectra is not None and extra != sorted(spectra.names)):
            self.runner.close()
            raise EngineError(f"{plan_path}: the plan takes {[self.runner.input.name, *extra]}, the bundle says "
                              + (f"spectra {list(spectra.names)} beside y" if spectra else "y only (fixed spectra)"))
        if spectra is not None:
            try:
                if psf is None:
                    raise EngineError(f"{plan_path}: a spectra-input plan needs the PSF to compute them from")
                self.set_psf(psf)
            except BaseException:
                self.runner.close()  # the CUDA context and buffers go with the failed engine
                raise

    def _use_spectra(self, feeds: dict[str, np.ndarray]) -> None:
        try:
            self.runner.set_inputs(feeds)  # applied before the next frame
        except TrtUnavailable as exc:
            raise EngineError(f"TensorRT engine: {exc}") from None

    def infer(self, y: np.ndarray) -> np.ndarray:
        x = self.runner.infer(self._check_input(y, self.input_shape, "TensorRT engine"))
        return self._check_output(x, self.output_shape, "TensorRT engine")

    def describe(self) -> str:
        return self.runner.describe()

    def close(self) -> None:
        self.runner.close()


# ------------------------------------------------------------------------------------------------
# Availability and selection
# ------------------------------------------------------------------------------------------------


def runtime_availability() -> dict[str, tuple[bool, str]]:
    """What is installed: ``{"trt": (ok, why), "onnx": (ok, why), "onnx-cuda": ..., "wiener": ...}``."""
    out: dict[str, tuple[bool, str]] = {}
    trt_ok, trt_why = module_available("tensorrt")
    if trt_ok:
        bindings = available_cuda_bindings()
        usable = [k for k, v in bindings.items() if v[0]]
        out["trt"] = (True, f"TensorRT {trt_why} with {usable[0]}") if usable else (
            False, f"TensorRT {trt_why} present but no CUDA binding: " + "; ".join(v[1] for v in bindings.values()))
    else:
        out["trt"] = (False, trt_why)
    ort_ok, ort_why = module_available("onnxruntime")
    if ort_ok:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        out["onnx"] = (True, f"onnxruntime {ort_why} ({', '.join(providers)})")
        out["onnx-cuda"] = (("CUDAExecutionProvider" in providers),
                            "CUDAExecutionProvider available" if "CUDAExecutionProvider" in providers
                            else "no CUDAExecutionProvider (CPU-only onnxruntime)")
    else:
        out["onnx"] = (False, ort_why)
        out["onnx-cuda"] = (False, ort_why)
    out["wiener"] = (True, f"numpy {np.__version__} (always available)")
    return out


@dataclass
class EngineChoice:
    """The decision of :func:`plan_engine`: which engine, which model file, and why."""

    kind: str  # trt | onnx | wiener
    model: str | None  # bundle model kind (engine, onnx_fp32, ...) or None for Wiener
    reason: str
    skipped: list[str] = field(default_factory=list)


PRECISIONS = ("auto", "fp32", "fp16", "int8")
# --precision auto: the order in which a bundle's ONNX models are tried, per ONNX Runtime device. On the CPU
# the FP16 graph is no faster than FP32 (ONNX Runtime computes most float16 nodes in float32, casting around
# them) and the INT8 Q/DQ graph is slower (bench/bench_threads.py --workloads precision; docs/threads.md), so
# FP32, the exact one, comes first; on a GPU FP16 is the fast one.
AUTO_ONNX_ORDER = {"cpu": ("onnx_fp32", "onnx_fp16", "onnx_int8"), "cuda": ("onnx_fp16", "onnx_fp32", "onnx_int8")}


PRECISION_HELP = ("which of the bundle's models: fp32, fp16 or int8 (an error if the bundle has none); auto: the "
                  "TensorRT plan as built, else the fastest ONNX model for --device (CPU: FP32)")


def plan_engine(models: dict, prefer: str | None, available: dict[str, tuple[bool, str]],
                precision: str = "auto", device: str = "cpu") -> EngineChoice:
    """Decide the engine from the bundle's ``models`` and ``available`` runtimes (pure; no imports).

    ``prefer`` in (None, "auto", "trt", "onnx", "wiener"). Auto: TensorRT plan > ONNX > Wiener; an explicit
    choice that cannot run raises :class:`EngineError` naming what is missing. ``precision`` (``--precision``):
    ``auto`` takes the plan whatever its precision and the ONNX model in :data:`AUTO_ONNX_ORDER` for ``device``;
    ``fp32``/``fp16``/``int8`` only a model of that precision (the numpy Wiener filter is FP32), and an error
    when the bundle has none, rather than a silent fallback.
    """
    prefer = None if prefer in (None, "auto") else prefer
    if prefer is not None and prefer not in ENGINE_NAMES:
        raise EngineError(f"--engine {prefer!r}: unknown engine; use auto, trt, onnx or wiener")
    if precision not in PRECISIONS:
        raise EngineError(f"--precision {precision!r}: use {', '.join(PRECISIONS)}")
    skipped: list[str] = []
    onnx_models = [k for k in ONNX_MODEL_ORDER if k in models]

    def try_trt() -> EngineChoice | None:
        plan_precision = models["engine"].get("precision") if "engine" in models else None
        # a "best" plan (FP16 + INT8 builder flags) is the INT8 one
        wanted = precision in ("auto", plan_precision) or (precision, plan_precision) == ("int8", "best")
        if "engine" not in models:
            skipped.append("trt: the bundle has no TensorRT plan (models.engine)")
        elif not wanted:
            skipped.append(f"trt: the bundle's TensorRT plan is {plan_precision or 'of unrecorded precision'}, "
                           f"not {precision}")
        elif not available["trt"][0]:
            skipped.append(f"trt: {available['trt'][1]}")
        else:
            built = plan_precision or "precision not recorded"
            return EngineChoice("trt", "engine", f"bundle has a TensorRT plan ({built}) and {available['trt'][1]}",
                                skipped)
        return None

    def try_onnx() -> EngineChoice | None:
        if precision == "auto":
            kinds = [k for k in AUTO_ONNX_ORDER.get(device, ONNX_MODEL_ORDER) if k in models]
        else:
            kinds = [k for k in (f"onnx_{precision}",) if k in models]
        if not onnx_models:
            skipped.append("onnx: the bundle has no ONNX model (onnx_fp32/onnx_fp16/onnx_int8)")
        elif not kinds:
            skipped.append(f"onnx: the bundle has no {precision.upper()} model (it has {', '.join(onnx_models)})")
        elif not available["onnx"][0]:
            skipped.append(f"onnx: {available['onnx'][1]}")
        else:
            if precision != "auto":
                why = f" (--precision {precision})"
            elif len(onnx_models) > 1:
                order = " > ".join(k[len("onnx_"):] for k in AUTO_ONNX_ORDER.get(device, ONNX_MODEL_ORDER))
                why = f" (--precision auto on {device.upper()}: {order})"
            else:
                why = ""
            return EngineChoice("onnx", kinds[0], f"bundle has {kinds[0]}{why} and {available['onnx'][1]}", skipped)
        return None

    def no_model() -> EngineError:
        have = ", ".join(sorted(models)) or "none (Wiener only)"
        return EngineError(f"--precision {precision}: the bundle has no {precision.upper()} model that can run here "
                           f"(its models: {have}; {'; '.join(skipped)}). Make one with nsdd-export quantize "
                           f"--precision {precision} and add it with nsdd-export bundle --onnx FP32,{precision.upper()}")

    if prefer == "wiener":
        if precision not in ("auto", "fp32"):
            raise EngineError(f"--precision {precision}: the numpy Wiener filter computes in FP32 only")
        return EngineChoice("wiener", None, "requested with --engine wiener", skipped)
    if prefer == "trt":
        c = try_trt()
    elif prefer == "onnx":
        c = try_onnx()
    else:
        c = try_trt() or try_onnx()
        if c is None:
            if precision not in ("auto", "fp32"):  # the Wiener fallback is FP32: not what was asked for
                raise no_model()
            return EngineChoice("wiener", None, "fallback to the numpy Wiener filter A†y (" + "; ".join(skipped) + ")",
                                skipped)
    if c is None:
        raise EngineError(f"--engine {prefer}: cannot use it: {'; '.join(skipped)}")
    c.reason = ("requested; " if prefer else "") + c.reason
    return c


def build_engine(bundle: Bundle, choice: EngineChoice, *, device: str = "cpu", threads: int = 0) -> Engine:
    """Instantiate the chosen engine for ``bundle``."""
    if choice.kind == "wiener":
        return NumpyWienerEngine(bundle)
    path = bundle.model_path(choice.model or "")
    if path is None:
        raise BundleError(f"{bundle.root}: no model {choice.model!r}")
    feed = spectra_feed(bundle)
    if choice.kind == "onnx":
        return OnnxRuntimeEngine(path, device=device, threads=threads, input_shape=bundle.input_shape,
                                 output_shape=bundle.output_shape, spectra=feed, psf=bundle.psf)
    return TensorRTEngine(path, input_shape=bundle.input_shape, output_shape=bundle.output_shape, spectra=feed,
                          psf=bundle.psf)


def spectra_feed(bundle: Bundle) -> SpectraFeed | None:
    """What the bundle's models are fed beside ``y`` (``spectra: input``), else None (fixed spectra)."""
    if bundle.spectra != "input":
        return None
    return SpectraFeed(bundle.geometry, bundle.lam, bundle.projector)  # type: ignore[arg-type]


def select_engine(bundle: Bundle, prefer: str | None = None, *, device: str = "cpu", threads: int = 0,
                  precision: str = "auto", available: dict[str, tuple[bool, str]] | None = None
                  ) -> tuple[Engine, EngineChoice]:
    """Pick and build an engine for ``bundle`` (TensorRT > ONNX Runtime > Wiener unless ``prefer``; the
    model of ``precision``, see :func:`plan_engine`).

    In auto mode a TensorRT plan that fails to load (plans are specific to a GPU and TensorRT version) falls
    back to the next engine, and the failure is added to the reason; an ONNX model that ONNX Runtime (installed)
    cannot load is a broken bundle: :class:`BundleError`, never a silent fallback. Returns ``(engine, choice)``;
    ``choice.reason`` says why.
    """
    available = dict(available or runtime_availability())
    if device == "cuda" and not available.get("onnx-cuda", (False, ""))[0]:
        raise EngineError(f"--device cuda: {available.get('onnx-cuda', (False, 'onnxruntime missing'))[1]}")
    while True:
        choice = plan_engine(bundle.models, prefer, available, precision=precision, device=device)
        try:
            return build_engine(bundle, choice, device=device, threads=threads), choice
        except ModelLoadError as exc:
            if choice.kind == "onnx":
                m = bundle.models.get(choice.model or "", {})
                raise BundleError(f"{bundle.root}: model {choice.model} ({m.get('file')}) matches its SHA-256 but "
                                  f"cannot be loaded: {exc}; the bundle holds a broken model (re-export it)") from None
            if prefer not in (None, "auto"):
                raise
            available[choice.kind] = (False, f"failed to start ({exc})")
        except EngineError as exc:
            if prefer not in (None, "auto") or choice.kind == "wiener":
                raise
            available[choice.kind] = (False, f"failed to start ({exc})")

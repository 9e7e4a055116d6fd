"""The exported graph: measurement ``y`` → reconstruction ``x̂`` with the pseudo-inverse inside.

``x̂ = A†y + (I − A†A) g(cat(fit(y), A†y))`` (objective ``nullspace``), ``g(cat(fit(y), A†y))`` (``full``) or
``A†y`` (Wiener-only graph, no student). With a ``support_shape`` ``(h, w)`` (students trained on scenes
that fill only a centred window of the scene grid, ``train.students.Student``) the network runs on
the centred crop of its stacked input (ONNX ``Slice``) and its output is zero-padded back (``Concat``
with zeros):
``g = P_support net(C_support(cat(fit(y), A†y)))``, offsets ``top = (H − h) // 2``, ``left = (W − w) // 2`` as
:func:`train.physics.center_crop` / ``center_pad``. The spectra are those of
:class:`nsdd_edge.optics.WienerSpectra` on the geometry's convolution grid (the same as training; nothing is
recomputed here). The geometry (:class:`nsdd_edge.optics.LenslessGeometry`) is one of:

- ``circular`` (scene = sensor = convolution grid): ``A†`` and ``I − A†A`` are the Fourier multipliers
  ``G = conj(H)/(|H|²+λ)`` and ``1 − R = 1 − |H|²/(|H|²+λ)``; ``fit`` is the identity.
- ``crop`` (``y`` on the sensor grid, ``x̂`` on the scene grid, both centred in the convolution grid):
  ``A x = C_sensor F⁻¹[H F(P_conv x)]``, ``A†y = C_scene F⁻¹[G F(P_conv y)]`` and
  ``(I − A†A) x = x − A†(A x)`` (:class:`train.physics.LenslessOperator` ``model="crop"``); ``fit`` centre-crops
  or zero-pads ``y`` per axis to the scene grid (:func:`train.students.fit_to_grid`).

Two FFT forms:
- ``matmul`` (default): :class:`export.dft.MatmulRDFT2` (circular) or :class:`export.dft.CentredRDFT2` (crop:
  the padding and cropping folded into the matrices), only MatMul/Slice/Add/Sub/Concat/Mul (TensorRT 10.x
  parses it).
- ``onnx``: ``torch.fft.rfft2/irfft2`` (``norm='ortho'``), exported by the dynamo exporter as ONNX
  ``DFT`` (TensorRT 11.2+, ONNX Runtime); the crop model pads by Concat with zeros and crops by Slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from export.dft import CentredRDFT2, MatmulRDFT2, complex_multiply_packed
from export.errors import ExportError
from nsdd_edge.bundle import BundleError, parse_support
from nsdd_edge.graph_spectra import SPECTRA_KINDS, graph_spectra, spectra_names
from nsdd_edge.optics import CG_ITERATIONS, LenslessGeometry, OpticsError, array_hash

Objective = Literal["nullspace", "full", "wiener"]
DftForm = Literal["matmul", "onnx"]
OBJECTIVES = ("nullspace", "full", "wiener")
DFT_FORMS = ("matmul", "onnx")


@dataclass(frozen=True)
class GraphSpec:
    """What an exported graph computes; written into the ONNX ``metadata_props``."""

    psf_sha256: str
    lam: float
    geometry: LenslessGeometry
    channels: int
    objective: Objective
    dft: DftForm
    support_shape: tuple[int, int] | None = None  # None: g covers the whole scene grid
    projector: str = "tikhonov"  # the pseudo-inverse kind (nsdd_edge.optics.WienerSpectra)
    spectra: str = "fixed"  # fixed: the PSF's spectra are constants; input: fed beside y (nsdd_edge.graph_spectra)
    support_taper: int = 0  # px: g fades out over this border of the support window (0: a hard window)

    def metadata(self) -> dict[str, str]:
        import json

        props = {"nsdd.psf_sha256": self.psf_sha256, "nsdd.lam": repr(float(self.lam)),
                 "nsdd.geometry": json.dumps(self.geometry.to_dict()), "nsdd.channels": str(self.channels),
                 "nsdd.objective": self.objective, "nsdd.dft": self.dft, "nsdd.projector": self.projector}
        if self.support_shape is not None:
            props["nsdd.support_shape"] = json.dumps(list(self.support_shape))
        if self.spectra == "input":  # absent: fixed (graphs exported before the choice existed stay unchanged)
            props["nsdd.spectra"] = "input"
            props["nsdd.spectra_inputs"] = json.dumps(list(spectra_names(self.geometry)))
        if self.support_taper:
            props["nsdd.support_taper"] = str(int(self.support_taper))
        return props

    @staticmethod
    def from_metadata(props: dict[str, str]) -> GraphSpec:
        import json

        missing = [k for k in ("nsdd.psf_sha256", "nsdd.lam", "nsdd.geometry", "nsdd.channels",
                               "nsdd.objective", "nsdd.dft") if k not in props]
        if missing:
            raise ExportError(f"model metadata lacks {missing} (not exported by nsdd-export onnx?)")
        geometry = LenslessGeometry.from_dict(json.loads(props["nsdd.geometry"]))
        support = None
        if props.get("nsdd.support_shape") not in (None, "", "null"):
            try:
                support = check_support(json.loads(props["nsdd.support_shape"]), geometry.scene_shape)
            except (json.JSONDecodeError, ExportError) as exc:
                raise ExportError(f"model metadata nsdd.support_shape={props['nsdd.support_shape']!r}: {exc}") from None
        spectra = props.get("nsdd.spectra", "fixed")
        if spectra not in SPECTRA_KINDS:
            raise ExportError(f"model metadata nsdd.spectra={spectra!r}: expected one of {SPECTRA_KINDS}")
        try:
            taper = int(props.get("nsdd.support_taper") or 0)
        except ValueError:
            raise ExportError(f"model metadata nsdd.support_taper={props['nsdd.support_taper']!r} is not an "
                              "integer") from None
        return GraphSpec(psf_sha256=props["nsdd.psf_sha256"], lam=float(props["nsdd.lam"]),
                         geometry=geometry, channels=int(props["nsdd.channels"]),
                         objective=props["nsdd.objective"], dft=props["nsdd.dft"],  # type: ignore[arg-type]
                         support_shape=support, projector=props.get("nsdd.projector", "tikhonov"), spectra=spectra,
                         support_taper=taper)


def student_window(support: tuple[int, int] | None, taper: int) -> np.ndarray | None:
    """The student's soft-edge window on its support (:func:`train.students.support_window`), its errors as
    :class:`ExportError`."""
    from train.students import StudentError, check_taper, support_window

    try:
        return support_window(support, check_taper(taper, support))
    except StudentError as exc:
        raise ExportError(str(exc)) from None


def check_support(support: object, grid: Sequence[int]) -> tuple[int, int] | None:
    """``support`` as ``(h, w)`` (None stays None) by the bundle's rule
    (:func:`nsdd_edge.bundle.parse_support`), its error as :class:`ExportError`."""
    try:
        return parse_support(support, (int(grid[0]), int(grid[1])))
    except BundleError as exc:
        raise ExportError(str(exc)) from None


def graph_geometry(geometry: LenslessGeometry | Sequence[int], psf_shape: Sequence[int]) -> LenslessGeometry:
    """The graph's geometry: a :class:`LenslessGeometry` (checked against the PSF's size), or a sensor size
    ``(H, W)`` for the circular model at that size. Raises :class:`OpticsError` naming the problem."""
    if isinstance(geometry, LenslessGeometry):
        g = geometry
        crop = g.model == "crop"
        return LenslessGeometry.make(g.model, g.sensor_shape, psf_shape, g.scene_shape if crop else None,
                                     g.conv_shape if crop else None)
    return LenslessGeometry.make("circular", geometry, psf_shape)


def centre_crop(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The centred ``shape`` window of the last two axes (ONNX ``Slice``; offsets ``(H − h) // 2``)."""
    h, w = int(shape[0]), int(shape[1])
    top, left = (t.shape[-2] - h) // 2, (t.shape[-1] - w) // 2
    return t[:, :, top : top + h, left : left + w]


def centre_pad(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad the last two axes of ``(N, C, h, w)`` centrally to ``shape`` by Concat with zeros: an ONNX Pad
    of opset 18 (what the exporter writes) has no version-converter adapter down to the default opset 17."""
    n, c, h, w = t.shape[0], t.shape[1], t.shape[-2], t.shape[-1]
    height, width = int(shape[0]), int(shape[1])
    top, left = (height - h) // 2, (width - w) // 2
    right, bottom = width - w - left, height - h - top
    if left or right:
        t = torch.cat([p for p in (t.new_zeros((n, c, h, left)), t, t.new_zeros((n, c, h, right))) if p.shape[-1]],
                      dim=-1)
    if top or bottom:
        t = torch.cat([p for p in (t.new_zeros((n, c, top, width)), t,
                                   t.new_zeros((n, c, bottom, width))) if p.shape[-2]], dim=-2)
    return t


def fit_to_grid(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Centre-crop or zero-pad each of the last two axes independently to ``shape`` (the rule of
    :func:`nsdd_edge.optics.fit_to` and ``train.students.fit_to_grid``)."""
    h, w = t.shape[-2], t.shape[-1]
    th, tw = int(shape[0]), int(shape[1])
    if th < h or tw < w:
        t = centre_crop(t, (min(th, h), min(tw, w)))
    if th > t.shape[-2] or tw > t.shape[-1]:
        t = centre_pad(t, (th, tw))
    return t


def _multiply_half_spectrum(z: torch.Tensor, packed: torch.Tensor, wr: int, real: bool) -> torch.Tensor:
    """``M · z`` for ``z`` a ``view_as_real`` half spectrum ``(..., H, Wr, 2)`` and ``M`` packed ``[Re | Im]``."""
    m = torch.stack([packed[..., :wr], packed[..., wr:]], dim=-1)
    if real:
        return z * m
    return torch.stack([m[..., 0] * z[..., 0] - m[..., 1] * z[..., 1],
                        m[..., 0] * z[..., 1] + m[..., 1] * z[..., 0]], dim=-1)


class ReconstructionGraph(torch.nn.Module):
    """``y (N, C, Hs, Ws)`` on the sensor grid → ``x̂ (N, C, H, W)`` on the scene grid (see the module
    docstring). ``geometry``: a :class:`LenslessGeometry`, or a sensor size for the circular model. ``net``
    maps ``(N, 2C, H, W) → (N, C, H, W)`` (on the support window when there is one).

    ``spectra_input=False`` (default): the spectra of ``psf`` (:func:`nsdd_edge.graph_spectra.graph_spectra`)
    are constants of the graph, ``forward(y)``. ``True``: they are inputs, ``forward(y, g_spec, null_spec)``
    (circular) or ``forward(y, g_spec, h_spec)`` (crop), so the runtime can feed those of another PSF (a warped
    one: live refocus); ``psf`` then only gives their shapes, the example values and the recorded hash."""

    def __init__(self, psf: np.ndarray, geometry: LenslessGeometry | Sequence[int], lam: float, *,
                 net: torch.nn.Module | None = None, objective: Objective = "nullspace",
                 dft: DftForm = "matmul", channels: int = 3, support_shape: Sequence[int] | None = None,
                 projector: str = "tikhonov", spectra_input: bool = False, support_taper: int = 0):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ExportError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
        if dft not in DFT_FORMS:
            raise ExportError(f"unknown DFT form {dft!r}; use one of {DFT_FORMS}")
        if (net is None) != (objective == "wiener"):
            raise ExportError("a student network is required for objectives 'nullspace'/'full' and "
                              "must be absent for the Wiener-only graph")
        psf = np.asarray(psf, dtype=np.float32)
        geometry = graph_geometry(geometry, psf.shape[-2:])
        if psf.shape[0] not in (1, channels):
            raise ExportError(f"PSF has {psf.shape[0]} channels; the graph has {channels}")
        try:
            spectra = graph_spectra(psf, geometry, lam, projector)  # type: ignore[arg-type]
        except OpticsError as exc:
            raise ExportError(str(exc)) from None
        if projector == "cg" and spectra_input:
            raise ExportError("the cg pseudo-inverse iterates inside the graph; it has no spectra inputs to swap "
                              "(live refocus needs tikhonov or truncated)")
        support = check_support(tuple(support_shape) if support_shape is not None else None, geometry.scene_shape)
        if support is not None and net is None:
            raise ExportError("support_shape is the student network's window; the Wiener-only graph has none")
        if support == geometry.scene_shape and not support_taper:
            support = None  # the whole grid: no crop/pad nodes
        window = student_window(support, support_taper)
        self.spec = GraphSpec(array_hash(psf), float(lam), geometry, int(channels), objective, dft, support,
                              projector, "input" if spectra_input else "fixed", int(support_taper))
        self.register_buffer("window", None if window is None else torch.from_numpy(window))
        self.net = net
        self.crop = geometry.model == "crop"
        self.height, self.width = geometry.scene_shape  # the output grid (= the sensor for the circular model)
        self.spectra_names = spectra_names(geometry)
        # example values of the inputs (spectra_input), never part of the graph; else the graph's constants
        self.spectra_example = {k: torch.from_numpy(v) for k, v in spectra.items()} if spectra_input else None
        if not spectra_input:
            for name in self.spectra_names:
                self.register_buffer(name, torch.from_numpy(spectra[name]))
        if self.crop:  # A = C_sensor F⁻¹ H F P_conv and A† = C_scene F⁻¹ G F P_conv on the convolution grid
            self.wr = geometry.conv_shape[1] // 2 + 1
            self.dft_module = None
            matmul = dft == "matmul"
            self.scene_dft = CentredRDFT2(geometry.conv_shape, geometry.scene_shape) if matmul else None
            self.sensor_dft = CentredRDFT2(geometry.conv_shape, geometry.sensor_shape) if matmul else None
            return
        self.wr = self.width // 2 + 1
        self.dft_module = MatmulRDFT2(self.height, self.width) if dft == "matmul" else None

    # ---- transforms ------------------------------------------------------------------------
    def _filter(self, x: torch.Tensor, packed: torch.Tensor, real: bool) -> torch.Tensor:
        """Circular model: ``F⁻¹[M · F(x)]`` with ``M`` packed ``[Re | Im]`` (``real``: ``M`` is real, one Mul)."""
        if self.dft_module is not None:
            z = self.dft_module(x)
            z = z * packed if real else complex_multiply_packed(z, packed, self.wr)
            return self.dft_module.inverse(z)
        z = _multiply_half_spectrum(torch.view_as_real(torch.fft.rfft2(x, norm="ortho")), packed, self.wr, real)
        return torch.fft.irfft2(torch.view_as_complex(z.contiguous()), s=(self.height, self.width), norm="ortho")

    def _crop_filter(self, x: torch.Tensor, packed: torch.Tensor, source: str, target: str) -> torch.Tensor:
        """Crop model: ``C_target F⁻¹[M · F(P_conv x)]`` for ``x`` on the ``source`` grid (``scene`` or
        ``sensor``), the result on the ``target`` grid; ``M`` complex, packed ``[Re | Im]``."""
        g = self.spec.geometry
        if self.spec.dft == "matmul":
            into = self.scene_dft if source == "scene" else self.sensor_dft
            out_of = self.scene_dft if target == "scene" else self.sensor_dft
            return out_of.inverse(complex_multiply_packed(into(x), packed, self.wr))
        z = torch.view_as_real(torch.fft.rfft2(centre_pad(x, g.conv_shape), norm="ortho"))
        z = _multiply_half_spectrum(z, packed, self.wr, real=False)
        full = torch.fft.irfft2(torch.view_as_complex(z.contiguous()), s=g.conv_shape, norm="ortho")
        return centre_crop(full, g.scene_shape if target == "scene" else g.sensor_shape)

    def _spectra(self, given: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The two spectra by name: the graph's constants, or the inputs ``given`` (spectra-input graph)."""
        if self.spectra_example is None:
            if given:
                raise ExportError("this graph holds its spectra as constants; it takes y only")
            return {name: getattr(self, name) for name in self.spectra_names}
        if len(given) != len(self.spectra_names):
            raise ExportError(f"this graph takes its spectra as inputs: forward(y, {', '.join(self.spectra_names)})")
        return dict(zip(self.spectra_names, given))

    def pseudo_inverse(self, y: torch.Tensor, *spectra: torch.Tensor) -> torch.Tensor:
        """``A†y = F⁻¹[G · F(y)]`` (circular) or ``C_scene F⁻¹[G · F(P_conv y)]`` (crop); ``cg``: conjugate
        gradient on ``(AᵀA + λI) x = Aᵀy`` (:meth:`_cg_tikhonov`)."""
        named = self._spectra(spectra)
        if self.spec.projector == "cg":
            return self._cg_tikhonov(y, named["h_spec"])
        if self.crop:
            return self._crop_filter(y, named["g_spec"], "sensor", "scene")
        return self._filter(y, named["g_spec"], real=False)

    def _cg_tikhonov(self, y: torch.Tensor, h_spec: torch.Tensor) -> torch.Tensor:
        """:data:`CG_ITERATIONS` steps of :func:`nsdd_edge.optics.cg_tikhonov`, unrolled. ``y`` is first scaled to
        unit RMS per sample (CG is homogeneous, so the result is scaled back) and the step sizes use means
        (ReduceSum of pre-scaled products: ReduceMean's opset-18 form does not convert to 17) rather than sums:
        the same ratios, in a range FP16 engines can hold."""
        hc_spec = torch.cat([h_spec[..., : self.wr], -h_spec[..., self.wr:]], dim=-1)  # conj(H), packed

        def mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # ⟨a, b⟩ / n per sample
            return (a * (b * (1.0 / float(a[0].numel())))).sum(dim=(1, 2, 3), keepdim=True)

        scale = mean(y, y).sqrt() + 1e-6
        b = self._crop_filter(y / scale, hc_spec, "sensor", "scene")
        x, r, p = torch.zeros_like(b), b, b
        rs = mean(r, r)
        for _ in range(CG_ITERATIONS):
            ap = self._crop_filter(self._crop_filter(p, h_spec, "scene", "sensor"), hc_spec, "sensor", "scene")
            ap = ap + self.spec.lam * p
            alpha = rs / (mean(p, ap) + 1e-12)
            x = x + alpha * p
            r = r - alpha * ap
            rs_new = mean(r, r)
            p = r + (rs_new / (rs + 1e-12)) * p
            rs = rs_new
        return x * scale

    def forward_model(self, x: torch.Tensor, *spectra: torch.Tensor) -> torch.Tensor:
        """Crop model: ``A x = C_sensor F⁻¹[H · F(P_conv x)]`` (the circular graph needs no ``A``)."""
        if not self.crop:
            raise ExportError("forward_model is part of the crop-model graph only (circular: I − A†A is one multiplier)")
        return self._crop_filter(x, self._spectra(spectra)["h_spec"], "scene", "sensor")

    def null_project(self, x: torch.Tensor, *spectra: torch.Tensor) -> torch.Tensor:
        """``(I − A†A) x``: ``F⁻¹[(1 − R) · F(x)]`` (circular) or ``x − A†(A x)`` (crop)."""
        if self.crop:
            return x - self.pseudo_inverse(self.forward_model(x, *spectra), *spectra)
        return self._filter(x, self._spectra(spectra)["null_spec"], real=True)

    def student_g(self, inputs: torch.Tensor) -> torch.Tensor:
        """``g``: the network on the whole grid, or on the support window (Slice) zero-padded back (Concat)."""
        assert self.net is not None
        if self.spec.support_shape is None:
            return self.net(inputs)
        g = self.net(centre_crop(inputs, self.spec.support_shape))
        if self.window is not None:  # the soft edge (Mul by a constant window)
            g = g * self.window
        return centre_pad(g, (self.height, self.width))

    def forward(self, y: torch.Tensor, g_spec: torch.Tensor | None = None,
                aux_spec: torch.Tensor | None = None) -> torch.Tensor:
        """``x̂`` of ``y``; a spectra-input graph takes its two spectra after ``y`` (:attr:`spectra_names`:
        ``g_spec``, then ``aux_spec`` = ``null_spec`` (circular) or ``h_spec`` (crop))."""
        spectra = tuple(s for s in (g_spec, aux_spec) if s is not None)
        x_dagger = self.pseudo_inverse(y, *spectra)
        if self.net is None:
            return x_dagger
        y_fit = fit_to_grid(y, (self.height, self.width)) if self.crop else y
        g = self.student_g(torch.cat([y_fit, x_dagger], dim=1))
        if self.spec.objective == "full":
            return g
        return x_dagger + self.null_project(g, *spectra)


def reconstruction_operator(psf: np.ndarray, geometry: LenslessGeometry, lam: float,
                            projector: str = "tikhonov") -> Any:
    """The training code's :class:`train.physics.LenslessOperator` for ``geometry`` (the reference)."""
    from train.physics import LenslessOperator

    crop = geometry.model == "crop"
    return LenslessOperator(psf, geometry.sensor_shape, geometry.model, lam=lam, projector=projector,  # type: ignore[arg-type]
                            scene_shape=geometry.scene_shape if crop else None,
                            conv_shape=geometry.conv_shape if crop else None)


def reference_reconstruction(psf: np.ndarray, y: torch.Tensor, lam: float, net: torch.nn.Module | None,
                             objective: Objective, support_shape: Sequence[int] | None = None,
                             projector: str = "tikhonov", geometry: LenslessGeometry | None = None,
                             support_taper: int = 0) -> torch.Tensor:
    """The same computation by the training code (the verification reference): ``A†y`` of
    :class:`train.physics.LenslessOperator` (``geometry``; default: circular at ``y``'s size), or the
    :class:`train.students.Student` around ``net`` (with its ``support_shape`` window)."""
    geometry = geometry or LenslessGeometry.make("circular", tuple(y.shape[-2:]))
    op = reconstruction_operator(psf, geometry, lam, projector).to(y.device)
    with torch.no_grad():
        if net is None or objective == "wiener":
            return op.A_dagger(y)
        from train.students import Student

        return Student(net, objective, support_shape, support_taper)(y, op)

"""The exported graph: measurement ``y`` → reconstruction ``x̂`` with the pseudo-inverse inside.

``x̂ = A†y + (I − A†A) g(cat(y, A†y))`` (objective ``nullspace``), ``g(cat(y, A†y))`` (``full``) or
``A†y`` (Wiener-only graph, no student). With a ``support_shape`` ``(h, w)`` (students trained on scenes
that fill only a centred window of the sensor-size grid, ``train.students.Student``) the network runs on
the centred crop of its stacked input (ONNX ``Slice``) and its output is zero-padded back (``Concat``
with zeros):
``g = P_support net(C_support(cat(y, A†y)))``, offsets ``top = (H − h) // 2``, ``left = (W − w) // 2`` as
:func:`train.physics.center_crop` / ``center_pad``. Circular model at sensor size, so ``A†`` and ``I − A†A`` are
the Fourier multipliers ``G = conj(H)/(|H|²+λ)`` and ``1 − R = 1 − |H|²/(|H|²+λ)`` taken from
:class:`nsdd_edge.optics.WienerSpectra` (the same spectra as training; nothing is recomputed here).

Two FFT forms:
- ``matmul`` (default): :class:`export.dft.MatmulRDFT2`, only MatMul/Slice/Add/Sub/Concat/Mul
  (TensorRT 10.x parses it).
- ``onnx``: ``torch.fft.rfft2/irfft2`` (``norm='ortho'``), exported by the dynamo exporter as ONNX
  ``DFT`` (TensorRT 11.2+, ONNX Runtime).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from export.dft import MatmulRDFT2, complex_multiply_packed, pack_half_spectrum
from export.errors import ExportError
from nsdd_edge.bundle import BundleError, parse_support
from nsdd_edge.optics import LenslessGeometry, OpticsError, WienerSpectra, array_hash

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
    support_shape: tuple[int, int] | None = None  # None: g covers the whole sensor-size grid
    projector: str = "tikhonov"  # the pseudo-inverse kind (nsdd_edge.optics.WienerSpectra)

    def metadata(self) -> dict[str, str]:
        import json

        props = {"nsdd.psf_sha256": self.psf_sha256, "nsdd.lam": repr(float(self.lam)),
                 "nsdd.geometry": json.dumps(self.geometry.to_dict()), "nsdd.channels": str(self.channels),
                 "nsdd.objective": self.objective, "nsdd.dft": self.dft, "nsdd.projector": self.projector}
        if self.support_shape is not None:
            props["nsdd.support_shape"] = json.dumps(list(self.support_shape))
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
                support = check_support(json.loads(props["nsdd.support_shape"]), geometry.sensor_shape)
            except (json.JSONDecodeError, ExportError) as exc:
                raise ExportError(f"model metadata nsdd.support_shape={props['nsdd.support_shape']!r}: {exc}") from None
        return GraphSpec(psf_sha256=props["nsdd.psf_sha256"], lam=float(props["nsdd.lam"]),
                         geometry=geometry, channels=int(props["nsdd.channels"]),
                         objective=props["nsdd.objective"], dft=props["nsdd.dft"],  # type: ignore[arg-type]
                         support_shape=support, projector=props.get("nsdd.projector", "tikhonov"))


def check_support(support: object, grid: Sequence[int]) -> tuple[int, int] | None:
    """``support`` as ``(h, w)`` (None stays None) by the bundle's rule
    (:func:`nsdd_edge.bundle.parse_support`), its error as :class:`ExportError`."""
    try:
        return parse_support(support, (int(grid[0]), int(grid[1])))
    except BundleError as exc:
        raise ExportError(str(exc)) from None


class ReconstructionGraph(torch.nn.Module):
    """``y (N, C, H, W)`` → ``x̂`` (see the module docstring). ``net`` maps ``(N, 2C, H, W) → (N, C, H, W)``."""

    def __init__(self, psf: np.ndarray, sensor_shape: Sequence[int], lam: float, *,
                 net: torch.nn.Module | None = None, objective: Objective = "nullspace",
                 dft: DftForm = "matmul", channels: int = 3, support_shape: Sequence[int] | None = None,
                 projector: str = "tikhonov"):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ExportError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
        if dft not in DFT_FORMS:
            raise ExportError(f"unknown DFT form {dft!r}; use one of {DFT_FORMS}")
        if (net is None) != (objective == "wiener"):
            raise ExportError("a student network is required for objectives 'nullspace'/'full' and "
                              "must be absent for the Wiener-only graph")
        psf = np.asarray(psf, dtype=np.float32)
        geometry = LenslessGeometry.make("circular", sensor_shape, psf.shape[-2:])
        if psf.shape[0] not in (1, channels):
            raise ExportError(f"PSF has {psf.shape[0]} channels; the graph has {channels}")
        try:
            spectra = WienerSpectra.from_psf(psf, geometry.conv_shape, lam, projector)  # type: ignore[arg-type]
        except OpticsError as exc:
            raise ExportError(str(exc)) from None
        support = check_support(tuple(support_shape) if support_shape is not None else None, geometry.sensor_shape)
        if support is not None and net is None:
            raise ExportError("support_shape is the student network's window; the Wiener-only graph has none")
        if support == geometry.sensor_shape:
            support = None  # the whole grid: no crop/pad nodes
        self.spec = GraphSpec(array_hash(psf), float(lam), geometry, int(channels), objective, dft, support,
                              spectra.projector)
        self.net = net
        self.height, self.width = geometry.sensor_shape
        self.wr = self.width // 2 + 1
        g_packed = pack_half_spectrum(spectra.half("G"))
        null = 1.0 - spectra.half("R").real  # I − A†A multiplier, float64 before the cast
        self.register_buffer("g_spec", torch.from_numpy(g_packed.astype(np.float32)))
        self.register_buffer("null_spec", torch.from_numpy(
            np.concatenate([null, null], axis=-1).astype(np.float32)))
        self.dft_module = MatmulRDFT2(self.height, self.width) if dft == "matmul" else None

    # ---- transforms ------------------------------------------------------------------------
    def _filter(self, x: torch.Tensor, packed: torch.Tensor, real: bool) -> torch.Tensor:
        """``F⁻¹[M · F(x)]`` with ``M`` packed ``[Re | Im]`` (``real``: ``M`` is real, one Mul)."""
        if self.dft_module is not None:
            z = self.dft_module(x)
            z = z * packed if real else complex_multiply_packed(z, packed, self.wr)
            return self.dft_module.inverse(z)
        z = torch.view_as_real(torch.fft.rfft2(x, norm="ortho"))  # (..., H, Wr, 2)
        m = torch.stack([packed[..., : self.wr], packed[..., self.wr:]], dim=-1)
        if real:
            z = z * m
        else:
            z = torch.stack([m[..., 0] * z[..., 0] - m[..., 1] * z[..., 1],
                             m[..., 0] * z[..., 1] + m[..., 1] * z[..., 0]], dim=-1)
        return torch.fft.irfft2(torch.view_as_complex(z.contiguous()), s=(self.height, self.width), norm="ortho")

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``A†y = F⁻¹[G · F(y)]``."""
        return self._filter(y, self.g_spec, real=False)

    def null_project(self, x: torch.Tensor) -> torch.Tensor:
        """``(I − A†A) x = F⁻¹[(1 − R) · F(x)]``."""
        return self._filter(x, self.null_spec, real=True)

    def student_g(self, inputs: torch.Tensor) -> torch.Tensor:
        """``g``: the network on the whole grid, or on the support window (Slice) zero-padded back (Concat)."""
        assert self.net is not None
        if self.spec.support_shape is None:
            return self.net(inputs)
        h, w = self.spec.support_shape
        top, left = (self.height - h) // 2, (self.width - w) // 2
        g = self.net(inputs[:, :, top : top + h, left : left + w])
        # zero-pad by Concat with zeros: an ONNX Pad of opset 18 (what the exporter writes) has no
        # version-converter adapter down to the default opset 17
        n, c = g.shape[0], g.shape[1]
        right, bottom = self.width - w - left, self.height - h - top
        if left or right:
            g = torch.cat([t for t in (g.new_zeros((n, c, h, left)), g, g.new_zeros((n, c, h, right))) if t.shape[-1]],
                          dim=-1)
        if top or bottom:
            g = torch.cat([t for t in (g.new_zeros((n, c, top, self.width)), g,
                                       g.new_zeros((n, c, bottom, self.width))) if t.shape[-2]], dim=-2)
        return g

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        x_dagger = self.pseudo_inverse(y)
        if self.net is None:
            return x_dagger
        g = self.student_g(torch.cat([y, x_dagger], dim=1))
        if self.spec.objective == "full":
            return g
        return x_dagger + self.null_project(g)


def reference_reconstruction(psf: np.ndarray, y: torch.Tensor, lam: float, net: torch.nn.Module | None,
                             objective: Objective, support_shape: Sequence[int] | None = None,
                             projector: str = "tikhonov") -> torch.Tensor:
    """The same computation by the training code (the verification reference): ``A†y`` of
    :class:`train.physics.LenslessOperator`, or the :class:`train.students.Student` around ``net``
    (with its ``support_shape`` window)."""
    from train.physics import LenslessOperator

    op = LenslessOperator(psf, tuple(y.shape[-2:]), "circular", lam=lam, projector=projector).to(y.device)
    with torch.no_grad():
        if net is None or objective == "wiener":
            return op.A_dagger(y)
        from train.students import Student

        return Student(net, objective, support_shape)(y, op)

"""The exported graph: measurement ``y`` → reconstruction ``x̂`` with the pseudo-inverse inside.

``x̂ = A†y + (I − A†A) g(cat(y, A†y))`` (objective ``nullspace``), ``g(cat(y, A†y))`` (``full``) or
``A†y`` (Wiener-only graph, no student). Circular model at sensor size, so ``A†`` and ``I − A†A`` are
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
from nsdd_edge.optics import LenslessGeometry, WienerSpectra, array_hash

Objective = Literal["nullspace", "full", "wiener"]
DftForm = Literal["matmul", "onnx"]
OBJECTIVES = ("nullspace", "full", "wiener")
DFT_FORMS = ("matmul", "onnx")


class ExportError(ValueError):
    """An export request that cannot be honoured (mismatched student, bad size, bad model file)."""


@dataclass(frozen=True)
class GraphSpec:
    """What an exported graph computes; written into the ONNX ``metadata_props``."""

    psf_sha256: str
    lam: float
    geometry: LenslessGeometry
    channels: int
    objective: Objective
    dft: DftForm

    def metadata(self) -> dict[str, str]:
        import json

        return {"nsdd.psf_sha256": self.psf_sha256, "nsdd.lam": repr(float(self.lam)),
                "nsdd.geometry": json.dumps(self.geometry.to_dict()), "nsdd.channels": str(self.channels),
                "nsdd.objective": self.objective, "nsdd.dft": self.dft}

    @staticmethod
    def from_metadata(props: dict[str, str]) -> GraphSpec:
        import json

        missing = [k for k in ("nsdd.psf_sha256", "nsdd.lam", "nsdd.geometry", "nsdd.channels",
                               "nsdd.objective", "nsdd.dft") if k not in props]
        if missing:
            raise ExportError(f"model metadata lacks {missing} (not exported by nsdd-export onnx?)")
        return GraphSpec(psf_sha256=props["nsdd.psf_sha256"], lam=float(props["nsdd.lam"]),
                         geometry=LenslessGeometry.from_dict(json.loads(props["nsdd.geometry"])),
                         channels=int(props["nsdd.channels"]), objective=props["nsdd.objective"],  # type: ignore[arg-type]
                         dft=props["nsdd.dft"])  # type: ignore[arg-type]


class ReconstructionGraph(torch.nn.Module):
    """``y (N, C, H, W)`` → ``x̂`` (see the module docstring). ``net`` maps ``(N, 2C, H, W) → (N, C, H, W)``."""

    def __init__(self, psf: np.ndarray, sensor_shape: Sequence[int], lam: float, *,
                 net: torch.nn.Module | None = None, objective: Objective = "nullspace",
                 dft: DftForm = "matmul", channels: int = 3):
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
        spectra = WienerSpectra.from_psf(psf, geometry.conv_shape, lam)
        self.spec = GraphSpec(array_hash(psf), float(lam), geometry, int(channels), objective, dft)
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

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        x_dagger = self.pseudo_inverse(y)
        if self.net is None:
            return x_dagger
        g = self.net(torch.cat([y, x_dagger], dim=1))
        if self.spec.objective == "full":
            return g
        return x_dagger + self.null_project(g)


def reference_reconstruction(psf: np.ndarray, y: torch.Tensor, lam: float, net: torch.nn.Module | None,
                             objective: Objective) -> torch.Tensor:
    """The same computation with :class:`train.physics.LenslessOperator` (the verification reference)."""
    from train.physics import LenslessOperator

    op = LenslessOperator(psf, tuple(y.shape[-2:]), "circular", lam=lam).to(y.device)
    with torch.no_grad():
        x_dagger = op.A_dagger(y)
        if net is None or objective == "wiener":
            return x_dagger
        g = net(torch.cat([y, x_dagger], dim=1))
        return g if objective == "full" else x_dagger + op.null_project(g)

"""Lensless datasets on disk (written by ``nsdd-train simulate`` or prepared from real captures).

Layout of a dataset directory::

    dataset.json          metadata (see below)
    psf.npy               the normalised PSF used, float32 (C, H, W)
    measurements/ID.npy   y, float32 (C, *sensor_shape)
    ground_truth/ID.npy   x, float32 (C, *scene_shape) in [0, 1]   (optional: real data has none)

``dataset.json`` keys: ``psf`` {file, sha256, source}, ``forward`` (the geometry that produced y,
:meth:`LenslessGeometry.to_dict`), ``recon`` {model, lam, scene_shape?, conv_shape?} (the operator the
reconstruction methods use), ``noise_std``, ``seed``, ``channels``, ``splits`` {name: [ids]}, ``skipped``.
Reconstruction directories hold ``ID.npy`` (float32 ``(C, H, W)``) and ``ID.png`` with the same ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from nsdd_edge.optics import LenslessGeometry, OpticsError, array_hash, read_array
from train.physics import LenslessOperator


class DatasetError(ValueError):
    """A dataset directory that is missing files or inconsistent; the message names the path."""


class LenslessDataset:
    """Read-only view of a dataset directory (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "dataset.json"
        if not meta_path.exists():
            raise DatasetError(f"{self.root}: not a dataset (no dataset.json)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{meta_path}: invalid JSON ({exc})") from exc
        psf_file = self.root / self.meta.get("psf", {}).get("file", "psf.npy")
        try:
            self.psf = read_array(psf_file)
        except OpticsError as exc:
            raise DatasetError(str(exc)) from exc
        want = self.meta.get("psf", {}).get("sha256")
        if want and array_hash(self.psf) != want:
            raise DatasetError(f"{psf_file}: PSF hash does not match dataset.json (file changed?)")

    # ---- ids and arrays ----------------------------------------------------------------------
    @property
    def splits(self) -> dict[str, list[str]]:
        return self.meta.get("splits", {})

    def ids(self, split: str | None = None) -> list[str]:
        """Sample ids of a split (``None`` or ``"all"``: every measurement on disk, sorted)."""
        if split in (None, "all"):
            return sorted(p.stem for p in (self.root / "measurements").glob("*.npy"))
        if split not in self.splits:
            raise DatasetError(f"{self.root}: no split {split!r} (have {sorted(self.splits)})")
        return list(self.splits[split])

    def measurement(self, sample_id: str) -> np.ndarray:
        return read_array(self.root / "measurements" / f"{sample_id}.npy")

    def has_ground_truth(self, sample_id: str) -> bool:
        return (self.root / "ground_truth" / f"{sample_id}.npy").exists()

    def ground_truth(self, sample_id: str) -> np.ndarray:
        return read_array(self.root / "ground_truth" / f"{sample_id}.npy")

    def scene_levels(self, ids: Sequence[str]) -> torch.Tensor | None:
        """Each sample's scene level ``L``: a camera profile's simulation stores ``L · x`` (``x`` the [0, 1] image)
        to match the real captures' signal, so image metrics score ``x̂ / L`` against ``x``. ``None`` for data
        simulated without a profile (``L = 1``).

        Data sets written before the levels were recorded (``profile_match`` without ``scene_levels``) get them
        back exactly from their source images: ``L = Σ L·x / Σ x`` (a named error when the images are gone)."""
        if "profile_match" not in self.meta:
            return None
        recorded = self.meta.get("scene_levels") or {}
        levels = []
        for sid in ids:
            if sid in recorded:
                levels.append(float(recorded[sid]))
                continue
            levels.append(self._recovered_level(sid))
        return torch.tensor(levels, dtype=torch.float32)

    def _recovered_level(self, sid: str) -> float:
        from train.simulate import prepare_scene, recover_level

        cache = self.__dict__.setdefault("_levels", {})
        if sid not in cache:
            settings, source = self.meta.get("settings", {}), (self.meta.get("sources") or {}).get(sid)
            path = Path(settings.get("images", "")) / str(source)
            if source is None or not path.is_file():
                raise DatasetError(f"{self.root}: sample {sid}'s scene level is not recorded and its source image "
                                   f"{path} is gone; simulate the data set again to record the levels")
            scene = prepare_scene(path, int(settings["scene_size"]), int(self.meta.get("channels", 3)))
            cache[sid] = recover_level(self.ground_truth(sid), scene)
        return cache[sid]

    def measurements(self, ids: Sequence[str]) -> torch.Tensor:
        """Stack measurements of ``ids`` into an ``(N, C, H, W)`` float32 tensor."""
        return torch.from_numpy(np.stack([self.measurement(i) for i in ids]))

    def batches(self, ids: Sequence[str], batch_size: int) -> Iterable[tuple[list[str], torch.Tensor]]:
        for k in range(0, len(ids), batch_size):
            chunk = list(ids[k : k + batch_size])
            yield chunk, self.measurements(chunk)

    # ---- operators ---------------------------------------------------------------------------
    @property
    def forward_geometry(self) -> LenslessGeometry:
        return LenslessGeometry.from_dict(self.meta["forward"])

    def physics(self, model: str | None = None, lam: float | None = None,
                projector: str | None = None, psf: np.ndarray | None = None) -> LenslessOperator:
        """The reconstruction operator (``recon`` settings of dataset.json unless overridden: model, λ, the
        pseudo-inverse kind ``projector``; ``psf``: another PSF on the same grids, e.g. the dataset's warped to
        another depth).

        Its spectra are float64/complex128 and follow each input's dtype, so one operator serves float32
        and float64 alike.
        """
        recon = dict(self.meta.get("recon", {}))
        fwd = self.meta["forward"]
        model = model or recon.get("model", fwd["model"])
        lam = float(lam if lam is not None else recon.get("lam", 1e-6))
        projector = projector or str(recon.get("projector", "tikhonov"))
        sensor = fwd["sensor_shape"]
        psf = self.psf if psf is None else psf
        if model == "circular":
            op = LenslessOperator(psf, sensor, "circular", lam=lam, noise_std=self.meta.get("noise_std", 0.0),
                                  projector=projector)
        else:
            op = LenslessOperator(psf, sensor, "crop", lam=lam,
                                  scene_shape=recon.get("scene_shape", fwd["scene_shape"]),
                                  conv_shape=recon.get("conv_shape", fwd["conv_shape"]),
                                  noise_std=self.meta.get("noise_std", 0.0), projector=projector)
        return op

    def discrepancy_lambda(self, ids: Sequence[str], limit: int = 64, tau: float = 1.0) -> float:
        """The reconstruction operator's λ by the discrepancy principle (no ground truth): the λ whose Wiener
        residual ``rms(y − A A†_λ y)`` equals ``τ σ`` on the measurements ``ids[:limit]``, σ the data set's noise
        level (:func:`nsdd_edge.optics.discrepancy_lambda`)."""
        from nsdd_edge.optics import discrepancy_lambda

        sigma = float(self.meta.get("noise_std") or 0.0)
        if not sigma > 0:
            raise DatasetError(f"{self.root}: dataset.json gives no noise level (noise_std), which the discrepancy "
                               "principle needs; give λ explicitly")
        if not ids:
            raise DatasetError(f"{self.root}: no measurements to choose λ on")
        y = np.stack([self.measurement(i) for i in list(ids)[:limit]])
        try:
            return discrepancy_lambda(self.psf, self.physics().geometry, y, sigma, tau=tau)
        except OpticsError as exc:
            raise DatasetError(f"{self.root}: {exc}") from None

    def forward_physics(self, psf: np.ndarray | None = None) -> LenslessOperator:
        """The operator that produced the measurements (for simulation and physical consistency; ``psf``: another
        PSF on its convolution grid)."""
        g = self.forward_geometry
        psf = self.psf if psf is None else psf
        return LenslessOperator(psf, g.sensor_shape, g.model, lam=float(self.meta.get("recon", {}).get(
            "lam", 1e-6)), scene_shape=g.scene_shape, conv_shape=g.conv_shape, noise_std=self.meta.get("noise_std", 0.0))


def read_recon_dir(root: str | Path, ids: Sequence[str]) -> torch.Tensor:
    """Load reconstructions ``ID.npy`` of ``ids`` from a directory into ``(N, C, H, W)``."""
    root = Path(root)
    missing = [i for i in ids if not (root / f"{i}.npy").exists()]
    if missing:
        raise DatasetError(f"{root}: no reconstruction for {len(missing)} ids (first: {missing[:3]})")
    return torch.from_numpy(np.stack([read_array(root / f"{i}.npy") for i in ids]))

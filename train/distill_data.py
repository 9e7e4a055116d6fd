"""Distillation data: measurements paired with teacher targets (:class:`TargetSet`), and the seeded batch order.

No ground truth is read: only ``measurements/ID.npy`` of the dataset and ``TARGETS/ID.npy``. The batch
order is a function of ``(seed, epoch, index)``; a data-parallel run draws the same global batches and each
process keeps its rows (:mod:`train.distributed`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from nsdd_edge.optics import OpticsError, array_hash, read_array
from train.data import LenslessDataset


class DistillError(ValueError):
    """Bad distillation input (dataset, targets, settings); the message names the path or option."""


class TargetSet:
    """Measurements of a dataset paired with teacher targets ``TARGETS/ID.npy`` (no ground truth)."""

    def __init__(self, dataset: LenslessDataset, targets_dir: str | os.PathLike, ids: Sequence[str],
                 scene_shape: Sequence[int]):
        self.dataset = dataset
        self.targets_dir = Path(targets_dir)
        if not self.targets_dir.is_dir():
            raise DistillError(f"{self.targets_dir}: targets directory does not exist")
        self.ids = list(ids)
        if not self.ids:
            raise DistillError(f"{dataset.root}: no measurements to train on")
        missing = [i for i in self.ids if not (self.targets_dir / f"{i}.npy").exists()]
        if missing:
            shown = ", ".join(missing[:10]) + (", …" if len(missing) > 10 else "")
            labelled = self.ids.index(missing[0])  # targets present for the first `labelled` ids ...
            if labelled == len(self.ids) - len(missing):  # ... and for no other: `teacher --limit` made them
                hint = (f"the teacher labelled only the first {labelled} (nsdd-train teacher --limit {labelled}): "
                        f"add --limit {labelled} to train on those, or run nsdd-train teacher without --limit")
            else:
                hint = "run nsdd-train teacher for them, or choose --split"
            raise DistillError(f"{self.targets_dir}: no teacher target ID.npy for {len(missing)} of {len(self.ids)} "
                               f"measurements: {shown} ({hint})")
        y0 = self.measurement(self.ids[0])
        t0 = self.target(self.ids[0])
        self.channels = int(y0.shape[0])
        want = (self.channels, int(scene_shape[0]), int(scene_shape[1]))
        if tuple(t0.shape) != want:
            raise DistillError(f"{self.targets_dir / (self.ids[0] + '.npy')}: target has shape {tuple(t0.shape)}, "
                               f"expected {want} (channels of y × the operator's scene grid)")
        self.teacher = self._teacher_record(dataset)

    def _teacher_record(self, dataset: LenslessDataset) -> dict:
        """What the targets say about their teacher (``recon.json``, ``teacher.json``); checks the PSF."""
        def read(name: str) -> dict:
            path = self.targets_dir / name
            try:
                d = json.loads(path.read_text()) if path.exists() else {}
            except (OSError, json.JSONDecodeError) as exc:
                raise DistillError(f"{path}: unreadable ({exc})") from exc
            return d if isinstance(d, dict) else {}

        recon, manifest = read("recon.json"), read("teacher.json")
        identity = manifest.get("identity", {})
        psf_hash = identity.get("dataset_psf_sha256") or recon.get("source", {}).get("psf_sha256")
        if psf_hash and psf_hash != array_hash(dataset.psf):
            raise DistillError(f"{self.targets_dir}: targets were made for PSF {psf_hash[:12]}…, the dataset "
                               f"{dataset.root} has PSF {array_hash(dataset.psf)[:12]}…")
        record = {k: recon[k] for k in ("method", "settings", "prior") if k in recon}
        if manifest.get("prior", {}).get("sha256"):
            record["prior_sha256"] = manifest["prior"]["sha256"]
        if identity.get("physics"):
            record["physics"] = identity["physics"]
        return record

    def measurement(self, sample_id: str) -> np.ndarray:
        try:
            return self.dataset.measurement(sample_id)
        except OpticsError as exc:
            raise DistillError(f"measurement {sample_id}: {exc}") from exc

    def target(self, sample_id: str) -> np.ndarray:
        try:
            return read_array(self.targets_dir / f"{sample_id}.npy")
        except OpticsError as exc:
            raise DistillError(f"teacher target {sample_id}: {exc}") from exc

    def preload(self, device: torch.device) -> None:
        """Read every pair once and keep them as two tensors on ``device``; :meth:`batch` then indexes them."""
        self._row = {i: k for k, i in enumerate(self.ids)}
        self._y = torch.from_numpy(np.stack([self.measurement(i) for i in self.ids])).to(device)
        self._t = torch.from_numpy(np.stack([self.target(i) for i in self.ids])).to(device)

    def batch(self, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(self, "_row", None) is not None:
            rows = torch.as_tensor([self._row[i] for i in ids], device=self._y.device)
            return self._y[rows], self._t[rows]
        y = np.stack([self.measurement(i) for i in ids])
        t = np.stack([self.target(i) for i in ids])
        if y.shape[1:] != (self.channels,) + y.shape[2:] or t.shape[1:] != (self.channels,) + t.shape[2:]:
            raise DistillError(f"samples {list(ids)} do not all have {self.channels} channels")
        return torch.from_numpy(y), torch.from_numpy(t)


class BatchOrder:
    """Seeded epoch permutations; the position ``(epoch, index)`` fully determines the next batch."""

    def __init__(self, n: int, batch: int, seed: int, epoch: int = 0, index: int = 0):
        self.n, self.batch, self.seed = n, batch, seed
        self.epoch, self.index = epoch, index

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next(self) -> list[int]:
        out: list[int] = []
        perm = self._perm(self.epoch)
        while len(out) < self.batch:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                perm = self._perm(self.epoch)
            take = min(self.batch - len(out), self.n - self.index)
            out.extend(int(i) for i in perm[self.index : self.index + take])
            self.index += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


def choose_ids(dataset: LenslessDataset, split: str | None) -> tuple[list[str], str]:
    """Ids to train on: ``split`` if given, else the ``train`` split if there is one, else all."""
    if split:
        return dataset.ids(split), split
    if "train" in dataset.splits:
        return dataset.ids("train"), "train"
    return dataset.ids(None), "all"

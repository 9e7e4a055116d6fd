"""Images for ``nsdd-train prior``: find them, prepare them (square crop, resize, [0, 1]) and batch them.

Data order: epoch ``e`` visits the images in ``permutation(seed, e)``; the global sample ``position`` fixes
the next batch (:func:`batch_indices`), so a resume continues the order exactly, whatever the number of
data-parallel processes (each uses its rows of the same global batch, see :mod:`train.distributed`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from nsdd_edge.optics import IMAGE_SUFFIXES, OpticsError, center_pad, read_image01
from train.prior.io import PriorError

READABLE_SUFFIXES = tuple(IMAGE_SUFFIXES) + (".npy",)

def find_image_files(root: Path) -> tuple[Path, list[Path]]:
    """The image folder to use (``root`` or its ``ground_truth/``) and its image files, sorted."""
    root = Path(root)
    if not root.exists():
        raise PriorError(f"--images {root}: no such directory")
    if not root.is_dir():
        raise PriorError(f"--images {root}: not a directory")
    if (root / "dataset.json").exists() or (root / "ground_truth").is_dir():
        if not (root / "ground_truth").is_dir():
            raise PriorError(f"--images {root}: a dataset directory without ground_truth/ (real captures "
                             "have no scenes to train a prior on)")
        meta_path = root / "dataset.json"
        splits = json.loads(meta_path.read_text()).get("splits", {}) if meta_path.exists() else {}
        root = root / "ground_truth"
        if "train" in splits:  # never train a prior on held-out test scenes
            files = [root / f"{i}.npy" for i in splits["train"]]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise PriorError(f"--images {root}: {len(missing)} train-split scenes missing (first: {missing[:3]})")
            if not files:
                raise PriorError(f"--images {root.parent}: the train split is empty")
            return root, files
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in READABLE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise PriorError(f"--images {root}: no image files ({', '.join(READABLE_SUFFIXES)}) found")
    return root, files


def prepare_image(img: np.ndarray, size: int, channels: int) -> np.ndarray:
    """``(C, H, W)`` in [0, 1] → centre square crop → ``(channels, size, size)`` float32 (INTER_AREA when shrinking)."""
    import cv2

    c, h, w = img.shape
    side = min(h, w)
    r, q = (h - side) // 2, (w - side) // 2
    img = img[:, r:r + side, q:q + side]
    if channels == 1 and c == 3:
        img = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
    elif channels == 3 and c == 1:
        img = np.repeat(img, 3, axis=0)
    if side != size:
        interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
        img = np.stack([cv2.resize(np.ascontiguousarray(ch), (size, size), interpolation=interp) for ch in img])
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def load_images(files: list[Path], size: int, channels: int, progress: bool = True
                ) -> tuple[np.ndarray, list[Path], list[tuple[str, str]]]:
    """Read and prepare all images: ``(N, C, size, size)`` float16 in [0, 1], the files used, the skipped ones."""
    from tqdm.auto import tqdm

    kept, used, skipped = [], [], []
    for path in tqdm(files, desc="reading images", disable=not progress, leave=False):
        try:
            img = read_image01(path)
            if img.shape[0] not in (1, 3):
                raise OpticsError(f"{path}: {img.shape[0]} channels (expected 1 or 3)")
            kept.append(prepare_image(img, size, channels).astype(np.float16))
            used.append(path)
        except (OpticsError, ValueError, OSError) as exc:
            reason = str(exc)
            skipped.append((str(path), reason[len(str(path)) + 2:] if reason.startswith(f"{path}: ") else reason))
    if not kept:
        raise PriorError(f"--images: none of the {len(files)} image files could be read "
                         f"(first problem: {skipped[0][1]})")
    return np.stack(kept), used, skipped


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The data order of one epoch, a function of (seed, epoch) only (so a resume continues it exactly)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def batch_indices(position: int, batch: int, n: int, seed: int) -> list[int]:
    """Indices of the ``batch`` samples starting at global sample ``position`` (crossing epochs as needed)."""
    out: list[int] = []
    while len(out) < batch:
        epoch, offset = divmod(position, n)
        take = min(batch - len(out), n - offset)
        out.extend(epoch_permutation(seed, epoch, n)[offset:offset + take].tolist())
        position += take
    return out


def make_batch(images: np.ndarray | torch.Tensor, index: list[int], pad_to: int | None) -> torch.Tensor:
    """Scenes ``images[index]`` in [0, 1], zero-padded centrally to ``pad_to``², mapped to [−1, 1]: ``2x − 1``.
    ``images`` may be a tensor already on the training device (then the batch stays there)."""
    if isinstance(images, torch.Tensor):
        from train.physics import center_pad as center_pad_t

        x0 = images[torch.as_tensor(index, device=images.device)].float()
        if pad_to:
            x0 = center_pad_t(x0, (pad_to, pad_to))
        return x0 * 2.0 - 1.0
    x0 = images[index].astype(np.float32)
    if pad_to:
        x0 = center_pad(x0, (pad_to, pad_to))
    return torch.from_numpy(x0) * 2.0 - 1.0

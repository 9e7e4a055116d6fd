"""The face pack: the training faces as one ``.npz`` of JPEGs, what the GPU one-shot carries to the device machine.

The device machine receives the working tree and the carried ``.gpu/`` folder, 64 MiB in all
(``scripts/gpu_payload.sh``), so the pack is sized to fit: the canonical data set's **training split only** (the
held-out test faces never leave this machine), at 64 px, with a seeded subset of ``count128`` faces at 128 px
instead (the 128 px prior of the paper's 128-on-256 geometry; a 64 px stage resizes them with INTER_AREA, as it
resizes the source crops). JPEG quality 85: 1.8 kB a face at 64 px, 3.9 kB at 128 px (UTKFace crops are 200 px).

Format ``nsdd-face-pack/2``: ``jpeg`` (the concatenated files), ``offsets``, ``names`` (newline-joined),
``sizes`` (each face's side) and ``info`` (JSON). Version 1 packs (no ``sizes``: every face at ``info.size``)
still unpack.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

PACK_FORMAT = "nsdd-face-pack/2"
PACK_FORMATS = ("nsdd-face-pack/1", PACK_FORMAT)


class FacePackError(ValueError):
    """A face pack that cannot be written or read (the path and the problem)."""


def pack_faces(dataset: Path, out: Path, size: int = 64, quality: int = 85, count128: int = 0,
               size128: int = 128, seed: int = 0) -> dict:
    """JPEG-encode the training split of a simulated data set's scenes (its ``dataset.json`` names the source
    files) into one ``.npz``: ``count128`` of them (a seeded choice) at ``size128`` px, the rest at ``size`` px;
    the test split is left out. Returns the pack's ``info`` with its byte count."""
    import cv2

    from train.simulate import prepare_scene

    meta_path = dataset / "dataset.json"
    if not meta_path.is_file():
        raise FacePackError(f"{dataset}: not a simulated data set (no dataset.json)")
    meta = json.loads(meta_path.read_text())
    folder = Path(meta["settings"]["images"])
    names = [meta["sources"][i] for i in meta["splits"]["train"]]
    if not 0 <= count128 <= len(names):
        raise FacePackError(f"{dataset}: --count128 {count128} is not in [0, {len(names)}] (the training faces)")
    large = set(np.random.default_rng(seed).permutation(len(names))[:count128].tolist())
    sizes = np.array([size128 if k in large else size for k in range(len(names))], dtype=np.int32)
    blobs = []
    for name, side in zip(names, sizes):
        x = prepare_scene(folder / name, int(side), 3)
        u8 = (np.moveaxis(x, 0, -1)[..., ::-1] * 255.0 + 0.5).astype(np.uint8)  # BGR for OpenCV
        ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise FacePackError(f"{folder / name}: JPEG encoding failed")
        blobs.append(buf.tobytes())
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    info = {"format": PACK_FORMAT, "size": size, "size128": size128, "count128": count128, "seed": seed,
            "quality": quality, "count": len(names), "dataset": str(dataset), "split": "train", "source": str(folder)}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, jpeg=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets, sizes=sizes,
             names=np.frombuffer("\n".join(names).encode(), dtype=np.uint8), info=np.array(json.dumps(info)))
    return {**info, "bytes": int(offsets[-1])}


def unpack_faces(pack: Path, folder: Path, limit: int | None = None) -> dict[str, int]:
    """Write the pack's JPEGs into ``folder`` under their original names (the first ``limit`` in name order);
    returns ``{name: side in px}`` in name order."""
    try:
        with np.load(pack) as z:
            info = json.loads(str(z["info"]))
            if info.get("format") not in PACK_FORMATS:
                raise FacePackError(f"{pack}: not a face pack ({info.get('format')!r})")
            jpeg, offsets, names = z["jpeg"], z["offsets"], z["names"].tobytes().decode().split("\n")
            sizes = z["sizes"] if "sizes" in z.files else np.full(len(names), int(info["size"]))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, FacePackError):
            raise
        raise FacePackError(f"{pack}: cannot read the face pack ({type(exc).__name__}: {exc})") from None
    folder.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(names)), key=lambda k: names[k])[:limit]
    for k in order:
        (folder / names[k]).write_bytes(jpeg[offsets[k]:offsets[k + 1]].tobytes())
    return {names[k]: int(sizes[k]) for k in order}

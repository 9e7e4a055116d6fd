"""scripts/unseen_faces.py: the held-out faces of a fit are faces no model of the run trained on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("unseen_faces", ROOT / "scripts" / "unseen_faces.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataset(root: Path, images: Path, train: list[str], test: list[str]) -> Path:
    root.mkdir(parents=True)
    ids = {f"{k:06d}": name for k, name in enumerate(train + test)}
    splits = {"train": [i for i, n in ids.items() if n in train], "test": [i for i, n in ids.items() if n in test]}
    (root / "dataset.json").write_text(json.dumps({"settings": {"images": str(images)}, "sources": ids,
                                                   "splits": splits}))
    return root


def test_keeps_the_canonical_test_faces_no_fit_trained_on(tmp_path, capsys):
    images = tmp_path / "faces"
    images.mkdir()
    for k in range(8):
        (images / f"f{k}.jpg").write_bytes(b"jpg")
    canonical = _dataset(tmp_path / "canon", images, ["f0", "f1", "f2", "f3"], ["f4", "f5", "f6", "f7"])
    fit = _dataset(tmp_path / "fit", images, ["f5", "f0"], ["f4", "f1"])  # its own split of the same folder
    out = tmp_path / "unseen"
    assert _script().main(["--test-of", str(canonical), "--exclude-train-of", str(fit), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["f4", "f6", "f7"]
    assert (out / "f4").resolve() == (images / "f4").resolve()
    assert _script().main(["--test-of", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "not a simulated data set" in capsys.readouterr().err

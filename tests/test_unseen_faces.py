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
    names = [f"f{k}.jpg" for k in range(8)]
    canonical = _dataset(tmp_path / "canon", images, names[:4], names[4:])
    fit = _dataset(tmp_path / "fit", images, [names[5], names[0]], [names[4], names[1]])  # its own split
    out = tmp_path / "unseen"
    assert _script().main(["--test-of", str(canonical), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == names[4:]
    # again, now leaving out what the fit trained on: the earlier link to f5 must go
    assert _script().main(["--test-of", str(canonical), "--exclude-train-of", str(fit), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["f4.jpg", "f6.jpg", "f7.jpg"]
    assert all(p.is_file() and p.resolve() == (images / p.name).resolve() for p in out.iterdir())
    (out / "mine.txt").write_text("not a link")
    assert _script().main(["--test-of", str(canonical), "--out", str(out)]) == 2
    assert "not a link this script wrote" in capsys.readouterr().err
    assert _script().main(["--test-of", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "not a simulated data set" in capsys.readouterr().err

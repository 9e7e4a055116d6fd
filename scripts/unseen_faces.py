#!/usr/bin/env python3
"""A folder of scene images that no model of a run trained on: for ``nsdd-train fit --heldout-images``.

The shipped priors and GPU students trained on the training split of the canonical face set
(``runs/r64/radial64``: UTKFace, seed 0, 8,602 train / 200 test). A fit that simulates from the same face folder
splits it its own way, so its test faces are mostly faces the prior saw. This takes the test split of ``--test-of``
(faces the prior never saw), drops every face in the training split of each ``--exclude-train-of`` data set (what a
fit's teacher and student saw), and links the rest into ``--out``::

    python scripts/unseen_faces.py --test-of runs/r64/radial64 \
        --exclude-train-of runs/fit/radial_full_cg/data runs/fit/diffusercam_cg/data --out runs/fit/clean_test_faces
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def split_sources(dataset: Path, split: str) -> tuple[Path, set[str]]:
    """The image folder of a simulated data set and the source file names of one of its splits."""
    meta = json.loads((dataset / "dataset.json").read_text())
    folder = Path(meta["settings"]["images"])
    return folder, {meta["sources"][i] for i in meta["splits"].get(split, [])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--test-of", required=True, type=Path, help="data set whose test split the models never saw")
    p.add_argument("--exclude-train-of", nargs="*", type=Path, default=[],
                   help="data sets whose training faces are dropped")
    p.add_argument("--out", required=True, type=Path, help="folder of links to write")
    args = p.parse_args(argv)
    try:
        folder, faces = split_sources(args.test_of, "test")
        for other in args.exclude_train_of:
            faces -= split_sources(other, "train")[1]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        print(f"unseen_faces: error: not a simulated data set ({exc})", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.iterdir():  # an earlier run's links that are no longer held out must not stay
        if old.is_symlink() and old.name not in faces:
            old.unlink()
        elif not old.is_symlink():
            print(f"unseen_faces: error: {old} is not a link this script wrote; use an empty --out", file=sys.stderr)
            return 2
    for name in sorted(faces):
        link = args.out / name
        if link.is_symlink():
            link.unlink()  # (re)point it: the image folder may have moved
        link.symlink_to((folder / name).resolve())
    print(f"{len(faces)} faces in {args.out} (the test split of {args.test_of} less "
          f"{len(args.exclude_train_of)} data sets' training faces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

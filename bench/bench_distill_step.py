#!/usr/bin/env python3
"""Where a distillation step's time goes, for a student on its data set (issue 12: cg cameras train slowly).

One training step of ``nsdd-train distill`` is: ``A†y`` (no gradient; ``--preload`` computes it once per sample),
the network ``g`` on the support window (forward + backward), ``(I − A†A) g`` inside ``x̂`` and ``(I − A†A)(x̂ − T)``
in the loss (forward + backward each; for a cg pseudo-inverse 20 A/Aᵀ pairs), and LPIPS on the whole grid or on
the support window (``--loss-window``). Each part is timed alone on a batch of real measurements of the data set:
one warm-up call, then the median of ``--repeats``, on ``--threads`` torch threads.

    python bench/bench_distill_step.py --data runs/fit/radial_full_cg/data --student runs/fit/radial_full_cg/student \
        --lpips-weights ../shared/weights/lpips/lpips_alex_full_v0.1.pth --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsdd_edge.timing import time_calls


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` (:func:`nsdd_edge.timing.time_calls`: one warm-up call)."""
    return time_calls(fn, repeats).median_ms / 1e3


def main(argv: list[str] | None = None) -> int:
    from train.data import LenslessDataset
    from train.physics import center_crop
    from train.students import load_student, student_inputs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="simulated data set (its training measurements)")
    p.add_argument("--student", required=True, type=Path, help="student directory (network, λ, projector, window)")
    p.add_argument("--lpips-weights", default=None, help="LPIPS-Alex weights (times the LPIPS term when given)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    solver = load_student(args.student)
    config, student = solver.config, solver.student
    dataset = LenslessDataset(args.data)
    physics = dataset.physics(model=config["geometry"]["model"], lam=float(config["lam"]),
                              projector=config.get("projector"))
    ids = dataset.ids("train")[: args.batch]
    y = dataset.measurements(ids)
    window = tuple(config.get("support_shape") or physics.scene_shape)
    student.net.train()
    inputs, _ = student_inputs(y, physics)
    net_input = center_crop(inputs, window).detach()
    g = torch.randn((args.batch, y.shape[1], *physics.scene_shape), requires_grad=True)

    def backward(fn):
        return lambda: fn().abs().mean().backward()

    rows = []
    with torch.no_grad():
        rows.append(("A†y (no gradient; once per sample with --preload)", median_seconds(lambda: physics.A_dagger(y),
                                                                                          args.repeats)))
    rows.append((f"network g on the {window[0]}x{window[1]} window, forward + backward",
                 median_seconds(backward(lambda: student.net(net_input)), args.repeats)))
    rows.append(("(I − A†A) g, forward + backward (in x̂; once more in the loss)",
                 median_seconds(backward(lambda: physics.null_project(g)), args.repeats)))
    if args.lpips_weights:
        from train.lpips import get_lpips

        lpips = get_lpips(args.lpips_weights, "cpu")
        for p_ in lpips.parameters():
            p_.requires_grad_(False)
        grid = torch.rand_like(g, requires_grad=True)
        target = torch.rand_like(g)
        rows.append((f"LPIPS on the {physics.scene_shape[0]}² grid, forward + backward",
                     median_seconds(backward(lambda: lpips(grid, target)), args.repeats)))
        small = torch.rand((args.batch, g.shape[1], *window), requires_grad=True)
        rows.append((f"LPIPS on the {window[0]}² window, forward + backward",
                     median_seconds(backward(lambda: lpips(small, center_crop(target, window))), args.repeats)))

    print(f"distillation step parts: {args.student} on {args.data}, batch {args.batch}, projector "
          f"{physics.projector}, scene grid {physics.scene_shape}, {args.threads} torch thread(s), median of "
          f"{args.repeats} after a warm-up")
    print("| part | s |\n|---|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

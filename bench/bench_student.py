"""Edge-student cost: parameters, GFLOPs (2 × conv MACs) and CPU milliseconds per image.

For each student configuration and image size: the network ``g`` alone and the whole student
``x̂ = A†y + (I − A†A) g(y, A†y)`` (adds the FFT pseudo-inverse and projector), batch 1, float32, on
``--threads`` CPU threads (default 2). Best and median over ``--rounds`` interleaved sweeps of
``--repeats`` timed runs (the best is the robust figure on a shared CPU).

    python bench/bench_student.py [--sizes 64 128 256] [--threads 2] [--repeats 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from torch import nn

from nsdd_edge.timing import time_calls
from train.physics import LenslessOperator
from train.students import Student, build_student, count_parameters, default_architecture, make_config

CONFIGS = {
    "edge (default)": {},
    "edge small": {"width": 16, "depth": 3, "max_width": 128, "blocks": 2},
    "edge tiny": {"width": 8, "depth": 3, "max_width": 64, "blocks": 1},
}


def conv_macs(net: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every Conv2d / ConvTranspose2d for one forward pass of ``x``."""
    total = 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output.numel() * k
        elif isinstance(module, nn.ConvTranspose2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            total += inputs[0].numel() * k

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return total


def gaussian_psf(size: int, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - size / 2
    psf = np.exp(-(yy**2 + xx**2) / (2 * sigma**2))
    return (psf / psf.sum()).astype(np.float32)[None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per case and round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="sweeps over all cases (interleaved, so a busy moment of a shared CPU hits no case alone)")
    ap.add_argument("--channels", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = args.channels
    cases = []
    for name, overrides in CONFIGS.items():
        arch = {**default_architecture("edge", "nullspace"), **overrides}
        for size in args.sizes:
            phys = LenslessOperator(gaussian_psf(size, size / 16), (size, size), "circular", lam=1e-4)
            student: Student = build_student(make_config("edge", "nullspace", c, phys, arch)).eval()
            y = phys.A(torch.rand(1, c, size, size))
            x_in = torch.randn(1, 2 * c, size, size)
            cases.append({"name": name, "arch": arch, "size": size, "student": student, "phys": phys, "y": y,
                          "x": x_in, "gflops": 2 * conv_macs(student.net, x_in) / 1e9, "g": [], "s": []})
    with torch.no_grad():
        for _ in range(args.rounds):
            for case in cases:
                st, x, y, phys = case["student"], case["x"], case["y"], case["phys"]
                case["g"] += time_calls(lambda st=st, x=x: st.net(x), args.repeats).wall_ms
                case["s"] += time_calls(lambda st=st, y=y, phys=phys: st(y, phys), args.repeats).wall_ms
    n = args.rounds * args.repeats
    print(f"student cost, batch 1, float32, {c} channels, torch {torch.__version__}, {args.threads} CPU threads, "
          f"best / median of {n} runs ({args.rounds} interleaved rounds)\n")
    print("| config | arch (width/depth/max/blocks) | params (M) | size | GFLOPs g | g ms best / median "
          "| student ms best / median |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for case in cases:
        a = case["arch"]
        desc = f"{a['width']}/{a['depth']}/{a['max_width']}/{a['blocks']}"
        g, st = case["g"], case["s"]
        print(f"| {case['name']} | {desc} | {count_parameters(case['student'].net) / 1e6:.2f} | {case['size']} | "
              f"{case['gflops']:.2f} | {min(g):.1f} / {statistics.median(g):.1f} | "
              f"{min(st):.1f} / {statistics.median(st):.1f} |")


if __name__ == "__main__":
    main()

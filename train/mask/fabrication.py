"""Fabrication constraints of a binary amplitude mask, on the fabrication grid (one value per cell).

- Minimum feature ``m`` cells (both lines and gaps, "width" and "space" rules): every open cell and every
  opaque cell lies in an ``m × m`` square of cells of its own value. Equivalently the mask ``M`` and its
  complement are unchanged by the morphological opening with the ``m × m`` square
  (``γ(M) = M`` and ``γ(1 − M) = 1 − M``); outside the grid the mask is opaque (the camera's housing).
  :func:`feature_violations` counts the cells that break it, exactly.
- Fabrication filter + projection (topology optimisation, Wang, Lazarov & Sigmund 2011): a density
  ``ρ ∈ [0, 1]`` is smoothed by the cone filter ``ρ̃ = (w * ρ) / (w * 1)``, ``w(r) = max(0, R − r)``, and
  projected ``p = (tanh(βη) + tanh(β(ρ̃ − η))) / (tanh(βη) + tanh(β(1 − η)))`` (β → ∞: a threshold at η).
  :func:`enforce_min_feature` makes a thresholded mask satisfy the rule exactly (the closest of the
  opening-closing ``φ(γ(M))`` and two repairs that provably end in a mask obeying it).
- Fill factor: the open fraction of the design aperture (:func:`fill_factor`).
- LCD: cells of ``pitch`` fabrication pixels whose outer ``dead`` rows/columns are always opaque
  (:func:`lcd_pattern`, :func:`lcd_violations`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _as_tensor(mask) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    return t.to(torch.float32)


def opening(mask, m: int, outside: float = 0.0) -> torch.Tensor:
    """Morphological opening of a 0/1 mask ``(H, W)`` with the ``m × m`` square: the cells covered by an
    ``m × m`` window entirely of ones (windows may reach outside the grid, where the value is ``outside``)."""
    x = _as_tensor(mask)
    if m <= 1:
        return x.clone()
    padded = F.pad(x[None, None], (m - 1,) * 4, value=float(outside))
    full = -F.max_pool2d(-padded, m, stride=1)  # window minimum: 1 where the window is all ones
    return F.max_pool2d(full, m, stride=1)[0, 0]


def closing(mask, m: int) -> torch.Tensor:
    """``φ(M) = 1 − γ(1 − M)`` (outside the grid is opaque, i.e. void)."""
    return 1.0 - opening(1.0 - _as_tensor(mask), m, outside=1.0)


def feature_violations(mask, m: int) -> dict[str, int]:
    """Exact check of the minimum feature rule: ``open`` = open cells in no all-open ``m × m`` square,
    ``opaque`` = opaque cells in no all-opaque square (the surround counts as opaque); ``non_binary`` =
    cells that are neither 0 nor 1."""
    x = _as_tensor(mask)
    binary = (x == 0) | (x == 1)
    hard = (x > 0.5).float()
    thin_open = int(((hard == 1) & (opening(hard, m) == 0)).sum())
    thin_opaque = int(((hard == 0) & (closing(hard, m) == 1)).sum())
    return {"open": thin_open, "opaque": thin_opaque, "non_binary": int((~binary).sum())}


def satisfies_min_feature(mask, m: int) -> bool:
    return not any(feature_violations(mask, m).values())


def _shrink_phase(x: torch.Tensor, m: int, outside: float) -> torch.Tensor:
    """Remove cells of the phase ``x`` (0/1; ``outside`` is its value beyond the grid) until ``x`` and its
    complement both obey the rule: open ``x``, then for every thin cell of the complement clear the
    ``m × m`` window through it that holds the fewest ``x`` cells; repeat. ``x`` only shrinks and every
    round removes at least one cell (a thin cell's windows all hold some ``x``), so this ends, at the
    latest with ``x`` empty, which obeys the rule."""
    h, w = x.shape
    if min(h, w) < m:
        raise ValueError(f"a grid of {h}x{w} cells cannot hold a minimum feature of {m} cells")
    x = x.clone()
    while True:
        x = opening(x, m, outside)
        y = 1.0 - x
        thin = (y == 1) & (opening(y, m, 1.0 - outside) == 0)
        if not bool(thin.any()):
            return x
        # counts[a + m − 1, b + m − 1] = cells of x in the window whose top-left corner is (a, b)
        counts = F.avg_pool2d(F.pad(x, (m - 1,) * 4)[None, None], m, stride=1, divisor_override=1)[0, 0]
        for r, c in thin.nonzero().tolist():
            best = None
            for a in range(r - m + 1, r + 1):
                for b in range(c - m + 1, c + 1):
                    inside = 0 <= a <= h - m and 0 <= b <= w - m
                    if not inside and outside == 1.0:  # the complement's windows cannot leave the grid
                        continue
                    n = float(counts[a + m - 1, b + m - 1])
                    if best is None or n < best[0]:
                        best = (n, a, b)
            _, a, b = best
            x[max(a, 0) : a + m, max(b, 0) : b + m] = 0.0


def enforce_min_feature(mask, m: int) -> tuple[torch.Tensor, str]:
    """A 0/1 mask that obeys the minimum feature rule exactly and is close to ``mask > 0.5``, and how it was
    made: the candidate changing the fewest cells among the opening-closing ``φ(γ(M))`` (when it obeys the
    rule), shrinking the open phase and shrinking the opaque phase (:func:`_shrink_phase`; both always obey it)."""
    hard = (_as_tensor(mask) > 0.5).float()
    if m <= 1:
        return hard, "none needed (m = 1)"
    candidates = []
    filtered = closing(opening(hard, m), m)
    if satisfies_min_feature(filtered, m):
        candidates.append(("opening-closing", filtered))
    candidates.append(("shrink open", _shrink_phase(hard, m, 0.0)))
    candidates.append(("shrink opaque", 1.0 - _shrink_phase(1.0 - hard, m, 1.0)))
    how, best = min(candidates, key=lambda c: float((c[1] != hard).sum()))
    return best, how


def cone_kernel(radius: float) -> torch.Tensor:
    """``w(r) = max(0, R − r)`` on a ``(2⌈R⌉ − 1)²`` grid (not normalised)."""
    n = max(math.ceil(radius) - 1, 0)
    r = torch.arange(-n, n + 1, dtype=torch.float32)
    dist = torch.sqrt(r[:, None] ** 2 + r[None, :] ** 2)
    return (radius - dist).clamp_min(0.0)


def cone_filter(density: torch.Tensor, radius: float, support: torch.Tensor | None = None) -> torch.Tensor:
    """Fabrication filter ``ρ̃ = (w * (s ρ)) / (w * s)`` over the design support ``s`` (default: the grid)."""
    if radius <= 1.0:
        return density
    k = cone_kernel(radius).to(density)
    pad = k.shape[-1] // 2
    s = torch.ones_like(density) if support is None else support.to(density)
    num = F.conv2d((s * density)[None, None], k[None, None], padding=pad)[0, 0]
    den = F.conv2d(s[None, None], k[None, None], padding=pad)[0, 0]
    return s * num / den.clamp_min(1e-12)


def project(density: torch.Tensor, beta: float, eta: float = 0.5) -> torch.Tensor:
    """Smoothed Heaviside projection ``p = (tanh(βη) + tanh(β(ρ̃ − η))) / (tanh(βη) + tanh(β(1 − η)))``."""
    a, b = math.tanh(beta * eta), math.tanh(beta * (1.0 - eta))
    return (a + torch.tanh(beta * (density - eta))) / (a + b)


def fill_factor(mask, support=None) -> float:
    """Open fraction of the design aperture ``support`` (default: the whole grid)."""
    x = (_as_tensor(mask) > 0.5).float()
    if support is None:
        return float(x.mean())
    s = _as_tensor(support) > 0.5
    return float(x[s].mean())


def lcd_pattern(states, pitch: int, dead: int) -> torch.Tensor:
    """LCD mask: each cell state (0/1 or in between) fills a ``pitch × pitch`` block whose outer ``dead``
    rows and columns (the pixel's wiring and black matrix) are opaque."""
    if not 0 <= dead < pitch:
        raise ValueError(f"LCD: dead space {dead} must be in [0, pitch {pitch})")
    s = states if isinstance(states, torch.Tensor) else _as_tensor(states)
    aperture = torch.zeros(pitch, pitch, dtype=s.dtype, device=s.device)
    lo, hi = dead // 2, pitch - (dead - dead // 2)
    aperture[lo:hi, lo:hi] = 1.0
    return torch.kron(s, aperture)


def lcd_violations(mask, pitch: int, dead: int) -> dict[str, int]:
    """Exact check of an LCD mask: ``dead`` = open cells in the dead space, ``mixed`` = LCD pixels whose
    active area is not uniform, ``non_binary`` = values neither 0 nor 1."""
    x = _as_tensor(mask)
    h, w = x.shape
    if h % pitch or w % pitch:
        return {"dead": -1, "mixed": -1, "non_binary": -1}
    ones = torch.ones(h // pitch, w // pitch)
    active = lcd_pattern(ones, pitch, dead) > 0
    blocks = x.reshape(h // pitch, pitch, w // pitch, pitch).permute(0, 2, 1, 3)
    act = active.reshape(h // pitch, pitch, w // pitch, pitch).permute(0, 2, 1, 3)
    mixed = 0
    for i in range(blocks.shape[0]):
        for j in range(blocks.shape[1]):
            vals = blocks[i, j][act[i, j]]
            mixed += int(vals.numel() > 0 and bool((vals != vals[0]).any()))
    return {"dead": int((x[~active] != 0).sum()), "mixed": mixed,
            "non_binary": int((~((x == 0) | (x == 1))).sum())}

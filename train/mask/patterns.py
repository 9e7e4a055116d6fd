"""Classical coded-aperture masks, as 0/1 arrays on the fabrication grid (numpy).

- MURA (Gottesman & Fenimore 1989), prime ``p ≡ 1 (mod 4)``: ``A[0, j] = 0``, ``A[i, 0] = 1`` (``i ≠ 0``),
  otherwise ``A[i, j] = 1`` iff ``C_i C_j = 1``, with ``C_i = +1`` for a quadratic residue ``i`` mod ``p``
  and ``−1`` otherwise. Its periodic correlation with ``G = 2A − 1`` (``G[0, 0] = +1``) is a delta.
- MLS (FlatCam, Asif et al. 2017): a maximum-length sequence ``s ∈ {±1}^L``, ``L = 2ⁿ − 1``, from a
  Fibonacci LFSR with a primitive feedback polynomial; the separable mask ``(1 + s sᵀ) / 2``. Its
  periodic autocorrelation is ``L`` at 0 and ``−1`` elsewhere.
- Random binary: :func:`nsdd_edge.psf_sim.random_binary_mask`.

:func:`place` scales a pattern by whole cells and centres it on the mask grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: taps (1-based exponents besides the leading one) of primitive polynomials x^n + x^k + 1 over GF(2)
PRIMITIVE_TAPS = {3: 2, 4: 3, 5: 3, 6: 5, 7: 6, 9: 5, 10: 7, 11: 9}


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, int(n ** 0.5) + 1))


def mura(p: int) -> np.ndarray:
    """The ``p × p`` MURA (0/1, float64) for a prime ``p ≡ 1 (mod 4)``."""
    if not (is_prime(p) and p % 4 == 1):
        raise ValueError(f"MURA needs a prime p ≡ 1 (mod 4), got {p}")
    residues = {(k * k) % p for k in range(1, p)}
    c = np.array([1 if i in residues else -1 for i in range(p)])
    a = (np.outer(c, c) == 1).astype(np.float64)
    a[0, :] = 0.0
    a[1:, 0] = 1.0
    return a


def mura_decoder(a: np.ndarray) -> np.ndarray:
    """``G = 2A − 1`` with ``G[0, 0] = +1``: the balanced decoding array of a MURA."""
    g = 2.0 * a - 1.0
    g[0, 0] = 1.0
    return g


def mls(n: int) -> np.ndarray:
    """A maximum-length sequence in {±1} of length ``2ⁿ − 1`` (LFSR x^n + x^k + 1, all-ones seed)."""
    if n not in PRIMITIVE_TAPS:
        raise ValueError(f"no primitive polynomial stored for n = {n}; use one of {sorted(PRIMITIVE_TAPS)}")
    k = PRIMITIVE_TAPS[n]
    state = [1] * n
    out = []
    for _ in range(2 ** n - 1):
        out.append(state[-1])
        feedback = state[n - 1] ^ state[k - 1]
        state = [feedback] + state[:-1]
    return 1.0 - 2.0 * np.array(out, dtype=np.float64)  # bit 0 → +1, bit 1 → −1


def mls_mask(n: int) -> np.ndarray:
    """Separable MLS mask ``(1 + s sᵀ) / 2`` (0/1), ``(2ⁿ − 1)²``."""
    s = mls(n)
    return (1.0 + np.outer(s, s)) / 2.0


def place(pattern: np.ndarray, grid: Sequence[int], cell: int) -> np.ndarray:
    """Each pattern element becomes a ``cell × cell`` square; the result is centred on a zero ``grid``."""
    big = np.kron(pattern, np.ones((cell, cell)))
    h, w = int(grid[0]), int(grid[1])
    if big.shape[0] > h or big.shape[1] > w:
        raise ValueError(f"a {pattern.shape} pattern of {cell}-cell squares does not fit the {h}x{w} mask grid")
    out = np.zeros((h, w))
    r, c = (h - big.shape[0]) // 2, (w - big.shape[1]) // 2
    out[r : r + big.shape[0], c : c + big.shape[1]] = big
    return out


def largest_mura(side: int, min_cell: int) -> tuple[int, int]:
    """``(p, cell)``: the largest MURA order ``p`` whose ``p`` squares of at least ``min_cell`` cells fit in
    ``side`` cells, and the largest such square size."""
    for p in range(side // min_cell, 4, -1):
        if is_prime(p) and p % 4 == 1:
            return p, side // p
    raise ValueError(f"no MURA of cells ≥ {min_cell} fits in {side} cells")


def largest_mls(side: int, min_cell: int) -> tuple[int, int]:
    """``(n, cell)`` for the longest MLS (``2ⁿ − 1`` squares of at least ``min_cell`` cells) in ``side`` cells."""
    for n in sorted(PRIMITIVE_TAPS, reverse=True):
        if (2 ** n - 1) * min_cell <= side:
            return n, side // (2 ** n - 1)
    raise ValueError(f"no MLS of cells ≥ {min_cell} fits in {side} cells")

"""Fabrication rules (minimum feature, LCD), classical patterns and the printable files of a mask."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from train.mask.fabrication import (
    cone_filter,
    enforce_min_feature,
    feature_violations,
    lcd_pattern,
    lcd_violations,
    opening,
    project,
)
from train.mask.patterns import largest_mls, largest_mura, mls, mls_mask, mura, mura_decoder, place
from train.mask.printing import open_rectangles, png_bytes, svg_text


def brute_force_violations(mask: np.ndarray, m: int) -> dict[str, int]:
    """The rule by definition: a cell is fine when some m × m window through it (cells outside the grid
    count as opaque) holds only its value."""
    h, w = mask.shape
    padded = np.zeros((h + 2 * m, w + 2 * m))
    padded[m : m + h, m : m + w] = mask
    bad = {"open": 0, "opaque": 0}
    for r in range(h):
        for c in range(w):
            v = mask[r, c]
            ok = any((padded[m + a : m + a + m, m + b : m + b + m] == v).all()
                     for a in range(r - m + 1, r + 1) for b in range(c - m + 1, c + 1)
                     if v == 0 or (0 <= a <= h - m and 0 <= b <= w - m))
            if not ok:
                bad["open" if v == 1 else "opaque"] += 1
    return bad


@pytest.mark.parametrize("m", [2, 3])
def test_feature_check_matches_the_definition(m):
    rng = np.random.default_rng(m)
    for _ in range(5):
        mask = (rng.random((14, 12)) < 0.5).astype(np.float64)
        got = feature_violations(mask, m)
        assert {k: got[k] for k in ("open", "opaque")} == brute_force_violations(mask, m)
        assert got["non_binary"] == 0
    assert feature_violations(np.full((6, 6), 0.5), 2)["non_binary"] == 36


def test_opening_keeps_squares_and_drops_thin_lines():
    x = torch.zeros(10, 10)
    x[1:4, 1:4] = 1  # a 3x3 square
    x[7, :] = 1  # a one-cell line
    assert torch.equal(opening(x, 3)[1:4, 1:4], torch.ones(3, 3)) and float(opening(x, 3)[7].sum()) == 0
    assert feature_violations(x, 3) == {"open": 10, "opaque": 0, "non_binary": 0}


@pytest.mark.parametrize("m", [2, 3, 4])
def test_enforce_min_feature_always_obeys_the_rule(m):
    """Random and filtered masks (the student's situation): the output obeys the rule exactly, is 0/1,
    and changes few cells of an already smooth design."""
    rng = np.random.default_rng(10 + m)
    changed = []
    for trial in range(30):
        if trial % 2:
            x = (rng.random((40, 40)) < rng.uniform(0.2, 0.8)).astype(np.float32)
        else:
            x = (cone_filter(torch.tensor(rng.random((40, 40)), dtype=torch.float32), 1.5 * m) > 0.5).numpy()
        out, how = enforce_min_feature(x, m)
        assert feature_violations(out, m) == {"open": 0, "opaque": 0, "non_binary": 0}, how
        assert set(np.unique(out.numpy())) <= {0.0, 1.0}
        if not trial % 2:
            changed.append(float((out.numpy() != x).mean()))
    assert np.mean(changed) < 0.1


def test_filter_and_projection():
    rho = torch.zeros(21, 21)
    rho[10, 10] = 1.0
    smooth = cone_filter(rho, 3.0)
    assert float(smooth.sum()) == pytest.approx(1.0, rel=0.3) and float(smooth.max()) < 1.0
    assert smooth[10, 12] > 0 and smooth[10, 13] == 0  # the cone reaches R − 1 cells
    p = project(torch.tensor([0.0, 0.4, 0.5, 0.6, 1.0]), beta=64.0)
    assert p[0] == pytest.approx(0.0, abs=1e-6) and p[-1] == pytest.approx(1.0, abs=1e-6)
    assert p[1] < 0.01 and p[3] > 0.99 and p[2] == pytest.approx(0.5, abs=1e-6)


def test_lcd_pattern_and_check():
    states = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = lcd_pattern(states, 4, 1)
    assert mask.shape == (8, 8) and float(mask.sum()) == 2 * 9
    assert lcd_violations(mask, 4, 1) == {"dead": 0, "mixed": 0, "non_binary": 0}
    broken = mask.clone()
    assert float(mask[3].sum()) == 0 and float(mask[:, 3].sum()) == 0  # 1 dead cell: last row and column
    broken[3, 3] = 1.0  # a dead-space cell open
    broken[1, 5] = 1.0  # part of a closed LCD pixel open
    assert lcd_violations(broken, 4, 1) == {"dead": 1, "mixed": 1, "non_binary": 0}


def test_mura_and_mls_correlations():
    for p in (5, 13, 17):
        a = mura(p)
        corr = np.real(np.fft.ifft2(np.fft.fft2(a) * np.conj(np.fft.fft2(mura_decoder(a)))))
        off = corr.copy()
        off[0, 0] = 0
        assert corr[0, 0] == pytest.approx((p * p - 1) / 2) and np.abs(off).max() < 1e-9
    with pytest.raises(ValueError, match="p ≡ 1"):
        mura(7)
    for n in (4, 5, 6):
        s = mls(n)
        ac = np.real(np.fft.ifft(np.abs(np.fft.fft(s)) ** 2))
        assert len(s) == 2 ** n - 1 and ac[0] == pytest.approx(len(s)) and np.allclose(ac[1:], -1)
    assert set(np.unique(mls_mask(4))) == {0.0, 1.0}
    assert largest_mura(48, 2) == (17, 2) and largest_mls(48, 2) == (4, 3)
    placed = place(mura(5), (12, 12), 2)
    assert placed.shape == (12, 12) and placed.sum() == 4 * mura(5).sum()
    assert feature_violations(placed, 2) == {"open": 0, "opaque": 0, "non_binary": 0}


def test_printable_png_and_svg_reproduce_the_mask():
    from PIL import Image

    rng = np.random.default_rng(4)
    mask = (rng.random((20, 30)) < 0.4).astype(np.float64)
    mask[5:15, 10:12] = 1  # a tall run that merges into one rectangle
    img = Image.open(io.BytesIO(png_bytes(mask, 10.0)))
    assert img.mode == "L" and img.size == (30, 20)
    np.testing.assert_array_equal(np.asarray(img) == 255, mask == 1)
    assert img.info["dpi"][0] == pytest.approx(2540.0, rel=1e-3)  # 10 µm per pixel
    root = ET.fromstring(svg_text(mask, 10.0))
    assert root.get("width") == "0.3mm" and root.get("height") == "0.2mm"
    drawn = np.zeros_like(mask)
    ns = "{http://www.w3.org/2000/svg}"
    for g in root.iter(f"{ns}g"):
        for rect in g.iter(f"{ns}rect"):
            x, y, w, h = (int(rect.get(k)) for k in ("x", "y", "width", "height"))
            drawn[y : y + h, x : x + w] += 1
    np.testing.assert_array_equal(drawn, mask)  # every opening exactly once, nothing else
    assert len(open_rectangles(mask)) < int(mask.sum())
    with pytest.raises(ValueError, match="0/1"):
        png_bytes(np.full((4, 4), 0.5), 10.0)

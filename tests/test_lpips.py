"""LPIPS-Alex v0.1 in plain torch reproduces the official distances on the reference images."""

from __future__ import annotations

import json

import pytest
import torch

from nsdd_edge.optics import read_image01
from train.lpips import LPIPS, LPIPS_KEYS, WEIGHTS_ENV, LPIPSWeightsError, resolve_weights


@pytest.fixture(scope="module")
def lpips_dir(shared):
    return shared / "weights/lpips"


@pytest.fixture(scope="module")
def model(lpips_dir):
    return LPIPS(lpips_dir / "lpips_alex_full_v0.1.pth")


def _img(path) -> torch.Tensor:
    return torch.from_numpy(read_image01(path))[None]


def test_reference_distances(model, lpips_dir):
    ref = json.loads((lpips_dir / "reference_values.json").read_text())
    assert len(ref["pairs"]) == 2
    for pair, vals in ref["pairs"].items():
        a, b = (p.strip() for p in pair.split(" vs "))
        d = float(model(_img(lpips_dir / a), _img(lpips_dir / b)))
        assert round(d, 3) == pytest.approx(vals["published"], abs=1e-9), pair
        assert d == pytest.approx(vals["value"], abs=1e-4), pair


def test_batched_symmetric_and_range_convention(model, lpips_dir):
    r = _img(lpips_dir / "ref_images/ex_ref.png")
    p0 = _img(lpips_dir / "ref_images/ex_p0.png")
    p1 = _img(lpips_dir / "ref_images/ex_p1.png")
    batch = model(torch.cat([r, r, r]), torch.cat([p0, p1, r]))
    assert batch.shape == (3,)
    assert float(batch[2]) == pytest.approx(0.0, abs=1e-7)
    assert batch[0] > batch[1] > 0
    assert torch.allclose(model(torch.cat([p0, p1]), torch.cat([r, r])), batch[:2], atol=1e-5)
    # [0, 1] inputs and their [-1, 1] versions give the same distance
    same = model(2 * r - 1, 2 * p1 - 1, inputs_in_minus1_1=True)
    assert float(same) == pytest.approx(float(batch[1]), abs=1e-6)
    # feeding [0, 1] images as if they were [-1, 1] is a different (wrong) number: the convention matters
    assert abs(float(model(r, p1, inputs_in_minus1_1=True)) - float(batch[1])) > 1e-3


def test_weights_from_env_and_errors(lpips_dir, monkeypatch, tmp_path):
    path = lpips_dir / "lpips_alex_full_v0.1.pth"
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    state, source = resolve_weights(None)
    assert WEIGHTS_ENV in source and set(state) == set(LPIPS_KEYS)
    with pytest.raises(LPIPSWeightsError, match="not found"):
        LPIPS(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(LPIPSWeightsError, match="not an LPIPS-Alex"):
        LPIPS(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(LPIPSWeightsError, match="cannot load"):
        LPIPS(junk)


def test_no_weights_anywhere_names_the_options(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    import train.lpips as mod

    monkeypatch.setattr(mod, "_lpips_package_heads", lambda: None)
    with pytest.raises(LPIPSWeightsError) as exc:
        resolve_weights(None)
    msg = str(exc.value)
    assert WEIGHTS_ENV in msg and "--lpips-weights" in msg and "lpips" in msg


def test_small_and_bad_inputs(model):
    with pytest.raises(ValueError, match="too small"):
        model(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.rand(1, 2, 64, 64), torch.rand(1, 2, 64, 64))
    g = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model(g, g.flip(-1)), model(g.expand(-1, 3, -1, -1), g.flip(-1).expand(-1, 3, -1, -1)))


def test_download_path_maps_torchvision_alexnet_and_package_heads(lpips_dir, monkeypatch, tmp_path):
    """Without a weights file: torchvision-layout AlexNet (from torch.hub) + the lpips package's heads.

    No network here: torch.hub is replaced by a function returning the backbone in torchvision's key layout
    (``features.N.*``) and a fake ``lpips`` package directory holds ``weights/v0.1/alex.pth``.
    """
    import train.lpips as mod

    full = torch.load(lpips_dir / "lpips_alex_full_v0.1.pth", weights_only=True)
    alex = {k.replace(f"net.slice{s}.", "features."): v for k, v in full.items() if k.startswith("net.")
            for s in range(1, 6) if k.startswith(f"net.slice{s}.")}
    alex["classifier.1.weight"] = torch.zeros(2, 2)  # torchvision's file also holds the classifier
    heads_dir = tmp_path / "site" / "lpips" / "weights" / "v0.1"
    heads_dir.mkdir(parents=True)
    (tmp_path / "site" / "lpips" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    torch.save({k: v for k, v in full.items() if k.startswith("lin")}, heads_dir / "alex.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    urls = []

    def fake_hub(url, map_location=None, progress=True):
        urls.append(url)
        return alex

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub)
    state, source = resolve_weights(None)
    assert urls == [mod.ALEXNET_URL] and "lpips package" in source
    assert set(state) == set(LPIPS_KEYS)
    for k in LPIPS_KEYS:
        assert torch.equal(state[k], full[k]), k


def test_gradients_reach_the_inputs(model):
    """LPIPS as a training loss (distillation): frozen weights, gradients with respect to the image."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 40, 40, generator=g)
    x = (target + 0.2 * torch.randn(target.shape, generator=g)).clamp(0, 1).requires_grad_(True)
    d = model(x, target).mean()
    d.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():  # a small step against the gradient lowers the distance
        x2 = x - 1e-3 * x.grad / x.grad.abs().max()
    assert float(model(x2, target).mean()) < d.item()

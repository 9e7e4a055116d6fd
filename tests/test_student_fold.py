"""--init-student across channel counts: an RGB student folded into a gray one (train.student_fold)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_distill import SMALL as DISTILL_SMALL
from test_distill import make_problem, settings
from test_students import blur_psf, scenes

from nsdd_edge.optics import array_hash
from train.distill import DistillError, train_student
from train.physics import LenslessOperator
from train.prior.base import DiffusionPrior, linear_alphas_cumprod
from train.prior.unet import UNet
from train.student_fold import fold_student_state, foldable
from train.students import StudentError, build_student, make_config, student_inputs

SIZE = 16
SMALL = {"width": 4, "depth": 1, "max_width": 8, "blocks": 1}
TINY_UNET = {"image_size": SIZE, "base_channels": 4, "channel_mults": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [8], "num_heads": 2, "dropout": 0.0}


def unet_prior(channels: int, seed: int = 1) -> DiffusionPrior:
    """A real (tiny) diffusion UNet with every weight random, so the folded layers matter."""
    net = UNet(**TINY_UNET, in_channels=channels, out_channels=channels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return DiffusionPrior(net.eval(), linear_alphas_cumprod(), image_size=SIZE, channels=channels)


def physics(channels: int) -> LenslessOperator:
    return LenslessOperator(np.repeat(blur_psf(), channels, axis=0), (SIZE, SIZE), "circular", lam=1e-4)


def students(kind: str, objective: str = "nullspace"):
    """(RGB student with random weights, gray student of the same network holding them folded)."""
    torch.manual_seed(0)
    rgb_cfg = make_config(kind, objective, 3, physics(3), dict(SMALL))
    gray_cfg = make_config(kind, objective, 1, physics(1), dict(SMALL))
    rgb = build_student(rgb_cfg, prior=unet_prior(3) if kind == "paper" else None)
    gray = build_student(gray_cfg, prior=unet_prior(1) if kind == "paper" else None)
    with torch.no_grad():
        for p in rgb.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gray.net.load_state_dict(fold_student_state(rgb.net.state_dict(), rgb_cfg, 1))
    return rgb, gray


@pytest.mark.parametrize("objective", ["nullspace", "full"])
def test_a_folded_edge_student_gives_the_colour_mean_on_gray_inputs(objective):
    rgb, gray = students("edge", objective)
    y = physics(1).measure(scenes(2, channels=1, size=SIZE), noise_std=0.01, generator=torch.Generator().manual_seed(2))
    inputs, _ = student_inputs(y, physics(1))
    replicated = torch.cat([inputs[:, :1].repeat(1, 3, 1, 1), inputs[:, 1:].repeat(1, 3, 1, 1)], dim=1)
    with torch.no_grad():
        want = rgb.net(replicated).mean(dim=1, keepdim=True)
        got = gray.net(inputs)
    assert got.shape == (2, 1, SIZE, SIZE)
    assert torch.allclose(got, want, atol=1e-5)
    # and not by accident: the unfolded colours differ from one another
    with torch.no_grad():
        assert (rgb.net(replicated)[:, 0] - rgb.net(replicated)[:, 1]).abs().max() > 1e-3


def test_a_folded_paper_student_folds_its_diffusion_unet_too():
    """With the adapter's colour outputs made equal, x_t is gray-replicated and the fold is exact through the
    UNet (conv_in summed, conv_out averaged)."""
    rgb, gray = students("paper")
    with torch.no_grad():
        head = rgb.net.adapter.head
        head.weight.copy_(head.weight[:1].expand_as(head.weight))
        head.bias.fill_(float(head.bias[0]))
    gray.net.load_state_dict(fold_student_state(rgb.net.state_dict(), {"kind": "paper", "channels": 3,
                                                                        "architecture": SMALL}, 1))
    # A†y identical across colours: the skip adds it, so the adapter output is colour-equal
    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    inputs = torch.cat([x, x.flip(-1)], dim=1)
    replicated = torch.cat([inputs[:, :1].repeat(1, 3, 1, 1), inputs[:, 1:].repeat(1, 3, 1, 1)], dim=1)
    with torch.no_grad():
        want = rgb.net(replicated).mean(dim=1, keepdim=True)
        got = gray.net(inputs)
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(rgb.net(replicated)[:, 0], rgb.net(replicated)[:, 1], atol=1e-3)


def test_counts_that_do_not_fold_and_unshuffled_networks_are_refused():
    assert foldable(3, 1) and foldable(1, 3) and foldable(3, 3) and not foldable(3, 2) and not foldable(0, 1)
    rgb, _ = students("edge")
    state = rgb.net.state_dict()
    with pytest.raises(StudentError, match="3-channel student to 2 channels"):
        fold_student_state(state, {"kind": "edge", "channels": 3, "architecture": SMALL}, 2)
    with pytest.raises(StudentError, match="unshuffle 2"):
        fold_student_state(state, {"kind": "edge", "channels": 3, "architecture": {**SMALL, "unshuffle": 2}}, 1)
    with pytest.raises(StudentError, match="lack stem.0.weight"):
        fold_student_state({}, {"kind": "edge", "channels": 3, "architecture": SMALL}, 1)


def gray_problem(root):
    """test_distill's problem with one channel: gray measurements and targets, a 1-channel PSF."""
    data, targets = make_problem(root)
    psf = np.load(data / "psf.npy")  # (1, H, W): shared by every channel
    meta = json.loads((data / "dataset.json").read_text())
    phys = LenslessOperator(psf, (32, 32), "circular", lam=1e-4)
    for i in meta["splits"]["train"] + meta["splits"]["test"]:
        x = torch.from_numpy(np.load(targets / f"{i}.npy")).mean(dim=0, keepdim=True)
        np.save(targets / f"{i}.npy", x.numpy())
        np.save(data / "measurements" / f"{i}.npy", phys.A(x[None])[0].numpy())
    meta["channels"] = 1
    meta["psf"]["sha256"] = array_hash(psf)
    (data / "dataset.json").write_text(json.dumps(meta))
    return data, targets


def test_distill_starts_a_gray_camera_from_an_rgb_student(tmp_path):
    data_rgb, targets_rgb = make_problem(tmp_path / "rgb")
    train_student(settings(data_rgb, targets_rgb, tmp_path / "s_rgb", steps=3))
    data_gray, targets_gray = gray_problem(tmp_path / "gray")
    # a learning rate of ~0 and no EMA lag: the saved weights are the folded ones it started from
    train_student(settings(data_gray, targets_gray, tmp_path / "s_gray", steps=1, lr=1e-12, ema=0.0,
                           init_student=str(tmp_path / "s_rgb")))
    from safetensors.torch import load_file

    src = load_file(str(tmp_path / "s_rgb/model.safetensors"))
    got = load_file(str(tmp_path / "s_gray/model.safetensors"))
    rgb_cfg = json.loads((tmp_path / "s_rgb/config.json").read_text())
    want = fold_student_state({k: v.float() for k, v in src.items()}, rgb_cfg, 1)
    assert got["stem.0.weight"].shape[1] == 2 and got["head.weight"].shape[0] == 1
    assert all(torch.allclose(got[k].float(), want[k], atol=1e-6) for k in want)
    cfg = json.loads((tmp_path / "s_gray/config.json").read_text())
    assert cfg["channels"] == 1 and cfg["training"]["init_from"]["channels"] == 3

    with pytest.raises(DistillError, match=r"--init-student .*architecture"):  # channels fold, widths do not
        train_student(settings(data_gray, targets_gray, tmp_path / "s_bad", steps=1,
                               init_student=str(tmp_path / "s_rgb"), architecture={**DISTILL_SMALL, "width": 4}))

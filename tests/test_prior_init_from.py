"""``nsdd-train prior --init-from``: a prior started from another prior's weights, channels folded (RGB ↔ gray)."""

from __future__ import annotations

import json

import pytest
import torch
from test_prior import TINY, randomised, write_images

from train.cli import main as train_cli
from train.prior.init_from import (check_compatible, file_sha256, fold_state_dict, rescaled_attention,
                                   settings_with_source)
from train.prior.io import PriorError, load_prior, save_prior
from train.prior.unet import UNet, UNetConfig


def folded(source: UNet, **target_overrides) -> UNet:
    """A network of the source's architecture with ``target_overrides``, holding the source's folded weights."""
    target = UNet(UNetConfig.from_dict({**source.config, **target_overrides})).eval()
    target.load_state_dict(fold_state_dict(source.state_dict(), source.cfg, target.cfg))
    return target


def test_rgb_to_gray_gives_the_rgb_networks_mean_output_on_replicated_gray():
    rgb = randomised(UNet(**TINY), seed=3).eval()
    gray = folded(rgb, in_channels=1, out_channels=1)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expected = rgb(x.repeat(1, 3, 1, 1), t).mean(dim=1, keepdim=True)
        got = gray(x, t)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    # the check can fail: one input channel's weights instead of the sum gives another network
    state = fold_state_dict(rgb.state_dict(), rgb.cfg, gray.cfg)
    state["conv_in.weight"] = rgb.state_dict()["conv_in.weight"][:, :1].clone()
    wrong = UNet(gray.cfg).eval()
    wrong.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(wrong(x, t), expected, atol=1e-3)


def test_learned_variance_channels_fold_per_output_group():
    rgb = randomised(UNet(**{**TINY, "out_channels": 6}), seed=4).eval()  # ε (3) then the variance (3)
    gray = folded(rgb, in_channels=1, out_channels=2)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        out = rgb(x.repeat(1, 3, 1, 1), torch.tensor([300]))
        got = gray(x, torch.tensor([300]))
    expected = torch.cat([out[:, :3].mean(1, keepdim=True), out[:, 3:].mean(1, keepdim=True)], dim=1)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_gray_to_rgb_repeats_the_gray_network_on_rgb_gray_input():
    gray = randomised(UNet(**{**TINY, "in_channels": 1, "out_channels": 1}), seed=5).eval()
    rgb = folded(gray, in_channels=3, out_channels=3)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        got = rgb(x.repeat(1, 3, 1, 1), torch.tensor([50]))
        expected = gray(x, torch.tensor([50])).repeat(1, 3, 1, 1)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_mismatched_architectures_are_refused_by_name():
    source = UNetConfig(**TINY)
    for change in ({"base_channels": 8}, {"channel_mults": [1, 1]}, {"num_res_blocks": 2},
                   {"attention_resolutions": []}, {"in_channels": 2, "out_channels": 2}):
        with pytest.raises(PriorError, match="does not match the source prior"):
            check_compatible(source, UNetConfig(**{**TINY, **change}), "src")
    check_compatible(source, UNetConfig(**{**TINY, "in_channels": 1, "out_channels": 1, "dropout": 0.2}), "src")
    # another size is compatible only with the attention at the same levels (8 px of 16 → 16 px of 32)
    check_compatible(source, UNetConfig(**{**TINY, "image_size": 32, "attention_resolutions": [16]}), "src")
    with pytest.raises(PriorError, match="the attention must stay at the same levels"):
        check_compatible(source, UNetConfig(**{**TINY, "image_size": 32, "attention_resolutions": [32]}), "src")
    assert rescaled_attention([16], 64, 128, "src") == [32]
    with pytest.raises(PriorError, match="between levels"):
        rescaled_attention([16], 64, 66, "src")


def test_a_size_change_refused_because_of_padding_says_so():
    source = {"size": 16, "pad_to": 32, "attention_resolutions": [8], "base_channels": 4}
    with pytest.raises(PriorError, match="neither the source prior nor this run pads with --pad-to"):
        settings_with_source({"size": 24}, source, "src")
    with pytest.raises(PriorError, match="only the channel counts and --size may differ"):
        settings_with_source({"base_channels": 8}, source, "src")
    unpadded = {**source, "pad_to": None}
    assert settings_with_source({"size": 32}, unpadded, "src")["attention_resolutions"] == [16]


def test_a_prior_starts_a_prior_of_twice_its_size_with_the_attention_at_the_same_levels(tmp_path, rgb_prior_dir):
    write_images(tmp_path / "imgs", 4, size=(40, 40))
    out = tmp_path / "big"
    assert train_cli(["prior", "--images", str(tmp_path / "imgs"), "--out", str(out), "--size", "32", "--init-from",
                      str(rgb_prior_dir), "--steps", "1", "--batch", "2", "--warmup", "1", "--lr", "0",
                      "--checkpoint-every", "100", "--sample-count", "0", "--threads", "1", "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"]["image_size"] == 32 and config["architecture"]["attention_resolutions"] == [16]
    assert config["training"]["init_from"]["image_size"] == 16
    small, big = load_prior(rgb_prior_dir).net.eval(), load_prior(out).net.eval()
    assert all(torch.equal(big.state_dict()[k].float(), v.float()) for k, v in small.state_dict().items())
    # the same weights, convolutional: on a 32 px input both networks compute the same ε
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([400])
    with torch.no_grad():
        assert torch.allclose(big(x, t), small(x, t), atol=1e-4)


@pytest.fixture()
def rgb_prior_dir(tmp_path):
    return save_prior(randomised(UNet(**TINY), seed=6), tmp_path / "rgb")


def _gray_run(images, source, out, *extra: str) -> int:
    return train_cli(["prior", "--images", str(images), "--out", str(out), "--channels", "1", "--init-from",
                      str(source), "--steps", "4", "--batch", "2", "--warmup", "1", "--lr", "1e-4",
                      "--checkpoint-every", "100", "--sample-count", "0", "--threads", "1", "--no-progress", *extra])


def test_train_command_starts_from_the_folded_source_records_it_and_resumes(tmp_path, rgb_prior_dir, capsys):
    write_images(tmp_path / "imgs", 5)
    # --lr 0: the weights stay the folded source's, so the start is visible in the checkpoint
    assert _gray_run(tmp_path / "imgs", rgb_prior_dir, tmp_path / "still", "--lr", "0", "--steps", "1") == 0
    start = torch.load(tmp_path / "still" / "checkpoint.pt", weights_only=True)
    source = load_prior(rgb_prior_dir).net.state_dict()
    assert torch.allclose(start["model"]["conv_in.weight"], source["conv_in.weight"].sum(1, keepdim=True))
    assert torch.allclose(start["model"]["conv_out.bias"], source["conv_out.bias"].mean().reshape(1))
    assert torch.equal(start["model"]["mid1.conv1.weight"], source["mid1.conv1.weight"])  # the rest copied
    # a 2 + 2 step run with a resume equals a straight 4 step run, and both record the source
    assert _gray_run(tmp_path / "imgs", rgb_prior_dir, tmp_path / "straight") == 0
    assert _gray_run(tmp_path / "imgs", rgb_prior_dir, tmp_path / "split", "--max-steps-this-run", "2") == 0
    assert _gray_run(tmp_path / "imgs", rgb_prior_dir, tmp_path / "split") == 0
    assert "resume: the weights come from" in capsys.readouterr().out
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not torch.equal(a["model"]["conv_in.weight"], start["model"]["conv_in.weight"])  # it trained
    record = {"path": str(rgb_prior_dir.resolve()), "sha256": file_sha256(rgb_prior_dir / "model.safetensors"),
              "channels": 3, "image_size": 16}
    for run in ("straight", "split"):
        config = json.loads((tmp_path / run / "config.json").read_text())
        assert config["training"]["init_from"] == record and config["channels"] == 1
    assert load_prior(tmp_path / "split").channels == 1


def test_train_command_refuses_a_mismatched_architecture(tmp_path, rgb_prior_dir, capsys):
    write_images(tmp_path / "imgs", 3)
    assert _gray_run(tmp_path / "imgs", rgb_prior_dir, tmp_path / "bad", "--base-channels", "8") == 2
    err = capsys.readouterr().err
    assert "does not match the source prior" in err and "--base-channels 8 (source: 4)" in err
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()
    assert _gray_run(tmp_path / "imgs", tmp_path / "imgs", tmp_path / "bad2") == 2
    assert "not a prior directory" in capsys.readouterr().err

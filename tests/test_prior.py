"""Diffusion prior: UNet, save/load (ours and diffusers), DDIM sampling, and `nsdd-train prior` training/resume."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from train.cli import main as train_cli
from train.prior.base import DiffusionPrior, linear_alphas_cumprod
from train.prior.io import PriorError, alphas_cumprod_from_schedule, default_schedule, load_prior, save_prior
from train.prior.sampling import ddim_sample, ddim_timesteps, image_grid
from train.prior.unet import UNet, UNetConfig

TINY = {"in_channels": 3, "out_channels": 3, "image_size": 16, "base_channels": 4, "channel_mults": [1, 2],
        "num_res_blocks": 1, "attention_resolutions": [8], "num_heads": 2, "dropout": 0.0}
TINY_FLAGS = ["--base-channels", "4", "--channel-mults", "1,2", "--num-res-blocks", "1",
              "--attention-resolutions", "8", "--num-heads", "2", "--threads", "1", "--no-progress"]


def randomised(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every parameter (also the zero-initialised output layers) random values so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def tiny_prior(seed: int = 1, **overrides) -> DiffusionPrior:
    net = randomised(UNet(**{**TINY, **overrides}), seed).eval()
    return DiffusionPrior(net, linear_alphas_cumprod(), image_size=net.cfg.image_size, channels=3,
                          config={"scheduler": default_schedule()})


def write_images(folder: Path, count: int, size=(20, 24), seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        yy, xx = np.mgrid[: size[0], : size[1]]
        img = np.stack([(xx * (i + 1) * 7) % 256, (yy * 11 + i * 30) % 256,
                        rng.integers(0, 256, size)], -1).astype(np.uint8)
        p = sub / f"img{i}.png"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


# ---- UNet -------------------------------------------------------------------------------------------------
def test_unet_shapes_determinism_and_timestep_conditioning():
    net = randomised(UNet(**TINY)).eval()
    assert 1_000 < net.num_parameters < 20_000
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = net(x, torch.tensor([10, 500]))
        assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
        assert torch.equal(out, net(x, torch.tensor([10, 500])))
        assert torch.equal(net(x, 123), net(x, torch.tensor([123, 123])))  # int t broadcasts
        assert torch.equal(net(x, torch.tensor(123)), net(x, 123))
        assert not torch.allclose(net(x, 10), net(x, 900))  # time conditioning acts
        assert net(torch.randn(1, 3, 32, 24), 5).shape == (1, 3, 32, 24)  # other sizes (multiples of 2)
        # config is JSON-able and rebuilds the same network
        clone = UNet(json.loads(json.dumps(net.config))).eval()
        clone.load_state_dict(net.state_dict())
        assert torch.equal(clone(x, 7), net(x, 7))


def test_unet_rejects_bad_configs_and_inputs():
    net = UNet(**TINY)
    with pytest.raises(ValueError, match="must be multiples of 2"):
        net(torch.randn(1, 3, 15, 16), 1)
    with pytest.raises(ValueError, match=r"expects \(N, 3, H, W\)"):
        net(torch.randn(1, 1, 16, 16), 1)
    with pytest.raises(ValueError, match="unknown keys"):
        UNetConfig.from_dict({**TINY, "bogus": 1})
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNet(**{**TINY, "attention_resolutions": [5]})
    with pytest.raises(ValueError, match="image_size"):
        UNet(**{**TINY, "image_size": 15})


def test_unet_scales_to_a_few_million_parameters():
    medium = UNet(base_channels=64, channel_mults=[1, 2, 2, 2], num_res_blocks=2, attention_resolutions=[16])
    assert 2_000_000 < medium.num_parameters < 12_000_000
    norms = [m for m in medium.modules() if isinstance(m, torch.nn.GroupNorm)]
    # no one-channel groups (instance norm would erase each feature's mean, i.e. the image's mean colour)
    assert all(m.num_channels // m.num_groups >= 4 and m.num_groups <= 32 for m in norms)
    assert any(m.num_groups == 32 for m in norms)


# ---- save / load ------------------------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_eps(tmp_path):
    schedule = default_schedule(1000, 1e-4, 0.03)  # a non-default schedule must come back from the config
    prior = tiny_prior()
    save_prior(prior, tmp_path / "p", schedule=schedule, extra={"note": "test"})
    assert {p.name for p in (tmp_path / "p").iterdir()} >= {"config.json", "model.safetensors",
                                                             "scheduler_config.json"}
    loaded = load_prior(tmp_path / "p")
    assert isinstance(loaded, DiffusionPrior) and not loaded.training
    assert loaded.image_size == 16 and loaded.channels == 3
    assert loaded.alphas_cumprod.dtype == torch.float64
    assert torch.allclose(loaded.alphas_cumprod, linear_alphas_cumprod(1000, 1e-4, 0.03))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.eps(x, 321), prior.eps(x, 321))
    assert loaded.config["training"] == {"note": "test"}

    save_prior(prior.net, tmp_path / "half", schedule=schedule, dtype=torch.float16)
    half = load_prior(tmp_path / "half")
    assert next(half.parameters()).dtype == torch.float32  # fp16 on disk, float32 in memory
    with torch.no_grad():
        ref = prior.eps(x, 321)
        assert torch.allclose(half.eps(x, 321), ref, atol=0.05 * float(ref.abs().max()))
        assert not torch.equal(half.eps(x, 321), ref)


def test_schedules():
    lin = alphas_cumprod_from_schedule(default_schedule())
    assert torch.allclose(lin, linear_alphas_cumprod())
    cos = alphas_cumprod_from_schedule({"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2"})
    assert cos.shape == (100,) and bool((cos[1:] < cos[:-1]).all())
    with pytest.raises(PriorError, match="prediction_type"):
        alphas_cumprod_from_schedule({**default_schedule(), "prediction_type": "v_prediction"})
    with pytest.raises(PriorError, match="beta_schedule"):
        alphas_cumprod_from_schedule({**default_schedule(), "beta_schedule": "sigmoid"})


def test_load_prior_errors_name_the_path_and_the_problem(tmp_path):
    with pytest.raises(PriorError, match="no such prior directory"):
        load_prior(tmp_path / "missing")
    (tmp_path / "ffhq_10m.pt").write_bytes(b"x")
    with pytest.raises(PriorError, match="ffhq_10m.pt: not a readable torch state dict"):
        load_prior(tmp_path / "ffhq_10m.pt")
    (tmp_path / "weights.ckpt").write_bytes(b"x")
    with pytest.raises(PriorError, match="weights.ckpt: a prior is a directory"):
        load_prior(tmp_path / "weights.ckpt")
    empty = tmp_path / "empty"
    (empty / "stuff").mkdir(parents=True)
    with pytest.raises(PriorError, match=r"empty: not a diffusion prior \(no config.json; found \['stuff'\]"):
        load_prior(empty)

    good = tmp_path / "good"
    save_prior(tiny_prior(), good)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "scheduler_config.json"):
        (broken / name).write_bytes((good / name).read_bytes())
    with pytest.raises(PriorError, match="missing model.safetensors"):
        load_prior(broken)
    other = tmp_path / "other"
    save_prior(tiny_prior(base_channels=8), other)
    (broken / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(PriorError, match="do not match config.json"):
        load_prior(broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(PriorError, match="unreadable safetensors"):
        load_prior(broken)
    (broken / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    (broken / "scheduler_config.json").unlink()
    with pytest.raises(PriorError, match="missing scheduler_config.json"):
        load_prior(broken)
    (broken / "config.json").write_text('{"_class_name": "VQModel"}')
    with pytest.raises(PriorError, match="'VQModel' is not a supported prior"):
        load_prior(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(PriorError, match="invalid JSON"):
        load_prior(broken)


def test_load_diffusers_unet2dmodel(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(3)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
    randomised(unet, seed=4).eval()
    repo = tmp_path / "ddpm-tiny"
    unet.save_pretrained(repo / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                            beta_schedule="linear").save_pretrained(repo / "scheduler")
    for path in (repo, repo / "unet"):  # repository root (unet/ + scheduler/) or the model folder itself
        prior = load_prior(path)
        assert prior.image_size == 16 and prior.channels == 3
        assert torch.allclose(prior.alphas_cumprod, linear_alphas_cumprod())
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            assert torch.equal(prior.eps(x, 77), unet(x, torch.tensor([77, 77])).sample)

    # the ddpm-ema-celebahq-256 layout: .bin weights, scheduler_config.json beside config.json
    flat = tmp_path / "flat"
    unet.save_pretrained(flat, safe_serialization=False)
    assert (flat / "diffusion_pytorch_model.bin").exists()
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(flat)
    with torch.no_grad():
        assert torch.equal(load_prior(flat).eps(x, 5), unet(x, torch.tensor([5, 5])).sample)

    lonely = tmp_path / "lonely"
    unet.save_pretrained(lonely)
    with pytest.raises(PriorError, match="no scheduler config"):
        load_prior(lonely)


# ---- sampling ---------------------------------------------------------------------------------------------
def test_ddim_sampling_is_seeded_and_grid_shape():
    assert ddim_timesteps(1000, 50)[:3] == [980, 960, 940] and ddim_timesteps(1000, 50)[-1] == 0
    assert ddim_timesteps(1000, 100)[0] == 990
    prior = tiny_prior()
    a = ddim_sample(prior, 3, steps=4, seed=5, batch_size=2)
    b = ddim_sample(prior, 3, steps=4, seed=5, batch_size=2)
    c = ddim_sample(prior, 3, steps=4, seed=6, batch_size=2)
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    grid = image_grid(a, padding=2)
    assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3) and grid.dtype == np.uint8


# ---- training command -------------------------------------------------------------------------------------
def test_train_command_writes_a_loadable_prior_samples_and_skips_bad_images(tmp_path, capsys):
    write_images(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "prior"
    rc = train_cli(["prior", "--images", str(tmp_path / "imgs"), "--out", str(out), "--size", "8",
                    "--pad-to", "16", "--steps", "4", "--batch", "3", "--checkpoint-every", "2",
                    "--sample-count", "4", "--sample-steps", "3", *TINY_FLAGS])
    assert rc == 0
    captured = capsys.readouterr()
    assert "parameters" in captured.out and "6 training images" in captured.out
    assert "broken.jpg" in captured.err
    assert json.loads((out / "skipped_images.json").read_text())[0]["file"].endswith("broken.jpg")
    prior = load_prior(out)
    assert prior.image_size == 16 and prior.config["training"]["step"] == 4
    assert prior.config["training"]["pad_to"] == 16
    sample = cv2.imread(str(out / "samples" / "step_0000004.png"))
    assert sample is not None and sample.shape == (2 * 18 + 2, 2 * 18 + 2, 3)
    assert (out / "samples" / "step_0000002.png").exists()
    with torch.no_grad():
        eps = prior.eps(torch.randn(1, 3, 16, 16), 500)
    assert torch.isfinite(eps).all() and float(eps.abs().max()) > 0  # training moved the zero-init output layer
    # EMA weights are what the prior holds
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["position"] == 12
    assert all(torch.equal(prior.net.state_dict()[k], v) for k, v in ckpt["ema"].items())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and np.isfinite(log[-1]["loss"])


def _train(images: Path, out: Path, *extra: str) -> int:
    return train_cli(["prior", "--images", str(images), "--out", str(out), "--size", "16", "--steps", "5",
                      "--batch", "4", "--dropout", "0.1", "--warmup", "2", "--lr", "1e-3", "--seed", "7",
                      "--checkpoint-every", "100", "--sample-count", "2", "--sample-steps", "2",
                      *TINY_FLAGS, *extra])


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    write_images(tmp_path / "imgs", 5)  # 5 images, batch 4: batches cross epoch boundaries
    assert _train(tmp_path / "imgs", tmp_path / "straight") == 0
    assert _train(tmp_path / "imgs", tmp_path / "split", "--max-steps-this-run", "2") == 0
    first = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert first["step"] == 2 and first["position"] == 8
    # a restart with no architecture flags picks the settings up from the checkpoint
    rc = train_cli(["prior", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "split"), "--steps", "5",
                    "--max-steps-this-run", "2", "--threads", "1", "--no-progress", "--sample-count", "0"])
    assert rc == 0
    assert _train(tmp_path / "imgs", tmp_path / "split") == 0  # auto-resume to the end
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == 5
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 5
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    pa, pb = load_prior(tmp_path / "straight"), load_prior(tmp_path / "split")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(pa.eps(x, 400), pb.eps(x, 400))
    # and a different seed does give different weights (the comparison above can fail)
    assert _train(tmp_path / "imgs", tmp_path / "other", "--seed", "8") == 0
    c = torch.load(tmp_path / "other" / "checkpoint.pt", weights_only=True)
    assert not torch.equal(a["model"]["conv_in.weight"], c["model"]["conv_in.weight"])


def test_train_command_errors(tmp_path, capsys):
    def run(*args: str) -> int:
        return train_cli(["prior", "--steps", "1", "--batch", "2", "--size", "16", "--sample-count", "0",
                          *TINY_FLAGS, *args])

    assert run("--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")) == 2
    assert "nope: no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    assert run("--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o")) == 2
    assert "empty: no image files" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"xx")
    assert run("--images", str(tmp_path / "junk"), "--out", str(tmp_path / "o")) == 2
    assert "none of the 1 image files could be read" in capsys.readouterr().err
    real = tmp_path / "real"
    (real / "measurements").mkdir(parents=True)
    (real / "dataset.json").write_text("{}")
    assert run("--images", str(real), "--out", str(tmp_path / "o")) == 2
    assert "without ground_truth/" in capsys.readouterr().err

    write_images(tmp_path / "imgs", 2)
    assert run("--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--pad-to", "8") == 2
    assert "--pad-to 8 is smaller than --size 16" in capsys.readouterr().err
    assert run("--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--resume") == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert run("--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o")) == 0
    capsys.readouterr()
    # an existing checkpoint is never silently replaced, nor resumed with a different architecture
    assert run("--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--no-resume") == 2
    assert "checkpoint.pt exists" in capsys.readouterr().err
    assert run("--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--steps", "2",
               "--base-channels", "8") == 2
    assert "--base-channels 8 (checkpoint: 4)" in capsys.readouterr().err
    save_prior(tiny_prior(), tmp_path / "downloaded")  # someone else's prior is never overwritten by accident
    assert run("--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "downloaded")) == 2
    assert "already holds a prior (config.json) but no checkpoint.pt" in capsys.readouterr().err
    (tmp_path / "o" / "checkpoint.pt").write_bytes(b"truncated")
    assert run("--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--steps", "2") == 2
    assert "unreadable checkpoint" in capsys.readouterr().err


def test_train_command_reads_a_dataset_ground_truth(tmp_path, capsys):
    ds = tmp_path / "ds"
    (ds / "ground_truth").mkdir(parents=True)
    (ds / "measurements").mkdir()
    (ds / "dataset.json").write_text("{}")
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(ds / "ground_truth" / f"s{i}.npy", rng.random((3, 16, 16), dtype=np.float32))
        np.save(ds / "measurements" / f"s{i}.npy", rng.random((3, 32, 32), dtype=np.float32))
    rc = train_cli(["prior", "--images", str(ds), "--out", str(tmp_path / "o"), "--size", "16", "--steps", "1",
                    "--batch", "2", "--sample-count", "0", *TINY_FLAGS])
    assert rc == 0
    assert f"3 training images from {ds / 'ground_truth'}" in capsys.readouterr().out


def test_sigkill_at_any_moment_then_restart_matches_an_uninterrupted_run(tmp_path):
    """A real process killed with SIGKILL while it checkpoints every step; the restart must continue exactly."""
    import os
    import signal
    import subprocess
    import sys
    import time

    write_images(tmp_path / "imgs", 5)
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train.cli", "prior", "--images", str(tmp_path / "imgs"), "--out", str(out),
           "--size", "16", "--steps", "100000", "--batch", "4", "--dropout", "0.1", "--warmup", "2", "--lr", "1e-3",
           "--seed", "7", "--checkpoint-every", "1", "--sample-count", "0", *TINY_FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120  # a guard against a hung child, not a timing assertion
        while time.monotonic() < deadline and proc.poll() is None:
            # checkpoint.pt is replaced atomically, so it is always a complete file
            if (out / "checkpoint.pt").exists() and torch.load(out / "checkpoint.pt", weights_only=True)["step"] >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    total = str(killed_at + 3)
    assert train_cli(["prior", "--images", str(tmp_path / "imgs"), "--out", str(out), "--steps", total,
                      "--checkpoint-every", "1000", "--threads", "1", "--no-progress", "--sample-count", "0"]) == 0
    assert not list(out.glob(".*.tmp"))
    assert _train(tmp_path / "imgs", tmp_path / "straight", "--steps", total) == 0
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == int(total)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ---- guided-diffusion / ADM checkpoints ----------------------------------------------------------------
ADM_TINY = {"image_size": 16, "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
            "attention_resolutions": [8], "channel_mult": [1, 2], "num_heads": 4, "num_head_channels": 16,
            "use_scale_shift_norm": True, "resblock_updown": True}


def test_adm_unet_matches_the_ffhq_10m_layout():
    from train.prior.unet import ADMUNet

    net = ADMUNet()  # defaults = DPS/DiffPIR ffhq_10m.pt: 128 ch, 1 res block, attention at 16, learn_sigma
    assert net.num_parameters == 93_563_910  # the 93.6M of the released checkpoint
    keys = set(net.state_dict())
    assert {"time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.2.0.in_layers.2.weight",
            "middle_block.1.qkv.weight", "output_blocks.11.0.skip_connection.weight", "out.2.weight"} <= keys


def test_load_guided_diffusion_checkpoint(tmp_path):
    from train.prior.unet import ADMUNet

    net = randomised(ADMUNet(**ADM_TINY), seed=2).eval()
    torch.save(net.state_dict(), tmp_path / "tiny_adm.pt")
    (tmp_path / "tiny_adm.json").write_text(json.dumps({  # guided-diffusion flag names and string lists
        "image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2", "learn_sigma": True,
        "attention_resolutions": "8", "num_heads": 4, "num_head_channels": 16, "use_scale_shift_norm": True,
        "resblock_updown": True, "diffusion_steps": 1000, "noise_schedule": "linear", "model_path": "x"}))
    prior = load_prior(tmp_path / "tiny_adm.pt")
    assert prior.image_size == 16 and prior.channels == 3
    assert torch.allclose(prior.alphas_cumprod, linear_alphas_cumprod())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        eps = prior.eps(x, 250)
        assert eps.shape == (2, 3, 16, 16)
        assert torch.equal(eps, net(x, torch.tensor([250, 250]))[:, :3])  # ε = first half of learn_sigma output
    # converted to a prior directory (safetensors), it loads back identically
    save_prior(prior, tmp_path / "adm_dir")
    again = load_prior(tmp_path / "adm_dir")
    assert json.loads((tmp_path / "adm_dir" / "config.json").read_text())["_class_name"] == "ADMUNet"
    with torch.no_grad():
        assert torch.equal(again.eps(x, 250), eps)
    # without the sidecar the architecture is read off the weights; heads default to 64 channels each
    (tmp_path / "tiny_adm.json").unlink()
    guessed = load_prior(tmp_path / "tiny_adm.pt")
    assert guessed.net.net.cfg.channel_mult == [1, 2] and guessed.net.net.cfg.resblock_updown
    assert guessed.net.net.cfg.use_scale_shift_norm and guessed.net.net.cfg.num_head_channels == 64
    # a sidecar that contradicts the weights is an error, and so is a file that is no state dict
    (tmp_path / "tiny_adm.json").write_text(json.dumps({"num_channels": 64, "learn_sigma": False}))
    with pytest.raises(PriorError, match="disagree with the weights: model_channels 64"):
        load_prior(tmp_path / "tiny_adm.pt")
    torch.save({"step": 3}, tmp_path / "junk.pt")
    with pytest.raises(PriorError, match="junk.pt: expected a state dict"):
        load_prior(tmp_path / "junk.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(PriorError, match="not a guided-diffusion UNet state dict"):
        load_prior(tmp_path / "other.pt")


def test_train_command_bf16_autocast_path_runs(tmp_path):
    """The GPU path uses bf16 autocast; on the CPU it is selectable with --precision bf16."""
    write_images(tmp_path / "imgs", 3)
    rc = train_cli(["prior", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--size", "16",
                    "--steps", "2", "--batch", "2", "--precision", "bf16", "--sample-count", "0", *TINY_FLAGS])
    assert rc == 0
    prior = load_prior(tmp_path / "o")
    assert next(prior.parameters()).dtype == torch.float32  # master weights and EMA stay float32
    with torch.no_grad():
        assert torch.isfinite(prior.eps(torch.randn(1, 3, 16, 16), 10)).all()


class _GaussianEps(torch.nn.Module):
    """The exact ε of Gaussian data x0 ~ N(μ, s²I): ε*(x_t, t) = √(1−ᾱ)(x_t − √ᾱ μ)/(ᾱ s² + 1 − ᾱ)."""

    def __init__(self, mu: float, s: float):
        super().__init__()
        self.mu, self.s = mu, s
        self.register_buffer("abar", linear_alphas_cumprod().float())

    def forward(self, x, t):
        a = self.abar[t][:, None, None, None]
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)


def test_ddim_sampler_draws_from_the_distribution_its_eps_describes():
    prior = DiffusionPrior(_GaussianEps(0.3, 0.2), linear_alphas_cumprod(), image_size=8, channels=3)
    x = ddim_sample(prior, 128, steps=1000, seed=0, batch_size=128)
    assert abs(float(x.mean()) - 0.3) < 0.005 and abs(float(x.std()) - 0.2) < 0.005
    coarse = ddim_sample(prior, 128, steps=50, eta=1.0, seed=0, batch_size=128)
    assert abs(float(coarse.mean()) - 0.3) < 0.005


def test_batches_follow_a_seeded_epoch_order_and_pad_scenes_centrally():
    from train.prior.data import batch_indices, make_batch

    n, batch = 5, 4
    order = [i for step in range(5) for i in batch_indices(step * batch, batch, n, seed=3)]
    for epoch in range(4):  # every epoch is a permutation of all images
        assert sorted(order[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert order[:n] != order[n:2 * n]  # reshuffled per epoch
    assert batch_indices(8, batch, n, seed=3) == order[8:12]  # resuming mid-stream continues the same order
    images = np.random.default_rng(0).random((n, 3, 8, 8)).astype(np.float16)
    x = make_batch(images, [2, 4], pad_to=14)
    assert x.shape == (2, 3, 14, 14)
    assert torch.equal(x[:, :, 3:11, 3:11], torch.from_numpy(images[[2, 4]].astype(np.float32)) * 2 - 1)
    border = torch.ones(14, 14, dtype=torch.bool)
    border[3:11, 3:11] = False
    assert bool((x[:, :, border] == -1).all())  # zero frame = black = −1 in diffusion space


def test_dataset_directory_uses_only_the_train_split(tmp_path):
    """A prior trained on a simulated dataset must never see the held-out test scenes."""
    import json

    from train.prior.data import find_image_files

    root = tmp_path / "ds"
    (root / "ground_truth").mkdir(parents=True)
    for i in ("0", "1", "2", "3"):
        np.save(root / "ground_truth" / f"{i}.npy", np.zeros((3, 8, 8), np.float32))
    (root / "dataset.json").write_text(json.dumps({"splits": {"train": ["0", "2", "3"], "test": ["1"]}}))
    _, files = find_image_files(root)
    assert sorted(f.stem for f in files) == ["0", "2", "3"]

"""Time estimates of the long commands (train/progress.py) and the prior's `--preset cpu` (issue 16, item 3)."""

from __future__ import annotations

import argparse

from train.progress import TimeEstimate, format_duration, format_rate


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_estimate_skips_the_warm_up_and_prints_once():
    clock, lines = FakeClock(), []
    est = TimeEstimate("prior", 100_000, "step", after=3, write=lines.append, clock=clock, wall_clock=lambda: 0.0)
    clock.t += 60.0  # a slow first step (warm-up): not timed
    assert est.update(1) is None
    for step in (2, 3, 4):
        clock.t += 9.0
        line = est.update(step)
    assert lines == [line]
    assert line.startswith("prior: 9 s/step over steps 2–4; 99,996 steps left: about 10.4 days")
    clock.t += 1.0
    assert est.update(5) is None and len(lines) == 1


def test_estimate_counts_images_in_batches_and_stays_quiet_for_short_work():
    clock, lines = FakeClock(), []
    est = TimeEstimate("teacher", 20, "image", after=1, write=lines.append, clock=clock)
    est.update(4)  # the first batch of 4 (warm-up)
    clock.t += 8.0
    est.update(8)  # 4 images in 8 s: 2 s/image, 12 left: 24 s
    assert lines and "2 s/image over images 5–8; 12 images left: about 24 s" in lines[0]
    short = TimeEstimate("evaluate wiener", 30, "image", after=2, write=lines.append, clock=clock)
    for k in range(1, 6):
        clock.t += 0.01
        short.update(k)
    assert len(lines) == 1  # 0.25 s left: nothing worth printing


def test_formats():
    assert [format_duration(s) for s in (45, 600, 3 * 3600, 10 * 86400)] == ["45 s", "10 min", "3.0 h", "10.0 days"]
    assert format_rate(9.06, "step") == "9.06 s/step"
    assert format_rate(0.035, "image") == "35 ms/image"
    assert format_rate(0.005, "step") == "200 steps/s"


def test_prior_preset_cpu_is_what_cpu_demo_ran_and_explicit_options_win():
    from train.prior.train_prior import PRESETS, RUN_DEFAULTS, apply_preset, configure_parser

    p = argparse.ArgumentParser()
    configure_parser(p)
    base = ["--images", "x", "--out", "y"]
    args = apply_preset(p.parse_args([*base, "--preset", "cpu", "--steps", "50", "--dropout", "0.2"]))
    assert args.steps == 50 and args.dropout == 0.2  # given: kept
    assert args.base_channels == 32 and args.channel_mults == [1, 2, 2] and args.batch == 16
    assert args.checkpoint_every == 250 and args.warmup == 100
    plain = apply_preset(p.parse_args(base))
    assert plain.steps == RUN_DEFAULTS["steps"] and not hasattr(plain, "base_channels")  # resume keeps the checkpoint's
    assert set(PRESETS["cpu"]) <= {"base_channels", "channel_mults", "num_res_blocks", "attention_resolutions",
                                   "dropout", "batch", "warmup", *RUN_DEFAULTS}


def test_cpu_demo_script_takes_its_prior_settings_from_the_preset():
    """scripts/cpu_demo.sh keeps no second copy of the preset's settings."""
    from pathlib import Path

    from train.prior.train_prior import PRESETS

    script = (Path(__file__).resolve().parents[1] / "scripts" / "cpu_demo.sh").read_text()
    prior_call = script[script.index("nsdd-train prior"):].split("\nfi", 1)[0]
    assert "--preset cpu" in prior_call
    copies = [k for k in PRESETS["cpu"] if k != "steps" and f"--{k.replace('_', '-')} " in prior_call]
    assert not copies, f"cpu_demo.sh repeats the preset's {copies}"

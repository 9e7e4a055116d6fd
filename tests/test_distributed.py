"""Data-parallel ``nsdd-train prior`` and ``nsdd-train distill`` under torchrun (gloo, 2 CPU processes): the same
loss curve as one process with the same global batch, one checkpoint (rank 0), resume with another world size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from train.cli import main as train_cli
from train.distill import DistillError, train_student
from train.distributed import DistContext, init_distributed
from train.prior.io import load_prior

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
from test_distill import make_problem, settings
from test_prior import TINY_FLAGS, write_images

# Same global batch, so the same gradient up to float rounding (the mean over 2 × 2 rows instead of 4): the
# losses agree to float32 rounding amplified over a few AdamW steps.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def torchrun(*argv: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (a free port on localhost) with ``nproc`` CPU processes running ``nsdd-train``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "train.cli", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_batch_rows_and_the_single_process_context():
    ctx = DistContext(rank=1, world_size=2)
    assert ctx.rows(4) == slice(2, 4) and ctx.local(["a", "b", "c", "d"]) == ["c", "d"]
    with pytest.raises(DistillError, match="--batch 5 .* 2 processes"):
        ctx.check_batch(5, DistillError)
    single = init_distributed(torch.device("cpu"), DistillError)  # no torchrun: one process, collectives are no-ops
    assert not single.enabled and single.is_main and single.local([1, 2, 3]) == [1, 2, 3]
    assert single.any(True, False) == [True, False] and single.min_int(7) == 7
    assert single.from_main(lambda: {"a": 1}) == {"a": 1}


PRIOR_FLAGS = ["--size", "16", "--batch", "4", "--dropout", "0", "--warmup", "2", "--lr", "1e-3", "--seed", "7",
               "--checkpoint-every", "100", "--sample-count", "0", "--log-every", "1", *TINY_FLAGS]


def _prior_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_prior_on_two_processes_follows_one_process_and_resumes_on_one(tmp_path):
    write_images(tmp_path / "imgs", 6)  # 6 images, global batch 4: batches cross epochs
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert train_cli(["prior", "--images", str(tmp_path / "imgs"), "--out", str(single), "--steps", "4",
                      *PRIOR_FLAGS]) == 0

    run = torchrun("prior", "--images", str(tmp_path / "imgs"), "--out", str(ddp), "--steps", "4",
                   "--max-steps-this-run", "2", *PRIOR_FLAGS)
    assert run.stdout.count("data parallel: 2 processes (gloo), global batch 4 = 2 x 2") == 1  # rank 0 prints
    assert files(ddp) == files(single)  # one checkpoint and one prior, written by rank 0; no temporary files
    ckpt = torch.load(ddp / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["position"] == 8
    assert load_prior(ddp).config["training"]["data_parallel"] == {"world_size": 2, "backend": "gloo"}
    np.testing.assert_allclose(_prior_losses(ddp), _prior_losses(single)[:2], rtol=LOSS_RTOL)

    # resume the two-process checkpoint in one process: the curve and the weights of the one-process run
    assert train_cli(["prior", "--images", str(tmp_path / "imgs"), "--out", str(ddp), "--steps", "4",
                      *PRIOR_FLAGS]) == 0
    np.testing.assert_allclose(_prior_losses(ddp), _prior_losses(single), rtol=LOSS_RTOL)
    a = torch.load(single / "checkpoint.pt", weights_only=True)
    b = torch.load(ddp / "checkpoint.pt", weights_only=True)
    assert (a["step"], a["position"]) == (b["step"], b["position"]) == (4, 16)
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])  # the same noise was drawn, once
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], atol=WEIGHT_ATOL, rtol=0, msg=f"{part} {k}")
    c = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    assert not all(torch.equal(c["model"][k], ckpt["model"][k]) for k in c["model"])  # training moved them


DISTILL_FLAGS = ["--width", "8", "--depth", "2", "--max-width", "16", "--blocks", "1", "--batch", "4",
                 "--lr", "2e-3", "--warmup", "0", "--checkpoint-every", "2", "--samples", "2", "--ema", "0.9",
                 "--threads", "1", "--quiet"]


def _distill_losses(out: Path) -> list[float]:
    return json.loads((out / "loss.json").read_text())["loss"]


def test_distill_resumed_on_two_processes_follows_one_process(tmp_path):
    data, targets = make_problem(tmp_path)
    first = tmp_path / "first"
    train_student(settings(data, targets, first, steps=3))  # steps 1-3 in one process
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(first, one)
    shutil.copytree(first, two)
    train_student(settings(data, targets, one, steps=6))  # steps 4-6 in one process ...
    run = torchrun("distill", "--data", str(data), "--targets", str(targets), *DISTILL_FLAGS, "--out", str(two),
                   "--steps", "6")  # ... and in two, from the same checkpoint (world size 1 -> 2)
    assert run.stdout.count("student saved to") == 1  # rank 0 reports
    assert files(two) == files(one)  # one checkpoint, one student, one loss curve and sample grids (rank 0)
    np.testing.assert_allclose(_distill_losses(two), _distill_losses(one), rtol=LOSS_RTOL)
    assert _distill_losses(two)[:3] == _distill_losses(first)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=WEIGHT_ATOL, rtol=0, msg=k)
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (one, two))
    assert ca["step"] == cb["step"] == 6 and ca["data"] == cb["data"]
    assert not all(torch.equal(ca["net"][k], torch.load(first / "checkpoint.pt", weights_only=True)["net"][k])
                   for k in ca["net"])  # the last three steps moved the weights
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["training"]["data_parallel"] == {"world_size": 2, "backend": "gloo"}
    assert "data_parallel" not in json.loads((one / "config.json").read_text())["training"]

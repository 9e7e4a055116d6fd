"""Many teacher workers on one folder: atomic shard claims, takeover of a dead worker's shard, identical
targets whatever the number of workers, and the progress view across workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from train.shard_claims import ShardClaims, Worker
from train.teacher import TeacherError, identity_digest, label_dataset
from train.teacher_progress import busy_seconds, format_progress, progress_view

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from test_teacher import SETTINGS, make_dataset, npy_bytes, prior

WAIT = 180  # seconds a subprocess may take on a loaded CI machine (never reached when all is well)


def worker_script(data: Path, out: Path, name: str, hang_after_batch: int | None, marker: Path | None,
                  claim_timeout: float) -> str:
    """A teacher worker in its own process; with ``hang_after_batch`` it writes ``marker`` after that batch and
    then sleeps, holding its shard (its heartbeat thread keeps running) until the test kills it."""
    return textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(TESTS)!r})
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # same float summation order as the reference
        from test_diffusion_solvers import tiny_prior
        from train.data import LenslessDataset
        from train.teacher import label_dataset
        def hook(n):
            if n == {hang_after_batch!r}:
                Path({str(marker)!r}).write_text("mid-shard")
                time.sleep(600)
        label_dataset(LenslessDataset({str(data)!r}), tiny_prior(), {str(out)!r}, worker={name!r},
                      claim_timeout={claim_timeout!r}, after_batch=hook, **{SETTINGS!r})
    """)


def start(script: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def records(out: Path) -> dict[int, dict]:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in sorted((out / ".teacher").glob("shard-*.json"))}


def test_claims_are_exclusive_and_a_stale_claim_is_taken_over(tmp_path):
    a = ShardClaims(tmp_path, Worker("a", "host-a", 1), timeout=30, settings={"batch_size": 2})
    b = ShardClaims(tmp_path, Worker("b", "host-b", 2), timeout=30, settings={"batch_size": 2})
    held = a.claim(0)
    assert held is not None and held.generation == 0
    assert b.claim(0) is None  # live: another machine's worker with a fresh heartbeat
    assert b.describe(0, 0)["state"] == "live" and b.latest(0)["worker"] == "a"
    old = time.time() - 100  # no heartbeat for 100 s > 30 s
    os.utime(held.path, (old, old))
    assert b.describe(0, 0)["state"] == "stale"
    taken = b.claim(0)
    assert taken is not None and taken.generation == 1
    assert not a.holds(held) and b.holds(taken)  # the old holder sees it was superseded
    assert a.claim(0) is None  # and cannot take it back while b is live
    # a claim made on this host by a process that is gone is taken over at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)
    c = ShardClaims(tmp_path, Worker("c", "host-c", int(dead.stdout)), timeout=30)
    assert c.claim(1) is not None
    here = ShardClaims(tmp_path, Worker("d", "host-c", os.getpid()), timeout=30)
    assert here.describe(1, 0)["state"] == "dead" and here.claim(1).generation == 1
    # other workers' live claims with other settings are reported as conflicts
    other = ShardClaims(tmp_path, Worker("e", "host-e", 3), timeout=30, settings={"batch_size": 4})
    assert sorted(d["worker"] for d in other.conflicts()) == ["b", "d"]
    with pytest.raises(ValueError, match="timeout"):
        ShardClaims(tmp_path, Worker("f", "h", 4), timeout=0)


def test_two_workers_one_killed_mid_shard_give_the_targets_of_one_worker(tmp_path):
    ds = make_dataset(tmp_path / "data")
    reference = tmp_path / "reference"
    label_dataset(ds, prior(), reference, **SETTINGS)  # one worker, in this process
    out = tmp_path / "shared_out"
    marker = tmp_path / "a_is_mid_shard"

    # worker A claims a shard, writes its first batch, then hangs holding the claim
    a = start(worker_script(ds.root, out, "A", hang_after_batch=1, marker=marker, claim_timeout=4.0))
    try:
        wait_for(marker.exists, "worker A to be in the middle of a shard", a)
        claims = ShardClaims(out / ".teacher" / "claims", Worker("test", "test-host", 0), timeout=4.0)
        held = [k for k, gens in claims.generations().items() if claims.describe(k, gens[-1])["worker"] == "A"]
        assert len(held) == 1
        k_a = held[0]
        ids = ds.ids("train")
        shard_a = ids[3 * k_a: 3 * k_a + 3]
        assert (out / f"{shard_a[0]}.npy").exists() and not (out / ".teacher" / f"shard-{k_a:05d}.json").exists()

        # worker B labels every other shard, then waits for A's
        b = start(worker_script(ds.root, out, "B", hang_after_batch=None, marker=None, claim_timeout=4.0))
        wait_for(lambda: len(records(out)) == 2, "worker B to finish the shards A does not hold", b)
        assert b.poll() is None and k_a not in records(out)  # B waits: A is alive and holds its shard

        a.send_signal(signal.SIGKILL)  # A dies mid-shard, without any cleanup
        a.wait(timeout=WAIT)
        assert b.wait(timeout=WAIT) == 0, b.stderr.read()
    finally:
        for p in (a, locals().get("b")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    assert npy_bytes(out) == npy_bytes(reference)  # bit-identical to one worker
    recs = records(out)
    assert recs[k_a]["worker"]["name"] == "B"  # B took over A's shard ...
    assert {r["worker"]["name"] for r in recs.values()} == {"B"}
    assert claims.latest(k_a)["worker"] == "B" and claims.latest(k_a)["generation"] == 1  # ... as generation 1
    manifest = json.loads((out / "teacher.json").read_text())
    assert manifest["complete"] is True
    assert json.loads((out / "recon.json").read_text())["images"].keys() == set(ds.ids("train"))

    view = progress_view(out)
    assert (view["shards_done"], view["shards"], view["images_done"]) == (3, 3, 8)
    assert view["eta_seconds"] == 0.0 and view["images_per_second"] > 0
    assert view["workers"]["B"]["shards"] == 3 and not view["stale_claims"]
    text = format_progress(view)
    assert "3/3 shards, 8/8 images (100.0%), complete" in text and "\nB " in text


def test_two_workers_started_together_label_each_shard_once(tmp_path):
    ds = make_dataset(tmp_path / "data")
    reference = tmp_path / "reference"
    label_dataset(ds, prior(), reference, **SETTINGS)
    out = tmp_path / "out"
    procs = [start(worker_script(ds.root, out, name, None, None, 4.0)) for name in ("A", "B")]
    for p in procs:
        assert p.wait(timeout=WAIT) == 0, p.stderr.read()
    assert npy_bytes(out) == npy_bytes(reference)
    claims = ShardClaims(out / ".teacher" / "claims", Worker("test", "test-host", 0))
    assert claims.generations() == {0: [0], 1: [0], 2: [0]}  # every shard claimed once: no work was repeated
    assert {k: r["worker"]["name"] for k, r in records(out).items()} == {
        k: claims.latest(k)["worker"] for k in range(3)}


def test_a_claim_from_another_machine_is_taken_over_after_the_timeout(tmp_path):
    ds = make_dataset(tmp_path / "data")
    reference = tmp_path / "reference"
    label_dataset(ds, prior(), reference, **SETTINGS)
    out = tmp_path / "out"
    label_dataset(ds, prior(), out, **{**SETTINGS, "limit": 3})  # writes the manifest and shard 0
    # a worker on another machine, with the same settings, claimed shard 1 and went silent
    digest = identity_digest(json.loads((out / "teacher.json").read_text())["identity"])
    lost = ShardClaims(out / ".teacher" / "claims", Worker("lost", "other-machine", 1), timeout=1.0,
                       settings={"identity": digest, "batch_size": 2, "shard_size": 3, "limit": None})
    claim = lost.claim(1)
    claimed_at = claim.path.stat().st_mtime
    label_dataset(ds, prior(), out, claim_timeout=1.0, **SETTINGS)
    assert npy_bytes(out) == npy_bytes(reference)
    rec = records(out)[1]
    assert rec["worker"]["name"] != "lost" and rec["started"] >= claimed_at + 1.0  # not before the timeout
    assert ShardClaims(out / ".teacher" / "claims", Worker("t", "t", 0)).latest(1)["generation"] == 1


def test_a_live_worker_with_other_settings_is_refused(tmp_path):
    ds = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    label_dataset(ds, prior(), out, **{**SETTINGS, "limit": 3})
    other = ShardClaims(out / ".teacher" / "claims", Worker("busy", "other-machine", 1), timeout=600,
                        settings={"identity": "x", "batch_size": 4, "shard_size": 3, "limit": None})
    other.claim(2)
    before = npy_bytes(out)
    with pytest.raises(TeacherError, match="busy on other-machine"):
        label_dataset(ds, prior(), out, **SETTINGS)
    assert npy_bytes(out) == before


def test_progress_view_mid_run_and_the_cli(tmp_path, capsys):
    from train.cli import main as cli_main

    ds = make_dataset(tmp_path / "data")
    out = tmp_path / "out"

    class Stop(Exception):
        pass

    def stop_in_shard_1(n):
        if n == 3:  # shard 0 (2 batches) done, shard 1 half written
            raise Stop

    with pytest.raises(Stop):
        label_dataset(ds, prior(), out, after_batch=stop_in_shard_1, **SETTINGS)
    view = progress_view(out)
    assert (view["shards_done"], view["shards"], view["images_done"], view["images"]) == (1, 3, 3, 8)
    assert view["images_per_second"] > 0
    assert view["eta_seconds"] == pytest.approx(5 / view["images_per_second"])
    assert [h["shard"] for h in view["holding"]] == [1]  # this process's claim (it stopped, the file stays)
    # a second worker that holds its first shard and has finished none yet
    ShardClaims(out / ".teacher" / "claims", Worker("fresh", "other-machine", 1)).claim(2)
    view = progress_view(out)
    assert len(view["holding"]) == 2 and {h["shard"]: h["worker"] for h in view["holding"]}[2] == "fresh"
    assert "fresh" in format_progress(view) and "fresh" not in view["workers"]
    text = format_progress(view)
    assert "1/3 shards" in text and "3/8 images" in text and "ETA" in text
    assert cli_main(["teacher-progress", "--out", str(out)]) == 0
    assert "1/3 shards" in capsys.readouterr().out
    assert cli_main(["teacher-progress", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_done"] == 1
    assert cli_main(["teacher-progress", "--out", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    # throughput counts the time during which any worker labelled, once
    assert busy_seconds([(0, 10), (5, 12), (20, 25)]) == 17 and busy_seconds([]) == 0


def test_cli_worker_name_threads_and_claim_timeout(tmp_path, capsys):
    from train.cli import main as cli_main
    from train.prior.base import DiffusionPrior, linear_alphas_cumprod
    from train.prior.io import save_prior
    from train.prior.unet import UNet

    ds = make_dataset(tmp_path / "data", n=4)
    torch.manual_seed(0)
    net = UNet(image_size=16, base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[],
               num_heads=1, dropout=0.0, mid_attention=False)
    save_prior(DiffusionPrior(net, linear_alphas_cumprod(), 16, 3), tmp_path / "prior")
    out = tmp_path / "targets"
    argv = ["teacher", "--data", str(ds.root), "--prior", str(tmp_path / "prior"), "--out", str(out), "--split", "all",
            "--steps", "2", "--batch", "2", "--shard-size", "2", "--no-png"]
    threads = torch.get_num_threads()
    assert cli_main([*argv, "--worker", "gpu-box-0", "--threads", "2", "--claim-timeout", "60"]) == 0
    assert torch.get_num_threads() == threads  # --threads applies to the command only
    recs = records(out)
    assert [r["worker"]["name"] for r in recs.values()] == ["gpu-box-0", "gpu-box-0"]
    assert recs[0]["worker"]["threads"] == 2 and recs[0]["worker"]["device"] == "cpu"
    capsys.readouterr()
    assert cli_main([*argv, "--claim-timeout", "0"]) == 2
    assert "--claim-timeout must be > 0" in capsys.readouterr().err
    assert cli_main([*argv, "--device", "nonsense"]) == 2
    assert "--device 'nonsense'" in capsys.readouterr().err

"""``nsdd-train teacher-progress``: how far the teacher workers on one output folder are, from its shard records.

Read only from ``OUT/teacher.json`` (ids, shard size), the completion records ``OUT/.teacher/shard-K.json``
(ids, worker, start and finish times) and the claims ``OUT/.teacher/claims/`` (who holds which shard now):

- shards and images done out of the total;
- throughput across workers ``R = images in timed records / |∪_k [start_k, finish_k]|`` (the time during
  which at least one worker was labelling, so pauses between runs do not count), and ``ETA = left / R``;
- per worker: shards, images, ``images / Σ shard seconds``, and the shard it holds with its heartbeat age;
- claims whose worker stopped sending heartbeats (the next worker to look takes them over).

Times are the workers' wall clocks (``time.time()``); across machines they are as good as the clocks' sync.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from train.shard_claims import ShardClaims, Worker
from train.teacher import MANIFEST, RECORD_DIR, shard_record_path

HELP = "progress of the teacher workers on an output folder (shards, images/s, ETA)"


class ProgressError(ValueError):
    """An output folder that holds no teacher run; the message names it."""


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="the teacher's output folder (its --out)")
    p.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                   help="print the view again every SECONDS until every shard is done")
    p.add_argument("--json", action="store_true", help="print the view as JSON")


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of the intervals ``[start, finish]``."""
    total, start, end = 0.0, 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:  # a gap: close the running union
            total += 0.0 if end is None else end - start
            start, end = a, b
        else:
            end = max(end, b)
    return total + (0.0 if end is None else end - start)


def progress_view(out: str | Path) -> dict:
    """The progress of the labelling in ``out`` (module docstring) as a dict."""
    out = Path(out)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        ids, shard_size = list(manifest["ids"]), int(manifest["settings"]["shard_size"])
    except FileNotFoundError:
        raise ProgressError(f"--out {out}: no {MANIFEST} (no teacher has started there)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ProgressError(f"{out / MANIFEST}: unreadable teacher manifest ({exc})") from exc
    shards = [ids[k:k + shard_size] for k in range(0, len(ids), shard_size)]
    done_shards, done_images = 0, 0
    intervals: list[tuple[float, float]] = []
    timed_images = 0
    workers: dict[str, dict] = {}
    done_index = set()
    for k, shard in enumerate(shards):
        try:
            record = json.loads(shard_record_path(out, k).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if record.get("ids") != shard:  # a record of other settings: not done
            continue
        done_shards += 1
        done_images += len(shard)
        done_index.add(k)
        started, finished = record.get("started"), record.get("finished")
        who = record.get("worker", {})
        w = workers.setdefault(who.get("name", "(unrecorded)"), {
            "host": who.get("host"), "device": who.get("device"), "shards": 0, "images": 0, "seconds": 0.0})
        w["shards"] += 1
        w["images"] += len(shard)
        if isinstance(started, (int, float)) and isinstance(finished, (int, float)) and finished >= started:
            intervals.append((float(started), float(finished)))
            timed_images += len(shard)
            w["seconds"] += finished - started
    busy = busy_seconds(intervals)
    rate = timed_images / busy if busy > 0 else None
    left = len(ids) - done_images
    for w in workers.values():
        w["images_per_second"] = w["images"] / w["seconds"] if w["seconds"] > 0 else None

    holding, stale = [], []
    claims_dir = out / RECORD_DIR / "claims"
    if claims_dir.is_dir():
        claims = ShardClaims(claims_dir, Worker.this_process("teacher-progress"))
        now = claims.now()
        for k, gens in sorted(claims.generations().items()):
            if k in done_index or k >= len(shards):
                continue
            d = claims.describe(k, gens[-1], now)
            if d is None:
                continue
            entry = {"shard": k, "worker": d.get("worker"), "host": d.get("host"),
                     "heartbeat_age": d["age"], "generation": d["generation"]}
            (holding if d["state"] in ("live", "ours") else stale).append(entry)
    return {"out": str(out), "split": manifest.get("dataset", {}).get("split"), "complete": bool(manifest.get("complete")),
            "shards": len(shards), "shards_done": done_shards, "images": len(ids), "images_done": done_images,
            "images_per_second": rate, "busy_seconds": busy,
            "eta_seconds": (left / rate if rate else None) if left else 0.0,
            "workers": workers, "holding": holding, "stale_claims": stale}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def summary_line(view: dict) -> str:
    """``shards 12/40, 13.2 img/s, ETA 4m05s`` (the line each worker shows next to its progress bar)."""
    rate = view["images_per_second"]
    return (f"shards {view['shards_done']}/{view['shards']}, "
            f"{'?' if rate is None else f'{rate:.3g}'} img/s, ETA {_duration(view['eta_seconds'])}")


def format_progress(view: dict) -> str:
    """The view as a short text table."""
    pct = 100.0 * view["images_done"] / max(view["images"], 1)
    rate = view["images_per_second"]
    lines = [(f"teacher progress of {view['out']} (split {view['split']}): {view['shards_done']}/{view['shards']} "
              f"shards, {view['images_done']:,}/{view['images']:,} images ({pct:.1f}%)"
              + (", complete" if view["complete"] and view["shards_done"] == view["shards"] else "")),
             (f"throughput {'unknown' if rate is None else f'{rate:.3g} images/s'} across workers "
              f"(over {_duration(view['busy_seconds'])} of labelling), ETA {_duration(view['eta_seconds'])}")]
    holds = {h["worker"]: h for h in view["holding"]}
    names = sorted(set(view["workers"]) | set(holds))
    if names:
        lines.append(f"{'worker':<28} {'host':<14} {'device':<8} {'shards':>6} {'images':>7} {'img/s':>7}  now")
        for name in names:
            w = view["workers"].get(name) or {"host": holds[name]["host"], "device": None, "shards": 0, "images": 0,
                                              "images_per_second": None}  # holds its first shard
            r = w.get("images_per_second")
            now = (f"shard {holds[name]['shard']} (heartbeat {holds[name]['heartbeat_age']:.0f} s ago)"
                   if name in holds else "-")
            lines.append(f"{name:<28} {w['host']!s:<14} {w['device']!s:<8} {w['shards']:>6} {w['images']:>7} "
                         f"{'-' if r is None else f'{r:.2f}':>7}  {now}")
    for c in view["stale_claims"]:
        lines.append(f"stale: shard {c['shard']} held by {c['worker']} on {c['host']} (no heartbeat for "
                     f"{c['heartbeat_age']:.0f} s, or its process is gone): the next worker to look takes it over")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        while True:
            view = progress_view(args.out)
            print(json.dumps(view, indent=2) if args.json else format_progress(view), flush=True)
            if args.watch is None or view["shards_done"] == view["shards"]:
                return 0
            time.sleep(max(args.watch, 0.1))
            print()
    except ProgressError as exc:
        print(f"nsdd-train teacher-progress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

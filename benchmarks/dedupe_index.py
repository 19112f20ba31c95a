"""Dedupe index at crawl scale: 10M pixel hashes across stages, peak RSS and throughput (issue #19, item 3).

Each stage goes through the index exactly as ``data_tools.ingest`` drives it: ``DedupeIndex.open`` with the
manifest so far, ``resume``, then per batch of ``LOOKUP_BATCH`` hashes ``StageDedupe.prefetch`` and the per-hash
``in_earlier_stage`` / ``in_this_stage`` / ``add``, ``commit_shard`` per ``--shard-size`` kept hashes, and at the
end the sorted ``hashes.txt`` streamed from the index, ``unique`` and ``finish_pending``. Only the images and
the tars are left out. A known share of each stage repeats hashes of the stage itself and of earlier stages;
the drop counts are asserted, so a fast wrong answer cannot pass.

Prints one JSON line: peak RSS (``ru_maxrss``; must be <= 1 GiB, else exit 1), hashes/s of lookup + insert,
per-stage seconds, the index's size on disk and the bytes written to disk (``ru_oublock``).

Usage::

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/dedupe_index.py [--hashes 10000000] [--stages 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.dedupe import CACHE_MIB, INDEX_NAME, DedupeIndex, StageDedupe, write_hashes_file
from data_tools.ingest import LOOKUP_BATCH

RSS_LIMIT_MIB = 1024
RESERVOIR = 65_536  # hashes remembered per pool to draw repeats from


class Stream:
    """A stage's hashes (hex): new random ones, and repeats drawn from this stage's and earlier stages' hashes."""

    def __init__(self, seed: int, dup_in: float, dup_across: float) -> None:
        self.rng = random.Random(seed)
        self.dup_in, self.dup_across = dup_in, dup_across
        self.earlier: list[str] = []  # a uniform sample of the finished stages' hashes
        self.seen_earlier = 0
        self.injected = {"duplicate_in_stage": 0, "duplicate_across_stages": 0, "new": 0}

    def stage(self, n: int) -> Iterator[str]:
        current: list[str] = []
        seen = 0
        for _ in range(n):
            r = self.rng.random()
            if r < self.dup_across and self.earlier:
                self.injected["duplicate_across_stages"] += 1
                yield self.rng.choice(self.earlier)
            elif self.dup_across <= r < self.dup_across + self.dup_in and current:
                self.injected["duplicate_in_stage"] += 1
                yield self.rng.choice(current)
            else:
                h = self.rng.randbytes(32).hex()
                self.injected["new"] += 1
                seen += 1
                _reservoir_add(current, h, seen, self.rng)
                yield h
        for h in current:  # the stage is finished: its sample joins the earlier stages' (sizes kept uniform enough)
            self.seen_earlier += 1
            _reservoir_add(self.earlier, h, self.seen_earlier, self.rng)


def _reservoir_add(pool: list[str], h: str, seen: int, rng: random.Random) -> None:
    if len(pool) < RESERVOIR:
        pool.append(h)
    else:
        j = rng.randrange(seen)
        if j < RESERVOIR:
            pool[j] = h


def _batches(items: Iterator[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def run_stage(root: Path, manifest: dict, stage: int, hashes: Iterator[str], shard_size: int) -> dict:
    """One stage through the index as ingest drives it; returns counts and seconds per phase."""
    t0 = time.perf_counter()
    counts = {"kept": 0, "duplicate_in_stage": 0, "duplicate_across_stages": 0}
    with DedupeIndex.open(root, manifest) as index:
        index.resume(stage, [], lambda i: [])
        t_open = time.perf_counter()
        dedupe = StageDedupe(index)
        shard = 0
        for batch in _batches(hashes, LOOKUP_BATCH):
            dedupe.prefetch(batch)
            for h in batch:
                if dedupe.in_earlier_stage(h):
                    counts["duplicate_across_stages"] += 1
                elif dedupe.in_this_stage(h):
                    counts["duplicate_in_stage"] += 1
                else:
                    dedupe.add(h)
                    counts["kept"] += 1
                    if len(dedupe.unflushed) >= shard_size:
                        dedupe.commit_shard(shard)
                        shard += 1
        if dedupe.unflushed:
            dedupe.commit_shard(shard)
        t_loop = time.perf_counter()
        rel = f"shards/stage_{stage:02d}/hashes.txt"
        sha = write_hashes_file(root / rel, index.pending_sorted())
        unique = index.unique()
        manifest["stages"].append({"stage": stage, "dir": f"shards/stage_{stage:02d}", "hashes": rel})
        index.finish_pending(stage, root / rel, sha)
    t_end = time.perf_counter()
    return {
        **counts,
        "unique": unique,
        "open_s": round(t_open - t0, 2),
        "lookup_insert_s": round(t_loop - t_open, 2),
        "finish_s": round(t_end - t_loop, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hashes", type=int, default=10_000_000, help="hashes looked up, all stages together")
    p.add_argument("--stages", type=int, default=5)
    p.add_argument("--shard-size", type=int, default=1000, help="hashes per committed shard (ingest's default)")
    p.add_argument("--dup-in", type=float, default=0.02, help="share of each stage repeating its own hashes")
    p.add_argument("--dup-across", type=float, default=0.03, help="share of stages 2+ repeating earlier stages")
    p.add_argument("--dir", type=Path, default=None, help="DATA_ROOT to build in (default: a temp dir, removed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tmp = None if args.dir else tempfile.mkdtemp(prefix="dedupe_bench_")
    root = args.dir or Path(tmp)
    root.mkdir(parents=True, exist_ok=True)
    try:
        stream = Stream(args.seed, args.dup_in, args.dup_across)
        manifest: dict = {"stages": []}
        per_stage = []
        t0 = time.perf_counter()
        for stage in range(1, args.stages + 1):
            n = args.hashes // args.stages + (args.hashes % args.stages if stage == args.stages else 0)
            res = run_stage(root, manifest, stage, stream.stage(n), args.shard_size)
            per_stage.append({"stage": stage, "hashes": n, **res})
            print(json.dumps(per_stage[-1]), file=sys.stderr, flush=True)
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        rss_peak = usage.ru_maxrss / 1024  # KiB on Linux
        got = {k: sum(s[k] for s in per_stage) for k in ("kept", "duplicate_in_stage", "duplicate_across_stages")}
        want = {"kept": stream.injected["new"], **{k: v for k, v in stream.injected.items() if k != "new"}}
        assert got == want, f"dedupe counts {got} != injected {want}"
        assert per_stage[-1]["unique"] == want["kept"], (per_stage[-1]["unique"], want["kept"])
        conn = sqlite3.connect(root / INDEX_NAME)
        assert conn.execute("SELECT COUNT(*) FROM hashes").fetchone()[0] == want["kept"]
        conn.close()
        loop_s = sum(s["lookup_insert_s"] for s in per_stage)
        info = {
            "benchmark": "dedupe_index",
            "hashes": args.hashes,
            "stages": args.stages,
            "shard_size": args.shard_size,
            "lookup_batch": LOOKUP_BATCH,
            "cache_mib": CACHE_MIB,
            **got,
            "peak_rss_mib": round(rss_peak, 1),
            "rss_after_imports_mib": round(rss_start, 1),
            "lookup_insert_hashes_per_s": round(args.hashes / loop_s),
            "overall_hashes_per_s": round(args.hashes / wall),
            "wall_s": round(wall, 1),
            "finish_s": round(sum(s["finish_s"] for s in per_stage), 1),
            "open_s": round(sum(s["open_s"] for s in per_stage), 1),
            "index_mib": round((root / INDEX_NAME).stat().st_size / 2**20, 1),
            "hashes_txt_mib": round(sum(f.stat().st_size for f in root.glob("shards/*/hashes.txt")) / 2**20, 1),
            "disk_writes_gib": round(usage.ru_oublock * 512 / 2**30, 1),  # what reached the block layer
            "sqlite": sqlite3.sqlite_version,
            "python": platform.python_version(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        }
        print(json.dumps(info))
        if rss_peak > RSS_LIMIT_MIB:
            print(f"peak RSS {rss_peak:.0f} MiB is over the {RSS_LIMIT_MIB} MiB bound", file=sys.stderr)
            return 1
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

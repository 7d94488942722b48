"""What verifying a reference cache costs: sha256 of every shard against the manifest, on ~1 GB.

    PYTHONPATH=. .venv/bin/python bench/verify_bench.py [--gb 1.0] [--shards 64] [--repeats 3]
                                                        [--dir /tmp] [--out bench/results/verify.json]

Every reader of a cache (train, audit, score's resume) calls ``trust.verified_refscores(dir)``
before it reads a byte: presence and sha256 of each shard against the manifest, hashed at most
once per file per process (``store.sha256_verified``). This builds a synthetic cache in the real
format -- ``--shards`` Parquet shards of 4096 rows with the score stage's schema (per-token
log-probs included, random float32, zstd, written by ``store.write_parquet``) totalling ``--gb``
on disk, and a manifest as ``pipeline.score.stage`` writes it -- under a temporary folder in ``--dir``
(free space is checked first; the folder is deleted at the end), then times, each in a fresh
process so that nothing is memoized:

- ``verified_refscores``, first call of the process, and a second call in the same process
  (memoized: only stat() calls);
- for comparison, with no hashing: reading every shard whole with pyarrow, reading only the
  columns training reads (id, sums, token counts), and reading the raw bytes (1 MiB blocks);
- the sha256 speed of this CPU on a buffer in memory (the ceiling of verification).

The page cache cannot be dropped here (no root), and the files were just written, so the main
rows run with the files in the page cache ("warm page cache"): they measure hashing, not the disk.
One more run first evicts the files with posix_fadvise(DONTNEED) (best effort: the kernel may
keep pages, and a VM's host may still cache them) to show what a disk read adds. Prints a table
(GB, shards, seconds, GB/s, median of the repeats) and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, bench_parser, finish

SHARD_ROWS = 4096
TRAIN_COLUMNS = ["id", "chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens"]


# --- building the synthetic cache ----------------------------------------------------------------


def _shard(index: int, mean_tokens: int, rng):
    import numpy as np
    import pyarrow as pa

    from pipeline.score.stage import scores_schema

    columns = {}
    columns["id"] = pa.array([f"{index:05d}{row:011x}" for row in range(SHARD_ROWS)], pa.string())
    for side in ("chosen", "rejected"):
        lengths = rng.integers(1, 2 * mean_tokens, SHARD_ROWS).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = -rng.exponential(2.0, int(offsets[-1])).astype(np.float32)  # log-probs: <= 0
        sums = np.add.reduceat(values.astype(np.float64), offsets[:-1])
        columns[f"{side}_logp"] = pa.array(sums, pa.float64())
        columns[f"{side}_tokens"] = pa.array(lengths, pa.int32())
        columns[f"{side}_token_logps"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    schema = scores_schema(True)
    return pa.table([columns[name] for name in schema.names], schema=schema)


def build_cache(storage: Path, gb: float, n_shards: int) -> Path:
    """A complete refscores directory of ``n_shards`` shards totalling about ``gb`` GB."""
    import numpy as np

    from pipeline.score.stage import scores_schema
    from pipeline.storage import paths
    from pipeline.storage.shards import ShardPlan
    from pipeline.store import ensure_dir, fingerprint, write_manifest, write_parquet

    inputs = {
        "kind": "refscores",
        "schema_version": paths.REFSCORES_SCHEMA_VERSION,
        "dataset_fingerprint": hashlib.sha256(b"synthetic dataset").hexdigest(),
        "model": {"config_sha256": hashlib.sha256(b"config").hexdigest(),
                  "weights": {"model.safetensors": hashlib.sha256(b"weights").hexdigest()}},
        "dtype": "float32",
        "backend": "transformers",
        "store_token_logps": True,
        "shard_rows": SHARD_ROWS,
    }
    out_dir = ensure_dir(paths.refscores_dir(storage, fingerprint(inputs)))
    rng = np.random.default_rng(0)
    per_shard = gb * 1e9 / n_shards
    mean_tokens = max(1, int(per_shard / (2 * SHARD_ROWS * 4)))  # float32 per token, two sides
    shards, sharding = [], ShardPlan(n_shards * SHARD_ROWS, SHARD_ROWS)
    for index in range(n_shards):
        table = _shard(index, mean_tokens, rng)
        name = ShardPlan.file(index)
        sha = write_parquet(table, out_dir / name, table.num_rows, {"dpo.shard": str(index)})
        if index == 0:  # zstd squeezes the exponents a little: aim the rest at the target size
            mean_tokens = max(1, round(mean_tokens * per_shard / (out_dir / name).stat().st_size))
        shards.append({"file": name, "first_row": sharding.rows_of(index).start, "rows": table.num_rows, "sha256": sha,
                       "chosen_tokens": int(sum(table.column("chosen_tokens").to_pylist())),
                       "rejected_tokens": int(sum(table.column("rejected_tokens").to_pylist()))})
        print(f"\rwriting shard {index + 1}/{n_shards}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    write_manifest(out_dir, {
        "kind": "refscores", "fingerprint": out_dir.name, "inputs": inputs, "model_path": "(synthetic)",
        "rows": sum(s["rows"] for s in shards), "columns": scores_schema(True).names,
        "versions": paths.library_versions(),
        "settings": {"device": "cpu", "tokens_per_batch": 2048, "prefix_sharing": True},
        "shards": shards,
        "tokens": {side: sum(s[f"{side}_tokens"] for s in shards) for side in ("chosen", "rejected")},
        "complete": True,
    })
    return out_dir


# --- measurements, each in a fresh process ---------------------------------------------------------


def _shard_paths(cache_dir: Path) -> list[Path]:
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    return [cache_dir / s["file"] for s in manifest["shards"]]


def _evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(mode: str, cache_dir: Path, evict: bool) -> dict:
    """Seconds of one measurement, in this (fresh) process."""
    paths = _shard_paths(cache_dir)
    if evict:
        _evict(paths)
    if mode == "verify":
        from pipeline.storage import trust

        start = time.perf_counter()
        trust.verified_refscores(cache_dir)
        first = time.perf_counter() - start
        start = time.perf_counter()
        trust.verified_refscores(cache_dir)
        return {"first": first, "second": time.perf_counter() - start}
    if mode in ("read_all", "read_train"):
        import pyarrow.parquet as pq

        columns = TRAIN_COLUMNS if mode == "read_train" else None
        start = time.perf_counter()
        rows = sum(pq.read_table(path, columns=columns).num_rows for path in paths)
        return {"first": time.perf_counter() - start, "rows": rows}
    if mode == "raw":
        start = time.perf_counter()
        for path in paths:
            with open(path, "rb", buffering=0) as fh:
                while fh.read(1 << 20):
                    pass
        return {"first": time.perf_counter() - start}
    if mode == "sha256_memory":
        buffer = os.urandom(256 << 20)
        start = time.perf_counter()
        digest = hashlib.sha256()
        for offset in range(0, len(buffer), 1 << 20):
            digest.update(buffer[offset : offset + (1 << 20)])
        return {"first": time.perf_counter() - start, "bytes": len(buffer)}
    raise ValueError(mode)


def _child(mode: str, cache_dir: Path, evict: bool = False) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--cache", str(cache_dir)] + (["--evict"] if evict else []),
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"measurement {mode} failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, "verify.json")
    parser.add_argument("--gb", type=float, default=1.0, help="size of the synthetic cache on disk")
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp", help="where to build the temporary cache")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--evict", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


@dataclasses.dataclass
class Measured:
    """The synthetic cache (bytes, shards, seconds to build) and every measurement's results."""

    size: int
    shards: int
    build_seconds: float
    runs: dict[str, list[dict]]
    evicted: dict[str, dict]

    def median(self, mode: str, key: str = "first") -> float:
        return statistics.median(r[key] for r in self.runs[mode])


def measure_all(args: argparse.Namespace) -> Measured:
    """Build the cache in a temporary folder of --dir; --repeats fresh processes per mode, then the
    evicted runs; the folder is deleted."""
    with tempfile.TemporaryDirectory(prefix="dpo-verify-bench-", dir=args.dir) as tmp:
        os.environ["DPO_HASH_CACHE"] = tmp  # keep the on-disk hash cache out of it (and out of ~)
        start = time.perf_counter()
        cache_dir = build_cache(Path(tmp), args.gb, args.shards)
        build_seconds = time.perf_counter() - start
        paths = _shard_paths(cache_dir)
        size = sum(p.stat().st_size for p in paths)
        _child("raw", cache_dir)  # everything in the page cache before the timed runs
        runs: dict[str, list[dict]] = {m: [] for m in ("verify", "read_all", "read_train", "raw", "sha256_memory")}
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(_child(mode, cache_dir))
        evicted = {"verify": _child("verify", cache_dir, evict=True), "raw": _child("raw", cache_dir, evict=True)}
    return Measured(size, len(paths), build_seconds, runs, evicted)


def result_rows(m: Measured) -> list[tuple[str, float, float]]:
    """(case, GB, seconds) per row of the table."""
    gb = m.size / 1e9
    memory_gb = m.runs["sha256_memory"][0]["bytes"] / 1e9
    return [
        ("verified_refscores, 1st call in a process", gb, m.median("verify")),
        ("verified_refscores, 2nd call (memoized)", gb, m.median("verify", "second")),
        ("pyarrow read_table, all columns", gb, m.median("read_all")),
        ("pyarrow read_table, train's 5 columns", gb, m.median("read_train")),
        ("raw read of the bytes, no hashing", gb, m.median("raw")),
        ("sha256 of a buffer in memory (CPU ceiling)", memory_gb, m.median("sha256_memory")),
        ("verified_refscores, 1st call, after fadvise", gb, m.evicted["verify"]["first"]),
        ("raw read, after fadvise", gb, m.evicted["raw"]["first"]),
    ]


def print_table(args: argparse.Namespace, m: Measured, rows: list[tuple[str, float, float]]) -> None:
    print(f"\nsynthetic reference cache: {m.shards} shards x {SHARD_ROWS} rows, {m.size / 1e9:.2f} GB "
          f"(zstd Parquet with per-token log-probs), built in {m.build_seconds:.0f} s; {os.cpu_count()} CPUs; "
          f"warm page cache unless 'after fadvise'; median of {args.repeats} fresh processes\n")
    print(f"{'case':<46}{'GB':>7}{'shards':>8}{'seconds':>10}{'GB/s':>8}")
    for name, size_gb, seconds in rows:
        shards = "-" if "memory" in name else str(m.shards)
        rate = f"{size_gb / seconds:>8.2f}" if seconds > 1e-3 else f"{'-':>8}"
        print(f"{name:<46}{size_gb:>7.2f}{shards:>8}{seconds:>10.4f}{rate}")


def main() -> int:
    args = parse_args()
    if args.child:
        print(json.dumps(measure(args.child, Path(args.cache), args.evict)))
        return 0

    free = shutil.disk_usage(args.dir).free
    if free < 1.5 * args.gb * 1e9:
        print(f"{args.dir} has {free / 1e9:.1f} GB free; {1.5 * args.gb:.1f} GB needed", file=sys.stderr)
        return 1
    m = measure_all(args)
    rows = result_rows(m)
    print_table(args, m, rows)
    report = {
        "bench": "verify",
        "cache": {"bytes": m.size, "shards": m.shards, "rows_per_shard": SHARD_ROWS, "store_token_logps": True,
                  "build_seconds": m.build_seconds},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "page_cache": "warm (files just written and read once); 'after fadvise' rows: posix_fadvise DONTNEED first",
        "results": [{"case": name, "gb": size_gb, "seconds": seconds, "gb_per_s": size_gb / seconds if seconds else None}
                    for name, size_gb, seconds in rows],
        "runs": m.runs,
        "evicted": m.evicted,
    }
    return finish(args.out, report)


if __name__ == "__main__":
    sys.exit(main())

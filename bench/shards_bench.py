"""Many shards: what scoring, resuming, verifying, `dpo status` and the train stage's read cost
when a cache has 10,000 shards (1 row each, the demo's tiny model: the per-shard overheads,
not the model, dominate).

  PYTHONPATH=. .venv/bin/python bench/shards_bench.py [--rows 10000] [--workers 1]

Steps, each timed (every step after the first in a fresh process, as a user's next command):
  score       the first, complete scoring (shard_rows 1)
  up to date  `score` again: every shard verified against the manifest (sha256), nothing scored
  resume      1% of the shards deleted and the manifest marked incomplete (as a crash leaves
              it): verify the rest, score the missing
  status      `dpo status -c CONFIG`
  train read  the train stage's join of the dataset with every shard (load_split_data)
Prints a table and writes JSON to bench/results/shards.json (or --out).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, bench_parser, finish

STEP = """
import sys, time, json
sys.path.insert(0, {root!r})
from pipeline.config.load import load_config
cfg = load_config({config!r})
started = time.perf_counter()
{body}
print(json.dumps({{"seconds": time.perf_counter() - started}}))
"""

BODIES = {
    "score": "from pipeline.score.stage import score\nr = score(cfg, show_progress=False)",
    "up to date": "from pipeline.score.stage import score\nr = score(cfg, show_progress=False)\nassert r.skipped",
    "resume": "from pipeline.score.stage import score\nr = score(cfg, show_progress=False)\nassert not r.skipped",
    "train read": ("from pipeline.storage import locate, trust\nfrom pipeline.train.batches import load_split_data\n"
                   "d = locate.find_dataset(cfg)\nfp = trust.verified_dataset(d)['fingerprint']\n"
                   "splits, _ = load_split_data(d, locate.find_refscores(cfg, fp))"),
}


def timed_step(name: str, config: Path) -> float:
    code = STEP.format(root=str(ROOT), config=str(config), body=BODIES[name])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> int:
    parser = bench_parser(__doc__, "shards.json")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    import yaml

    from pipeline.config.load import config_from_dict
    from pipeline.models.assets import build_demo_assets, demo_preferences
    from pipeline.prepare.stage import prepare

    root = Path(tempfile.mkdtemp(prefix="shards-bench-"))
    assets = build_demo_assets(root / "demo")
    rows = demo_preferences(args.rows, seed=1)
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"storage": str(root / "storage"), "data": {"path": str(data), "eval_fraction": 0.0},
              "model": {"path": str(assets["model"])}, "tokenize": {"max_length": 128, "max_prompt_length": 64},
              "score": {"shard_rows": 1, "backend": "transformers", "workers": args.workers}}
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    prepared = prepare(config_from_dict(config), show_progress=False)
    kept = prepared.manifest["counts"]["kept"]

    results = {"rows": kept, "shards": kept, "workers": args.workers}
    results["score"] = timed_step("score", config_path)
    cache = next((root / "storage" / "refscores").iterdir())
    results["cache_mb"] = sum(p.stat().st_size for p in cache.iterdir()) / 1e6
    results["manifest_mb"] = (cache / "manifest.json").stat().st_size / 1e6
    results["up to date"] = timed_step("up to date", config_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    removed = manifest["shards"][:: 100]
    for shard in removed:
        (cache / shard["file"]).unlink()
    manifest["complete"] = False
    manifest["shards"] = [s for s in manifest["shards"] if s not in removed]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    results["resume_missing_shards"] = len(removed)
    results["resume"] = timed_step("resume", config_path)
    started = time.perf_counter()
    status = subprocess.run([str(Path(sys.executable).parent / "dpo"), "status", "-c", str(config_path)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    results["status"] = time.perf_counter() - started
    if status.returncode != 0:
        raise RuntimeError(status.stderr)
    results["train read"] = timed_step("train read", config_path)

    print(f"\n{kept} rows, {kept} shards (1 row each), {args.workers} worker(s); cache {results['cache_mb']:.1f} MB, "
          f"manifest {results['manifest_mb']:.2f} MB")
    print(f"{'step':<12}{'seconds':>10}")
    for step in ("score", "up to date", "resume", "status", "train read"):
        print(f"{step:<12}{results[step]:>10.2f}")
    return finish(args.out, results)


if __name__ == "__main__":
    sys.exit(main())

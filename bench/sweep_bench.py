"""`dpo sweep` against the same trainings as separate `dpo run` commands, wall time.

    .venv/bin/python bench/sweep_bench.py [--max-steps 60] [--skip-parallel]
        [--out bench/results/sweep.json]
    (or `make bench-sweep`)

The built-in demo (``pipeline.models.assets.build_demo_assets``: the tiny demo model and its 600
preference pairs, the config of `dpo demo`: eval_fraction 0.1, max_length 128 / max_prompt_length
64, train ``DEMO_TRAIN`` with ``--max-steps`` steps) trained at the 4 points of
``--grid train.beta=0.05,0.1 --grid train.loss_type=sigmoid,ipo``, three ways, each on a fresh
storage and its own PREFECT_HOME:

- A "sweep": `dpo sweep -c CFG --grid ... --no-progress` (prepare, score, audit once, then one
  child `dpo train` per point, one at a time: sweep.max_parallel's default on a CPU);
- B "sweep, max_parallel=2": the same with `--set sweep.max_parallel=2` (two points share the cores;
  left out with ``--skip-parallel``);
- C "4 x dpo run": `dpo run -c CFG --set train.beta=B --set train.loss_type=L
  --set train.run_name=run-B-L --no-progress` for each point, one after another (the first runs
  prepare, score and audit; the next three find them up to date and skip them).

Every `dpo` command is its own process and starts Prefect's ephemeral API server (no
PREFECT_API_URL): that start-up is part of what is measured, once for a sweep and four times for
C, as a user pays it. Wall time: ``time.perf_counter`` around each command. Checked: the three
scenarios trained the same 4 runs (the sets of run.json fingerprints under storage/runs/*/ are
equal); reported: the final eval loss of each point in each scenario. Prints a table and writes
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, bench_parser, finish

DPO = str(Path(sys.executable).parent / "dpo")
GRID = {"train.beta": [0.05, 0.1], "train.loss_type": ["sigmoid", "ipo"]}
BASELINE = "4 x dpo run"


def points() -> list[dict]:
    """The grid's product, as `dpo sweep` makes it: [{"train.beta": 0.05, "train.loss_type": "sigmoid"}, ...]."""
    from pipeline.config.sweep import SweepConfig

    from flows.sweep_plan import point_overrides

    return point_overrides(SweepConfig(grid=GRID))


def grid_args() -> list[str]:
    return [arg for key, values in GRID.items() for arg in ("--grid", f"{key}={','.join(map(str, values))}")]


def write_config(directory: Path, assets: dict, max_steps: int, sweep: bool) -> Path:
    """The demo's config with storage ``directory/storage``; the sweep's has no train.run_name."""
    import yaml

    from pipeline.models.assets import DEMO_TRAIN

    train = dict(DEMO_TRAIN, max_steps=max_steps)
    if sweep:
        train.pop("run_name")  # the sweep names its runs
    config = directory / ("sweep.yaml" if sweep else "run.yaml")
    config.write_text(yaml.safe_dump({
        "storage": str(directory / "storage"),
        "data": {"path": str(assets["data"]), "eval_fraction": 0.1},
        "model": {"path": str(assets["model"])},
        "tokenize": {"max_length": 128, "max_prompt_length": 64},
        "train": train,
    }))
    return config


def run_dpo(argv: list[str], env: dict) -> float:
    """Wall seconds of `dpo ARGV` (output captured; the stderr tail printed when it fails)."""
    start = time.perf_counter()
    try:
        subprocess.run([DPO, *argv], check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    except subprocess.CalledProcessError as exc:
        sys.stderr.write(f"`dpo {' '.join(argv)}` failed (exit {exc.returncode}); its stderr ends:\n")
        sys.stderr.write(exc.stderr[-4000:])
        raise
    return time.perf_counter() - start


def scenario_env(directory: Path) -> dict:
    """This process's environment with a PREFECT_HOME of the scenario's own (and no Prefect server)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return dict(env, PREFECT_HOME=str(directory / "prefect-home"), PYTHONPATH=str(ROOT))


def run_sweep(directory: Path, assets: dict, args: argparse.Namespace, extra: list[str]) -> dict:
    """Scenario A (``extra`` empty) or B: one `dpo sweep` on a fresh storage."""
    config = write_config(directory, assets, args.max_steps, sweep=True)
    seconds = run_dpo(["sweep", "-c", str(config), *grid_args(), *extra, "--no-progress"],
                      scenario_env(directory))
    return {"wall_s": seconds, "command_s": [seconds], "runs": read_runs(directory / "storage")}


def run_separately(directory: Path, assets: dict, args: argparse.Namespace) -> dict:
    """Scenario C: `dpo run` once per point, one after another, on a fresh storage."""
    config = write_config(directory, assets, args.max_steps, sweep=False)
    env, each = scenario_env(directory), []
    for point in points():
        beta, loss = point["train.beta"], point["train.loss_type"]
        sets = [f"train.beta={beta}", f"train.loss_type={loss}", f"train.run_name=run-{beta}-{loss}"]
        each.append(run_dpo(["run", "-c", str(config), *[a for s in sets for a in ("--set", s)], "--no-progress"],
                            env))
        print(f"    dpo run beta={beta} loss_type={loss}: {each[-1]:.1f} s", flush=True)
    return {"wall_s": sum(each), "command_s": each, "runs": read_runs(directory / "storage")}


def read_runs(storage: Path) -> list[dict]:
    """Each run under storage/runs/: its point, fingerprint and final eval loss, sorted by point."""
    runs = []
    for path in sorted((storage / "runs").glob("*/run.json")):
        summary = json.loads(path.read_text())
        train = summary["inputs"]["train"]
        runs.append({"run": path.parent.name, "point": f"beta={train['beta']} loss_type={train['loss_type']}",
                     "fingerprint": summary["fingerprint"],
                     "final_eval_loss": (summary.get("final_eval") or {}).get("eval/loss")})
    return sorted(runs, key=lambda run: run["point"])


def check_same_runs(results: dict[str, dict]) -> None:
    """Every scenario trained the same 4 runs: equal sets of run fingerprints."""
    expected = {run["fingerprint"] for run in results[BASELINE]["runs"]}
    assert len(expected) == len(points()), f"{BASELINE} made {len(expected)} runs, not {len(points())}"
    for name, result in results.items():
        got = {run["fingerprint"] for run in result["runs"]}
        assert got == expected, (f"scenario {name!r} trained other runs than {BASELINE!r}: "
                                 f"only in {name!r}: {sorted(got - expected)}, "
                                 f"only in {BASELINE!r}: {sorted(expected - got)}")


def print_tables(results: dict[str, dict], machine: dict) -> None:
    base = results[BASELINE]["wall_s"]
    print(f"\nmachine: {machine['cpu_count']} CPUs, {machine['platform']}, python {machine['python']}")
    print(f"\n{'scenario':<26}{'wall s':>9}{'vs 4 x dpo run':>16}{'runs':>6}")
    for name, result in results.items():
        print(f"{name:<26}{result['wall_s']:>9.1f}{result['wall_s'] / base:>16.2f}{len(result['runs']):>6}")
    print("\nfinal eval loss per point")
    print(f"{'point':<32}" + "".join(f"{name:>26}" for name in results))
    for point in [run["point"] for run in results[BASELINE]["runs"]]:
        losses = [next((r["final_eval_loss"] for r in result["runs"] if r["point"] == point), None)
                  for result in results.values()]
        print(f"{point:<32}" + "".join(f"{loss:>26.4f}" if loss is not None else f"{'-':>26}" for loss in losses))


def parse_args() -> argparse.Namespace:
    from pipeline.models.assets import DEMO_TRAIN

    parser = bench_parser(__doc__, "sweep.json", whole_doc=True)
    parser.add_argument("--max-steps", type=int, default=DEMO_TRAIN["max_steps"], help="steps per run")
    parser.add_argument("--skip-parallel", action="store_true", help="leave out the sweep with max_parallel=2")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    from pipeline.models.assets import build_demo_assets

    scenarios = [("sweep", lambda d, a: run_sweep(d, a, args, []))]
    if not args.skip_parallel:
        parallel = ["--set", "sweep.max_parallel=2"]
        scenarios.append(("sweep, max_parallel=2", lambda d, a: run_sweep(d, a, args, parallel)))
    scenarios.append((BASELINE, lambda d, a: run_separately(d, a, args)))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as name:
        tmp = Path(name)
        assets = build_demo_assets(tmp / "demo")
        for index, (scenario, run) in enumerate(scenarios):
            print(f"  {scenario} ...", flush=True)
            directory = tmp / f"scenario-{index}"
            directory.mkdir()
            results[scenario] = run(directory, assets)
            print(f"  {scenario}: {results[scenario]['wall_s']:.1f} s", flush=True)
            shutil.rmtree(directory / "storage")  # the weights: keep the temp dir small
    check_same_runs(results)
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    print_tables(results, machine)
    ratios = {name: result["wall_s"] / results[BASELINE]["wall_s"] for name, result in results.items()}
    return finish(args.out, {"bench": "sweep", "grid": GRID, "max_steps": args.max_steps, "machine": machine,
                             "scenarios": results, "ratio_vs_separate": ratios})


if __name__ == "__main__":
    sys.exit(main())

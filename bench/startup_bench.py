"""Fixed costs of `dpo score` and `dpo train`: where the seconds go before (and after) the work.

    .venv/bin/python bench/startup_bench.py [--rows 32] [--repeats 2] [--threads 2] [--steps 1]
        [--label before|after] [--append] [--cold-hash] [--out bench/results/startup.json]

SmolLM2-135M-Instruct (``pipeline.models.assets.smollm2_folder()``, float32) on the first ``--rows`` rows
of HH-RLHF harmless-base (test split, ../shared/data), prepared once into a temporary storage. Then,
``--repeats`` times: `dpo score` (its cache deleted first) and `dpo train` (``--steps`` steps, its
run folder deleted first), each in its own process with ``OMP_NUM_THREADS`` = ``--threads``, as a
user runs them.

Each stage process is this script in child mode: it imports ``flows.cli`` and ``flows.cli.commands``
(timed), wraps the library functions of each start-up phase with a timer (the same function
objects, replaced wherever a module holds them: nothing in the library changes), then calls
``flows.cli.main()`` with the stage's arguments in ``sys.argv``, as the `dpo` script does. Every
phase is inclusive (``model fingerprint`` within ``score identity``; the ``sha256 ...`` rows count
the hashing inside the phases above them), in seconds, median over the repeats (calls in
brackets). ``python start``: from just before the parent starts the process to the child's first
line; ``command``: from calling ``main`` to the exit handlers; ``exit``: from there to the parent
seeing the process end (the interpreter's teardown). Also measured: ``python -c pass``,
``dpo --help``, and the biggest imports of ``flows.cli.commands`` (``python -X importtime``).

Before/after: run it in each tree with the same ``--out`` and its own ``--label``; ``--append``
adds the repeats to the label's earlier ones, so that runs of the two trees can alternate (the
load of the machine changes). Each tree wants its own file-hash cache (DPO_HASH_CACHE) when the
two key it differently. ``--cold-hash``: the first repeat runs with an empty file-hash cache, as
on a machine that never hashed these weights.
"""

from __future__ import annotations

import time

T_FIRST_LINE = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from _common import ROOT, bench_parser, finish, hh_slice  # noqa: E402

# (module, attribute or Class.method, phase) in the order a run meets them.
PHASES = [
    ("pipeline.config.load", "load_config", "config load"),
    ("pipeline.storage.locate", "find_dataset", "locate dataset"),
    ("pipeline.storage.paths", "dataset_identity", "dataset identity (data, tokenizer files)"),
    ("pipeline.storage.trust", "verified_dataset", "verify dataset manifest"),
    ("pipeline.storage.paths", "refscores_identity", "score identity"),
    ("pipeline.storage.locate", "find_refscores", "locate reference cache"),
    ("pipeline.storage.trust", "verified_refscores", "verify cache manifest"),
    ("pipeline.models.loading", "model_fingerprint", "model fingerprint"),
    ("pipeline.store", "sha256_file", lambda a, k: "sha256 (file-hash cache)"
     if k.get("use_cache", a[1] if len(a) > 1 else True) else "sha256 (uncached)"),
    ("pipeline.store", "sha256_verified", "sha256 (once per process)"),
    ("pipeline.models.loading", "check_causal_lm", "model config check"),
    ("pipeline.models.loading", "load_tokenizer", "tokenizer load"),
    ("pipeline.logprobs.backends.transformers_backend", "TransformersScorer.__init__", "scorer init"),
    ("pipeline.models.loading", "load_causal_lm", "model load"),
    ("pipeline.logprobs.backends.transformers_backend", "TransformersScorer._self_check", "scorer self-check"),
    ("pipeline.workers", "run_shards", "shards (scorer init + scoring)"),
    ("pipeline.score.stage", "score", "score stage"),
    ("pipeline.train.stage", "_identify", "train identity (verify, fingerprints)"),
    ("pipeline.train.stage", "load_split_data", "load_split_data"),
    ("pipeline.train.stage", "build_trainer", "build trainer"),
    ("pipeline.train.stage", "step0_check", "step-0 check"),
    ("pipeline.train.evaluator", "Evaluator.evaluate", "eval"),
    ("pipeline.train.trainer", "Trainer.train_step", "train steps"),
    ("pipeline.train.stage", "_finish", "finish (final/, run.json)"),
    ("pipeline.train.stage", "train", "train stage"),
]


# --- child: one stage, timed ---------------------------------------------------------------------


def _timed(fn, label, events: list[dict], depth: list[int]):
    """``fn`` recording its calls into ``events`` (phase, start, end, nesting depth)."""

    def wrapper(*args, **kwargs):
        start = time.time()
        depth[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            depth[0] -= 1
            phase = label(args, kwargs) if callable(label) else label
            events.append({"phase": phase, "start": start, "end": time.time(), "depth": depth[0]})

    wrapper.__wrapped__ = fn
    return wrapper


def install_timers(events: list[dict]) -> None:
    """Wrap the function of each of PHASES with a timer, wherever a module holds it."""
    import importlib

    depth = [0]
    for module_name, attr, label in PHASES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owner, name = module, attr
        if "." in attr:
            owner_name, name = attr.split(".")
            owner = getattr(module, owner_name, None)
            if owner is None or not hasattr(owner, name):
                continue
            setattr(owner, name, _timed(getattr(owner, name), label, events, depth))
            continue
        original = getattr(module, attr, None)
        if original is None:
            continue
        wrapped = _timed(original, label, events, depth)
        for held in list(sys.modules.values()):  # every `from .x import f` holds its own reference
            namespace = getattr(held, "__dict__", None)
            if namespace is not None and (held.__name__ or "").split(".")[0] in ("pipeline", "flows"):
                for key, value in list(namespace.items()):
                    if value is original:
                        namespace[key] = wrapped


def child(stage: str, config: str, out: str) -> None:
    spawn = float(os.environ["BENCH_SPAWN"])
    events: list[dict] = []
    marks = {"python start": (spawn, T_FIRST_LINE)}
    t = time.time()
    import flows.cli.main

    marks["import flows.cli"] = (t, time.time())
    t = time.time()
    import flows.cli.commands  # noqa: F401  (what flows.cli.main imports before running a command)

    marks["import flows.cli.commands"] = (t, time.time())
    install_timers(events)

    # As the `dpo` program runs it: main() reads sys.argv (and may end the process itself, after
    # the exit handlers: the record is written by one).
    sys.argv = ["dpo", stage, "-c", config, "--no-progress"]
    t = time.time()

    def record() -> None:
        end = time.time()
        marks["command"] = (t, end)
        Path(out).write_text(json.dumps({"spawn": spawn, "marks": marks, "events": events, "end": end}))

    import atexit

    atexit.register(record)
    flows.cli.main.main()


# --- parent --------------------------------------------------------------------------------------


def run_timed(cmd: list[str], env: dict, log: Path, cwd: Path) -> float:
    started = time.time()
    env = dict(env, BENCH_SPAWN=repr(started))
    with open(log, "w") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    ended = time.time()
    if code:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"{' '.join(cmd)} failed ({code}); log {log}")
    return ended


def phases_of(record: dict, ended: float) -> dict[str, dict]:
    """phase -> {"s": inclusive seconds summed over calls, "calls": n}, plus the derived rows."""
    result: dict[str, dict] = {}
    for label, (a, b) in record["marks"].items():
        result[label] = {"s": b - a, "calls": 1}
    for event in record["events"]:
        entry = result.setdefault(event["phase"], {"s": 0.0, "calls": 0})
        # A phase nested in itself (a recursive call) would count twice: only outermost calls.
        entry["s"] += event["end"] - event["start"]
        entry["calls"] += 1
    first_step = min((e["start"] for e in record["events"] if e["phase"] == "train steps"), default=None)
    if first_step is not None:
        result["until the first step"] = {"s": first_step - record["spawn"], "calls": 1}
    init = result.get("scorer init", {}).get("s")
    if init is not None:
        probe = init - result.get("model load", {}).get("s", 0.0) - result.get("LM-head self-check", {}).get("s", 0.0)
        result["prefix-sharing probe (scorer init - load - head check)"] = {"s": probe, "calls": 1}
    result["exit"] = {"s": ended - record["end"], "calls": 1}
    result["process wall"] = {"s": ended - record["spawn"], "calls": 1}
    return result


def importtime(python: str, env: dict, cwd: Path, top: int = 10) -> list[dict]:
    """The biggest packages `import flows.cli.commands` pulls in (cumulative seconds, from -X importtime):
    top-level packages outside the standard library, wherever in the import tree they load."""
    proc = subprocess.run([python, "-X", "importtime", "-c", "import flows.cli.commands"], env=env, cwd=cwd,
                          capture_output=True, text=True, check=True)
    packages: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        parts = line.split(":", 1)[-1].split("|")
        if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].strip()
        if "." not in name and not name.startswith("_") and name not in sys.stdlib_module_names:
            packages[name] = max(packages.get(name, 0.0), int(parts[1]) / 1e6)
    return [{"package": k, "s": v} for k, v in sorted(packages.items(), key=lambda kv: -kv[1])[:top]]


def prepared_storage(args, tmp: Path, env: dict) -> Path:
    import yaml

    from pipeline.models.assets import smollm2_folder

    data = hh_slice(tmp, args.rows)
    config = tmp / "startup.yaml"
    config.write_text(yaml.safe_dump({
        "storage": str(tmp / "storage"),
        "data": {"path": str(data), "eval_fraction": 0.0},
        "model": {"path": str(smollm2_folder()), "dtype": "float32"},
        "tokenize": {"max_length": args.max_length, "max_prompt_length": None},
        "score": {"backend": "transformers", "device": "cpu"},
        "train": {"per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1,
                  "max_steps": args.steps, "logging_steps": 1, "device": "cpu", "run_name": "startup",
                  "gradient_checkpointing": False, "precision": "float32", "save_steps": 10**6},
    }))
    run_timed([sys.executable, "-m", "flows.cli", "prepare", "-c", str(config), "--no-progress"], env,
              tmp / "prepare.log", ROOT)
    return config


def summarize(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Median seconds and calls of each phase over the repeats."""
    labels = list(dict.fromkeys(label for run in runs for label in run))
    return {label: {"s": statistics.median(run[label]["s"] for run in runs if label in run),
                    "calls": max(run[label]["calls"] for run in runs if label in run)} for label in labels}


def print_table(report: dict) -> None:
    labels = list(report["runs"])
    for stage in ("score", "train"):
        rows = list(dict.fromkeys(p for label in labels for p in report["runs"][label].get(stage, {})))
        print(f"\n`dpo {stage}` phases (median seconds; calls)")
        print(f"  {'phase':<52}" + "".join(f"{label:>18}" for label in labels))
        for phase in rows:
            cells = []
            for label in labels:
                cell = report["runs"][label].get(stage, {}).get(phase)
                cells.append(f"{cell['s']:>12.3f} ({cell['calls']:>2})" if cell else f"{'-':>18}")
            print(f"  {phase:<52}" + "".join(cells))
    print("\nwhole commands (seconds)")
    for key in ("python -c pass", "dpo --help", "import flows.cli.commands"):
        print(f"  {key:<52}" + "".join(f"{report['runs'][label]['commands'].get(key, float('nan')):>18.3f}"
                                       for label in labels))
    for label in labels:
        print(f"\nbiggest imports of flows.cli.commands ({label}, -X importtime, cumulative s):")
        print("  " + ", ".join(f"{p['package']} {p['s']:.2f}" for p in report["runs"][label]["imports"]))


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, "startup.json", whole_doc=True)
    parser.add_argument("--child", choices=["score", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--label", default="run")
    parser.add_argument("--cold-hash", action="store_true", help="first repeat with an empty file-hash cache")
    parser.add_argument("--append", action="store_true",
                        help="add these repeats to the label's earlier ones in --out (to interleave two trees)")
    return parser.parse_args()


def whole_commands(env: dict, tmp: Path) -> dict[str, float]:
    """Seconds of `python -c pass`, `dpo --help` and `import flows.cli.commands`, each its own process."""
    python = sys.executable
    commands = {}
    for key, argv, log in (("python -c pass", ["-c", "pass"], "pass.log"),
                           ("dpo --help", ["-m", "flows.cli", "--help"], "help.log"),
                           ("import flows.cli.commands", ["-c", "import flows.cli.commands"], "import.log")):
        start = time.time()
        run_timed([python, *argv], env, tmp / log, ROOT)
        commands[key] = time.time() - start
    return commands


def run_stages(args: argparse.Namespace, env: dict, tmp: Path, config: Path) -> dict[str, list]:
    """``--repeats`` times `dpo score` then `dpo train` in child mode: each run's phases, per stage."""
    import shutil

    per_stage: dict[str, list] = {"score": [], "train": []}
    for repeat in range(args.repeats):
        run_env = dict(env)
        if args.cold_hash and repeat == 0:
            run_env["DPO_HASH_CACHE"] = str(tmp / "empty-hash-cache")
        for stage in ("score", "train"):
            storage = tmp / "storage"
            if stage == "score":
                shutil.rmtree(storage / "refscores", ignore_errors=True)
            shutil.rmtree(storage / "runs", ignore_errors=True)
            out = tmp / f"{stage}-{repeat}.json"
            ended = run_timed([sys.executable, str(Path(__file__).resolve()), "--child", stage, "--config",
                               str(config), "--child-out", str(out)], run_env, tmp / f"{stage}-{repeat}.log", ROOT)
            phases = phases_of(json.loads(out.read_text()), ended)
            phases["load average (1 min)"] = {"s": os.getloadavg()[0], "calls": 1}
            per_stage[stage].append(phases)
            print(f"  {stage} #{repeat}: {phases['process wall']['s']:.1f} s", flush=True)
    return per_stage


def merged_report(args: argparse.Namespace, commands: dict, imports: list[dict], per_stage: dict) -> dict:
    """--out's report with this run under --label (added to the label's earlier repeats with --append)."""
    report = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    earlier = report.get("runs", {}).get(args.label) if args.append else None
    if earlier:
        per_stage = {stage: earlier["each_repeat"][stage] + runs for stage, runs in per_stage.items()}
        commands = {key: min(value, earlier["commands"].get(key, value)) for key, value in commands.items()}
    result = {"commands": commands, "imports": imports,
              **{stage: summarize(runs) for stage, runs in per_stage.items()},
              "each_repeat": per_stage, "tree": str(ROOT)}
    report.update(bench="startup_bench", settings={k: v for k, v in vars(args).items()
                                                    if k not in ("child", "config", "child_out", "out", "label")})
    report.setdefault("runs", {})[args.label] = result
    import platform

    report.setdefault("machine", {"cpu": platform.processor() or platform.machine(),
                                  "nproc": len(os.sched_getaffinity(0)), "python": platform.python_version()})
    return report


def main() -> int | None:
    args = parse_args()
    if args.child:
        return child(args.child, args.config, args.child_out)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as name:
        tmp = Path(name)
        config = prepared_storage(args, tmp, env)
        commands = whole_commands(env, tmp)
        imports = importtime(sys.executable, env, ROOT)
        per_stage = run_stages(args, env, tmp, config)
    report = merged_report(args, commands, imports, per_stage)
    print_table(report)
    return finish(args.out, report)


if __name__ == "__main__":
    sys.exit(main())

"""The `dpo` command line's parser: every command, its arguments and its help (no command runs here).

    dpo prepare -c run.yaml [--set tokenize.max_length=512 ...]
    dpo score -c run.yaml [--set score.backend=transformers ...]
    dpo train -c run.yaml [--resume] [--set train.max_steps=100 ...] [--nproc-per-node 4]
    dpo sweep -c run.yaml --grid train.beta=0.05,0.1 [--grid train.loss_type=sigmoid,ipo]
    dpo generate -c run.yaml         # K completions per prompt from a policy (generate: section)
    dpo judge -c run.yaml            # a reward per completion, then preference pairs (judge:, pairs:)
    dpo rounds -c run.yaml           # iterative DPO (rounds: section), as the Prefect flow dpo-rounds
    dpo demo [--storage DIR] [--rounds N]

Progress and summaries go to stderr; the last line of stdout is the stage's output directory,
so scripts can do `out=$(dpo prepare -c run.yaml | tail -n 1)`.
"""

from __future__ import annotations

import argparse

from pipeline import STAGES


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="YAML configuration file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set tokenize.max_length=512 (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpo", description="DPO in auditable stages: prepare, score, train, audit."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="validate and tokenize preference data into Parquet")
    _add_config_args(p)
    s = sub.add_parser("score", help="cache reference log-probs of the prepared dataset")
    _add_config_args(s)
    s.add_argument("--stats-json", help=argparse.SUPPRESS)  # for the flow's child process
    t = sub.add_parser("train", help="DPO training on the prepared data and cached reference scores")
    _add_config_args(t)
    t.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    t.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="train on N processes of this machine, one per GPU, under torchrun (DDP or FSDP2: "
                        "train.distributed); sets train.nproc_per_node")
    g = sub.add_parser("generate", help="sample completions of prompts from a policy (the generate: section)")
    _add_config_args(g)
    j = sub.add_parser("judge", help="a reward per completion (judge:), then preference pairs (pairs:)")
    _add_config_args(j)
    j.add_argument("--generations", metavar="DIR",
                   help="the generations folder to judge (default: the one `dpo generate` makes for this config)")
    j.add_argument("--no-pairs", action="store_true", help="rewards only, no pairs")
    ro = sub.add_parser("rounds", help="iterative DPO: generate -> judge -> prepare -> score -> audit -> train, "
                                       "rounds.iterations times, as a Prefect flow; up-to-date stages skipped")
    _add_config_args(ro)
    r = sub.add_parser("run", help="the whole pipeline as a Prefect flow; up-to-date stages skipped")
    _add_config_args(r)
    r.add_argument("--only", choices=STAGES, action="append", help="run only this stage (repeatable)")
    r.add_argument("--from", dest="from_stage", choices=STAGES, help="run this stage and the ones after it")
    r.add_argument("--force", choices=STAGES, action="append", default=[],
                   help="rerun this stage from scratch, and the stages after it (repeatable)")
    sw = sub.add_parser("sweep", help="train one run per point of a hyper-parameter grid over one reference cache")
    _add_config_args(sw)
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a key and the values to try, e.g. --grid train.beta=0.05,0.1 (repeatable: the "
                         "product of the grids); adds to or replaces the config's sweep.grid")
    _add_serve(sub)
    st = sub.add_parser("status", help="which stage outputs exist for this config")
    _add_config_args(st)
    st.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="also list the points of this sweep, as dpo sweep takes --grid (repeatable)")
    _add_audit(sub)
    d = sub.add_parser("demo", help="run the pipeline on the built-in demo (offline, CPU)")
    d.add_argument("--storage", default="storage", help="artifact root (default: ./storage)")
    d.add_argument("--rounds", type=int, metavar="N",
                   help="iterative DPO on the demo: N rounds, the demo's rule as the judge")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser



def _add_serve(sub) -> None:
    """`dpo serve`: a scheduled Prefect deployment."""
    sv = sub.add_parser("serve", help="serve the pipeline as a scheduled Prefect deployment")
    _add_config_args(sv)
    sv.add_argument("--cron", required=True, help='schedule, e.g. "0 3 * * *" (03:00 every day)')
    sv.add_argument("--name", help="deployment name (default: dpo-pipeline, dpo-sweep with --sweep, dpo-rounds with --rounds)")
    sv.add_argument("--sweep", action="store_true",
                    help="schedule the config's sweep (its sweep: section and --grid), not one run")
    sv.add_argument("--rounds", action="store_true",
                    help="schedule the config's iterative DPO (its rounds: section, the dpo-rounds flow)")
    sv.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="--sweep: a key and the values to try, as in dpo sweep (repeatable)")
    sv.add_argument("--work-pool", metavar="POOL",
                    help="register the deployment on this work pool (Flow.deploy) and return: a worker "
                         "(`prefect worker start --pool POOL`, on this or another machine) runs it; "
                         "default: serve it from this process")
    sv.add_argument("--work-queue", metavar="QUEUE", help="--work-pool: the pool's queue (default: its default queue)")
    sv.add_argument("--source", metavar="DIR_OR_GIT_URL",
                    help="--work-pool: where the worker finds this project's code: a folder its machine "
                         "can read (default: this checkout) or a git URL")


def _add_audit(sub) -> None:
    """`dpo audit`: check a cache, compare two, show an example."""
    a = sub.add_parser(
        "audit",
        help="verify a reference cache: integrity, staleness, statistics, re-score drift",
        description="dpo audit -c CONFIG | dpo audit PATH | dpo audit diff A B | dpo audit show ID -c CONFIG",
    )
    a.add_argument("target", nargs="*", help="a cache directory; or: diff A B; or: show ID")
    a.add_argument("-c", "--config", help="YAML configuration (finds the cache, enables staleness checks)")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a.add_argument("--rescore", type=int, default=0, metavar="K", help="re-score K seeded rows with transformers")
    a.add_argument("--seed", type=int, default=0, help="seed of the re-score sample")
    a.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="re-score in this dtype")
    a.add_argument("--tolerance", type=float, help="max per-token |diff| of the re-score (nats)")
    a.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    a.add_argument("--cache", help="show: the cache directory (default: from -c)")
    a.add_argument("--report-dir", help="where to write the report (default: <storage>/audits/<cache fingerprint>/)")


# Commands that end as soon as they are done when `dpo` runs as a program (see ``exit_now``).

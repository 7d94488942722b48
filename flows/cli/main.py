"""`dpo`: parse the arguments, set up logging, run the command (flows/cli/commands.py), exit.

    dpo prepare -c run.yaml          # the console script: main(); `python -m flows.cli` runs the same
    code = main(["train", "-c", "run.yaml", "--no-progress"])    # in a process that goes on
"""

from __future__ import annotations

import logging
import os
import sys

from flows.cli.parser import build_parser

EXIT_AT_ONCE = ("prepare", "score", "train", "generate", "judge")


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (None: this program's arguments) and return its exit status.

    Called as the program (``argv`` None: the `dpo` script, ``python -m flows.cli``), a stage
    command that returned ends the process at once (``exit_now``)."""
    args = build_parser().parse_args(argv)  # --help and usage errors end here, before any import
    from pipeline.train.launch import die_with_parent, rank  # no torch

    die_with_parent()

    logging.basicConfig(stream=sys.stderr, level=logging.INFO if rank() == 0 else logging.WARNING,
                        format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's API calls, one line each
    from flows.cli import commands

    code = commands.run(args)
    if argv is None and args.command in EXIT_AT_ONCE:
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """End this process with ``code`` without the interpreter's teardown of every module and
    object (with torch and a model loaded: 0.6 to 1.8 s on 2 cores, bench/startup_bench.py), after
    doing what that teardown is for: other threads joined as at a normal exit (``threading``'s
    shutdown, which also stops executors), exit handlers run (logging flushed, temporary
    folders removed, child processes reaped), stdout and stderr flushed."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what Python runs first when it exits
    if shutdown is None:
        sys.exit(code)  # another Python: its normal exit
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing more to deliver
    os._exit(code)

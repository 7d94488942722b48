"""Starting the training processes: torchrun as a child of the launcher, and which rank failed.

    torchrun(train_argv("run.yaml", resume=True), nproc=4, log_dir=launch_log_dir(storage))
    returncode, tail = run_streaming(command, logger.info)   # any child, its lines as they come
    record_failure(exc)          # in a rank: the error file torchrun named, for failure_report

``torchrun`` runs torch.distributed.run's main through this module (``torchrun_main``), which
records how each rank ended (RANK_EXITS), so that a rank killed from outside is told from the
ranks torchrun stopped. pipeline/train/distributed.py is what runs inside the ranks (process group,
DDP / FSDP2, the full training state). This module imports no torch (`dpo --help` stays light).
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

FAILED_AT = "failed_at"
"""Beside a rank's error file: when it failed (seconds since the epoch, float)."""

FAILED_LINES = 30
"""Lines of a failed rank's stderr quoted in the launcher's error."""

RANK_EXITS = "rank_exits.json"
"""In a launch's log folder, after ranks failed: how each ended (``torchrun_main`` writes it)."""



def rank() -> int:
    """This process's rank under torchrun, else 0."""
    return int(os.environ.get("RANK", "0")) if "LOCAL_RANK" in os.environ else 0


def train_argv(config_path: str | Path, overrides: list[str] = (), resume: bool = False,
               no_progress: bool = False) -> list[str]:
    """The arguments after ``python`` of `dpo train` in each rank:
    ``-m flows.cli train -c CONFIG [--set KEY=VALUE ...] [--resume] [--no-progress]``."""
    argv = ["-m", "flows.cli", "train", "-c", str(config_path)]
    for override in overrides:
        argv += ["--set", override]
    return argv + ["--resume"] * resume + ["--no-progress"] * no_progress


def torchrun(argv: list[str], nproc: int, log_dir: Path, echo: bool = True, env: dict | None = None,
             lines: Callable[[str], None] | None = None) -> None:
    """Run ``python <argv>`` as ``nproc`` processes on this machine under torchrun
    (torch.distributed.run's main, a single-node rendezvous on 127.0.0.1). Each rank's output also
    goes to ``log_dir``; ``echo`` shows it here (ranks' lines prefixed), or ``lines`` gets each
    line (a Prefect run's logger). Raises DistributedError naming the rank that failed first,
    with the last lines it wrote, or the rank that was killed (a signal torchrun did not send).
    A killed rank takes the run down at once: its peers' gloo/NCCL connections break and torchrun
    stops the others (--max-restarts 0), so the launcher never waits on a dead rank."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    # torchrun, through torchrun_main (this module run as a program): it records how each rank ended
    command = [sys.executable, "-m", "pipeline.train.launch", str(log_dir / RANK_EXITS),
               "--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", "127.0.0.1:0", "--max-restarts", "0", "--log-dir", str(log_dir),
               "--redirects", "3", "--tee", "3" if echo or lines else "0", *argv]
    env = {**os.environ, **(env or {})}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo talks over the loopback
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if lines is not None:
        returncode, tail = run_streaming(command, lines, env)
    else:
        done = subprocess.run(command, env=env, stdout=None if echo else subprocess.DEVNULL,
                              stderr=None if echo else subprocess.PIPE, text=True)
        returncode, tail = done.returncode, done.stderr or ""
    if returncode != 0:
        from pipeline.errors import DistributedError  # torch: only when a launch failed

        raise DistributedError(failure_report(log_dir, returncode, tail))


def run_streaming(command: list[str], lines: Callable[[str], None], env: dict | None = None,
                  keep: int = 200) -> tuple[int, str]:
    """Run ``command`` with its stdout and stderr merged, handing each line to ``lines`` as it
    comes; returns (exit status, its last ``keep`` lines)."""
    tail: collections.deque = collections.deque(maxlen=keep)
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", bufsize=1) as process:
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if line.strip():
                lines(line)
    return process.returncode, "\n".join(tail)


def failure_report(log_dir: Path, returncode: int, launcher_stderr: str) -> str:
    """Which rank failed first and the last lines of its stderr. A rank killed by a signal that
    torchrun did not send (SIGKILL from a user or the out-of-memory killer, a segfault) is the
    cause: it could write no error, and the errors of the others (a broken connection to it) came
    after. Otherwise the earliest error file the ranks wrote; torchrun's own last lines when no
    rank left one."""
    exits = _rank_exits(log_dir)
    killed = sorted((rank for rank, how in exits.items() if _killed(how)), key=int)
    if killed:
        return _killed_report(log_dir, returncode, exits, killed)
    errors = []
    for path in Path(log_dir).rglob(FAILED_AT):
        try:
            when = float(path.read_text())
        except (OSError, ValueError):
            continue
        errors.append((when, path))
    if not errors:
        tail = "\n".join(launcher_stderr.strip().splitlines()[-FAILED_LINES:])
        return f"the distributed run failed (torchrun exit {returncode}); logs in {log_dir}\n{tail}"
    _, first = min(errors)
    rank = first.parent.name
    stderr = first.parent / "stderr.log"
    lines = stderr.read_text(errors="replace").splitlines()[-FAILED_LINES:] if stderr.is_file() else []
    return (f"rank {rank} failed first (torchrun exit {returncode}); its last lines ({stderr}):\n"
            + "\n".join(lines))


def _rank_exits(log_dir: Path) -> dict[str, dict]:
    try:
        exits = json.loads((Path(log_dir) / RANK_EXITS).read_text())
    except (OSError, ValueError):
        return {}
    return exits if isinstance(exits, dict) else {}


def _killed(how: dict) -> bool:
    """Ended by a signal torchrun did not send it (torchrun stops the others of a failed rank
    with SIGTERM, then SIGKILL), and without writing an error."""
    return (how.get("exitcode", 0) < 0 and how.get("signal") != how.get("stopped_with")
            and not how.get("error_written"))


def _killed_report(log_dir: Path, returncode: int, exits: dict[str, dict], killed: list[str]) -> str:
    ranks = ", ".join(f"rank {rank} was killed by {exits[rank]['signal']} (pid {exits[rank]['pid']})"
                      for rank in killed)
    others = []
    for rank in sorted(set(exits) - set(killed), key=int):
        how = exits[rank]
        if how.get("error_written") and how.get("log"):
            others.append(f"rank {rank}: {_last_line(Path(how['log']) / 'stderr.log')}")
        elif how.get("exitcode", 0) < 0:
            others.append(f"rank {rank}: stopped by torchrun ({how['signal']})")
    lines = [f"{ranks} and left no error (a signal from another process, or from the kernel's out-of-memory "
             f"killer: see `dmesg`); torchrun stopped the other ranks (exit {returncode}); logs in {log_dir}"]
    lines += [f"afterwards {other}" for other in others]
    return "\n".join(lines)


def _last_line(path: Path, width: int = 300) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    if not lines:
        return "(no output)"
    line = lines[-1].removeprefix(f"[rank{path.parent.name}]:").strip()
    return line if len(line) <= width else line[: width - 3] + "..."


def record_failure(exc: BaseException) -> None:
    """In a torchrun rank: write ``exc`` to the error file torchrun named for this rank (as
    torch's @record does for uncaught exceptions), so the launcher can say which rank failed."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        # torchrun's error file has whole seconds; the failure time to the microsecond beside it
        # tells which rank failed first when others fail in the same second (their peers gone).
        Path(error_file).parent.mkdir(parents=True, exist_ok=True)
        Path(error_file).with_name(FAILED_AT).write_text(repr(time.time()))
        ErrorHandler().record_exception(exc)


DIE_WITH_PARENT = "DPO_DIE_WITH_PARENT"
"""Set (to the starting process's pid) for a process that must not outlive what started it."""


def die_with_parent() -> None:
    """In a process started with DPO_DIE_WITH_PARENT=<its parent's pid> (a sweep's training): be
    killed when that parent dies (Linux's PR_SET_PDEATHSIG), so that a sweep killed with SIGKILL
    leaves no orphan training that holds its run's lock; this process's own children (torchrun's
    ranks) get the same, with this pid."""
    parent = os.environ.get(DIE_WITH_PARENT)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if str(os.getppid()) != parent:  # the parent died before the line above
        os._exit(1)
    os.environ[DIE_WITH_PARENT] = str(os.getpid())


def launch_log_dir(storage: str | Path) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(storage) / "logs" / "torchrun" / f"{stamp}-{os.getpid()}"


def torchrun_main(argv: list[str]) -> None:
    """torchrun (``torch.distributed.run``'s main, ``argv[1:]`` its arguments) that, when ranks
    fail, writes how each ended to ``argv[0]`` (RANK_EXITS: by rank, its pid, exit code, signal,
    log folder, whether it wrote an error, and the signal torchrun itself sent it when stopping
    the group), so that a rank killed from outside is told from the ranks torchrun stopped."""
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.subprocess_handler import SubprocessHandler

    die_with_parent()
    report, args = Path(argv[0]), argv[1:]
    stopped: dict[int, str] = {}
    real_close = SubprocessHandler.close

    def close(handler, death_sig=None):
        if handler.proc.poll() is None:  # still running: torchrun stops it (another rank failed)
            sent = death_sig or signal.SIGTERM
            stopped[handler.proc.pid] = signal.Signals(sent).name
        return real_close(handler, death_sig)

    SubprocessHandler.close = close
    try:
        run.main(args)
    except ChildFailedError as exc:
        exits = {
            str(rank): {"pid": f.pid, "exitcode": f.exitcode,
                        "signal": f.signal_name() if f.exitcode < 0 else None,
                        "stopped_with": stopped.get(f.pid),
                        "log": str(Path(f.error_file).parent) if os.path.isabs(f.error_file) else None,
                        "error_written": os.path.isfile(f.error_file)}
            for rank, f in exc.failures.items()
        }
        tmp = report.with_name(f".{report.name}.{os.getpid()}")
        tmp.write_text(json.dumps(exits, indent=1, sort_keys=True))
        os.replace(tmp, report)
        raise


if __name__ == "__main__":  # torchrun()'s child: python -m pipeline.train.launch RANK_EXITS_PATH TORCHRUN_ARGS...
    torchrun_main(sys.argv[1:])

"""Every `dpo` command line and `--set` example of README.md and of docs/**/*.md (docs/reference/
included) is run by a test, so an example that the program refuses is a red test (issue 20 §3).

Found (``examples``): each line of a fenced code block that is a `dpo` command (continuation
lines joined; `$(dpo ...)` inside a shell line; `python -m flows.cli` / `torchrun -m flows.cli`
lines), each inline code span that is a whole `dpo` command, each inline `--set key=value`
span, and each `make` line of a fenced block. Optional parts written `[--flag value]` are
included, `...` dropped; `run.yaml` and `CONFIG` stand for a config file, `<fingerprint>`,
`CACHE_A`, `CACHE_B`, `ID` and `DIR` for what they name.

Checked, in the default suite, every example: the command line through the real argument
parser and the real command up to its configuration (`flows.cli.commands.run` with the config
loaded, `--set` and `--nproc-per-node` applied and validated, stopped right after); a `--set`
span applied to the example config; a `make` line's target in the Makefile.

Run, under `-m slow`, in the order the docs give them:

- on the demo model and data in a temporary storage (run.yaml): every command that runs on one
  CPU machine, as a `dpo` process, which must exit 0;
- the commands on `configs/smollm2-anthropic-hh.yaml`, exactly as written, from a copy of the
  file and a local Hub cache (HF_HUB_OFFLINE=1) holding the demo model as
  HuggingFaceTB/SmolLM2-135M-Instruct and the demo rows as Anthropic/hh-rlhf harmless-base;
- parsed only (``PARSE_ONLY`` says why): the ones that need several GPUs, several machines
  or a Prefect server;
- `dpo demo [--storage DIR]` by tests/flows/cli/test_main.py (``RUN_ELSEWHERE``).
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import demo_model_files, demo_valid_jsonl, hub_cache

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
EXAMPLE_CONFIG = ROOT / "configs" / "smollm2-anthropic-hh.yaml"
DPO = str(Path(sys.executable).parent / "dpo")

NOT_EXAMPLES = {
    "dpo train --nproc-per-node": "names the option in a sentence; the full lines are in docs/scaling.md's torchrun section",
    "--set section.key=value": "the syntax, not an example",
}
"""Inline code spans with an option that only name it in a sentence (each must still be in the
docs). An inline `dpo` span without an option (`dpo audit show ID`) names a command, and is no
example either."""


@dataclass(frozen=True)
class Example:
    doc: str
    """The file, relative to the project root."""
    line: int
    """1-based line of the docs where it starts."""
    text: str
    """The command as written (continuation lines joined, comment dropped)."""
    kind: str
    """dpo: a `dpo` command line (argv after the program name); set: an inline --set span;
    make: a make line."""
    argv: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def _logical_lines(block: str, first_line: int):
    """(line number, text) of a code block's lines, continuation lines joined."""
    pending, start = "", None
    for number, line in enumerate(block.splitlines(), first_line):
        if start is None:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending, start = "", None
    if pending:
        yield start, pending


def _argv(text: str) -> tuple[str, ...]:
    """The words of a documented command: optional parts `[--x y]` included, `...` dropped."""
    text = re.sub(r"\[(-[^\[\]]*)\]", r"\1", text)
    return tuple(word for word in shlex.split(text, comments=True) if word != "...")


def _command(text: str) -> tuple[str, ...] | None:
    """The `dpo` arguments of a shell line, or None when it runs no `dpo` command."""
    text = text.strip()
    inner = re.search(r"\$\((dpo [^|)]*)", text)  # out=$(dpo prepare -c run.yaml | tail -n 1)
    if inner:
        text = inner.group(1)
    if text.startswith("dpo "):
        return _argv(text)[1:]
    words = _argv(text) if "flows.cli" in text else ()
    if "flows.cli" in words:  # python -m flows.cli ..., torchrun ... -m flows.cli ...
        return words[words.index("flows.cli") + 1:]
    return None


def examples() -> list[Example]:
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        name = str(doc.relative_to(ROOT))
        fences = list(re.finditer(r"(?m)^```[^\n]*\n(.*?)^```", text, re.S))
        for fence in fences:
            first = text.count("\n", 0, fence.start(1)) + 1
            for number, line in _logical_lines(fence.group(1), first):
                argv = _command(line)
                if argv is not None:
                    found.append(Example(name, number, line.split(" #")[0].strip(), "dpo", argv))
                elif line.startswith("make "):
                    found.append(Example(name, number, line.split("#")[0].strip(), "make", _argv(line)))
        prose = text
        for fence in fences:  # blanked, keeping the line numbers
            prose = prose[:fence.start()] + re.sub(r"[^\n]", " ", fence.group(0)) + prose[fence.end():]
        for span in re.finditer(r"`([^`\n]+)`", prose):
            code, number = span.group(1).strip(), prose.count("\n", 0, span.start()) + 1
            if code in NOT_EXAMPLES:
                continue
            words = code.split()
            if code.startswith("--set ") and "=" in code:
                found.append(Example(name, number, code, "set", _argv(code)))
            elif ("$(dpo " in code or code.startswith("dpo ")) and any(w.startswith(("-", "[-")) for w in words):
                found.append(Example(name, number, code, "dpo", _command(code)))
    return sorted(found, key=lambda e: (e.doc != "README.md", e.doc, e.line))


EXAMPLES = examples()
COMMANDS = [e for e in EXAMPLES if e.kind == "dpo"]


def parse_only(example: Example) -> str | None:
    """Why a command is only parsed (needs more than one CPU machine), else None (it runs)."""
    words, text = example.argv, example.text
    if "torchrun" in text or any(w.startswith("train.nnodes=") for w in words):
        return "several machines (torchrun on each node)"
    if "--nproc-per-node" in words:
        return "several GPUs (one training process per GPU)"
    if any(w.startswith("score.runner=ray") for w in words):
        return "a Ray cluster (score.ray_address)"
    if any(w.startswith("score.workers=") for w in words):
        return "one GPU per scoring worker"
    if words and words[0] == "serve":
        return "a Prefect server (PREFECT_API_URL) and a long-running process"
    if any(w.endswith("smollm2-iterative.yaml") for w in words):
        return "a GPU: 3 rounds of 512 prompts x 8 samples of up to 512 tokens, and a 0.6B reward model"
    return None


def on_the_hub_example(example: Example) -> bool:
    return any(w.startswith("configs/") for w in example.argv)


PARSE_ONLY = {e.where: parse_only(e) for e in COMMANDS if parse_only(e)}

RUN_ELSEWHERE = {"dpo demo [--storage DIR]": ("tests/flows/cli/test_main.py", "test_demo_runs_offline_end_to_end",
                                              '[DPO, "demo", "--storage", str(tmp_path)'),
                 "dpo demo --rounds 2 [--storage DIR]": (
                     "tests/flows/test_rounds_flow.py", "test_demo_rounds_raise_the_reward_and_the_win_rate_and_a_rerun_skips",
                     '[DPO, "demo", "--rounds", "2", "--storage", str(tmp_path / "storage")')}
"""Examples a slow test of another file runs already, as written: (file, test, what it runs)."""


def test_the_docs_have_the_examples_this_file_checks():
    texts = [e.text for e in EXAMPLES]
    docs = "\n".join(doc.read_text(encoding="utf-8") for doc in DOCS)
    assert any(e.doc.startswith("docs/reference/") for e in EXAMPLES), "docs/reference/*.md: not scanned"
    assert {"dpo prepare -c configs/smollm2-anthropic-hh.yaml", "dpo run -c run.yaml",
            "dpo train -c run.yaml [--resume] [--set train.max_steps=200 ...]",
            "--set train.learning_rate=1e-6", "make demo"} <= set(texts)
    assert any("torchrun" in t for t in texts) and any("$(dpo" in t for t in texts)
    assert len(COMMANDS) >= 25 and PARSE_ONLY and any(on_the_hub_example(e) for e in COMMANDS)
    for text in NOT_EXAMPLES:
        assert f"`{text}`" in docs, f"{text} is no longer in the docs: drop it from NOT_EXAMPLES"
    for text, (path, test, command) in RUN_ELSEWHERE.items():
        source = (ROOT / path).read_text()
        assert text in texts and f"def {test}(" in source and command in source, (text, path, test)


# --- every example, parsed by the real command line up to its loaded configuration -------------


class _Loaded(Exception):
    """Raised by the test's load_config once the command's configuration loaded and validated."""


@pytest.fixture
def run_yaml(tmp_path) -> Path:
    """run.yaml / CONFIG of the docs: the example config, copied (README: "copy the file")."""
    path = tmp_path / "run.yaml"
    shutil.copyfile(EXAMPLE_CONFIG, path)
    return path


def concrete(argv, config: Path, values: dict | None = None) -> list[str]:
    """The documented words with their placeholders filled in."""
    values = {"run.yaml": str(config), "CONFIG": str(config), **(values or {})}
    out = []
    for word in argv:
        for placeholder, value in values.items():
            if word == placeholder or (placeholder.startswith("<") and placeholder in word):
                word = value if word == placeholder else word.replace(placeholder, value)
        out.append(word)
    return out


def check_parses(argv: list[str], monkeypatch) -> None:
    """`dpo ARGV` through flows.cli's parser and flows.cli.commands.run, stopped right after the
    command loaded its configuration (nothing prepared, scored, trained, served or audited);
    a usage error or a refused configuration fails the test with the program's message."""
    from flows.cli import audit_command, commands, rounds_commands
    from flows.cli.main import build_parser

    real_load = commands.load_config

    def load_then_stop(path, overrides=None):
        real_load(path, overrides)
        raise _Loaded

    def stop(*args, **kwargs):
        raise _Loaded

    def audit_report(args, cache):
        if args.config:
            commands.load_config(args.config, args.overrides)
        stop()

    monkeypatch.setattr(commands, "load_config", load_then_stop)
    monkeypatch.setattr(audit_command, "load_config", load_then_stop)  # `dpo audit show -c` reads it there
    monkeypatch.setattr(rounds_commands, "load_config", load_then_stop)  # dpo generate, judge, rounds
    monkeypatch.setattr(audit_command, "audit_diff", stop)
    monkeypatch.setattr(audit_command, "audit_report", audit_report)
    monkeypatch.setitem(commands.COMMANDS, "demo", stop)
    from flows.prefect_settings import PREFECT_SETTINGS

    for name in (*PREFECT_SETTINGS, "DPO_PROGRESS_BARS", "DPO_PROGRESS_LOG"):
        # `dpo run` and `dpo serve` put defaults into os.environ: as it was, afterwards
        monkeypatch.setenv(name, os.environ.get(name, ""))
        if not os.environ[name]:
            monkeypatch.delenv(name)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:
        assert exit.code == 0 and ("--help" in argv or "-h" in argv), f"dpo {shlex.join(argv)}: usage error"
        return
    try:
        code = commands.run(args)
    except _Loaded:
        return
    pytest.fail(f"dpo {shlex.join(argv)} did not get to its configuration (exit status {code}); "
                "its error is on stderr above")


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kind != "make"], ids=lambda e: e.where)
def test_every_command_and_set_example_is_accepted(example, run_yaml, monkeypatch, capsys):
    if example.kind == "set":
        from pipeline.config.load import load_config

        words = list(example.argv)
        assert words[0] == "--set" and len(words) == 2, example.text
        load_config(run_yaml, [words[1]])
        return
    if "torchrun" in example.text:  # torchrun's own options too
        from torch.distributed.run import parse_args

        words = _argv(example.text)
        parse_args(list(words[words.index("torchrun") + 1:]))
    argv = concrete(example.argv, run_yaml)
    argv = [str(ROOT / w) if w.startswith("configs/") else w for w in argv]
    check_parses(argv, monkeypatch)


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kind == "make"], ids=lambda e: e.where)
def test_every_make_example_is_a_target(example):
    makefile = (ROOT / "Makefile").read_text()
    for target in example.argv[1:]:
        if "=" not in target:
            assert re.search(rf"(?m)^{re.escape(target)}:", makefile), f"make {target}: no such target in Makefile"
        else:  # a variable the Makefile reads
            name = target.split("=", 1)[0]
            assert re.search(rf"(?m)^{re.escape(name)} *[?:]?=", makefile), f"make {target}: no variable {name} in Makefile"


@pytest.mark.parametrize("argv, message", [
    (["train", "-c", "run.yaml", "--set", "train.learning_rate=fast"], "train.learning_rate: expected a number"),
    (["train", "-c", "run.yaml", "--set", "train.lr=1e-6"], "train.lr is now called train.learning_rate"),
    (["score", "-c", "run.yaml", "--set", "score.workers=0"], "score.workers"),
    (["train", "-c", "run.yaml", "--nproc-per-node", "0"], "train.nproc_per_node"),
    (["audit", "-c", "run.yaml", "--set", "data.split=../x"], "data.split"),
    (["run", "-c", "run.yaml", "--only", "everything"], None),
    (["prepare", "--config-file", "run.yaml"], None),
])
def test_a_refused_example_is_a_red_test(argv, message, run_yaml, monkeypatch, capsys):
    with pytest.raises((pytest.fail.Exception, AssertionError)):
        check_parses(concrete(argv, run_yaml), monkeypatch)
    if message:
        assert message in capsys.readouterr().err


# --- run: on the demo model (one CPU machine) and from a local Hub cache ----------------------------


def _env(tmp_path: Path, **extra) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "HF_HUB_OFFLINE": "1", **extra}
    env.pop("PREFECT_API_URL", None)
    env.pop("HF_HUB_CACHE", None)
    return env


def _run(example: Example, argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    start = time.monotonic()
    done = subprocess.run([DPO, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    print(f"{time.monotonic() - start:6.1f} s  {example.where}  dpo {shlex.join(argv)}")
    assert done.returncode == 0, (f"{example.where}: `{example.text}` ran as `dpo {shlex.join(argv)}` "
                                  f"and exited {done.returncode}:\n{done.stderr[-3000:]}")
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


def _cache_and_example_id(config: Path) -> tuple[Path, str]:
    import pyarrow.parquet as pq

    from pipeline.config.load import load_config
    from pipeline.storage import locate

    cfg = load_config(config)
    cache = locate.refscores_dir_for(cfg, locate.dataset_dir_for(cfg).name)
    first = sorted(cache.glob("part-*.parquet"))[0]
    return cache, pq.read_table(first, columns=["id"]).column("id")[0].as_py()


@pytest.mark.slow
def test_the_command_examples_run_on_the_demo_model(tmp_path, demo_assets):
    """Every example but the Hub ones and PARSE_ONLY's, in the docs' order, as `dpo` processes
    in a folder holding run.yaml: the demo model and data, storage next to it."""
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "storage": "storage",
        "data": {"path": str(demo_assets["data"]), "eval_fraction": 0.1},
        "model": {"path": str(demo_assets["model"])},
        "tokenize": {"max_length": 128, "max_prompt_length": 64},
        "train": {"max_steps": 4, "per_device_train_batch_size": 2, "eval_steps": 0, "save_steps": 0,
                  "learning_rate": 1e-3},  # the docs' --set train.max_steps=200: 200 short steps
        # dpo generate, judge and rounds (docs/rounds.md): small, the demo's rule as the judge
        "generate": {"num_samples": 4, "max_new_tokens": 8, "num_prompts": 16},
        "judge": {"function": "pipeline.models.assets:demo_reward"},
        "rounds": {"iterations": 1, "prompts_per_round": 16, "eval_prompts": 8},
    }))
    env = _env(tmp_path)
    ran = []
    for example in COMMANDS:
        if parse_only(example) or on_the_hub_example(example) or example.text in RUN_ELSEWHERE:
            continue
        values = {"DIR": str(tmp_path / "demo-storage")}
        if {"CACHE_A", "ID"} & set(example.argv) or any("<fingerprint>" in w for w in example.argv):
            cache, example_id = _cache_and_example_id(config)
            values.update({"CACHE_A": str(cache), "CACHE_B": str(cache), "<fingerprint>": cache.name,
                           "ID": example_id})
        argv = concrete(example.argv, config, values)
        done = _run(example, argv, tmp_path, env)
        if "$(" in example.text:  # out=$(dpo ... | tail -n 1): the last line of stdout is the output
            assert Path(done.stdout.strip().splitlines()[-1]).is_dir()
        ran.append(example.text)
    assert len(ran) >= 14, ran


@pytest.mark.slow
def test_the_example_config_commands_run_as_written_from_a_local_hub_cache(tmp_path, demo_assets):
    """`dpo prepare|score|train|run -c configs/smollm2-anthropic-hh.yaml` exactly as the docs
    write them, from a folder holding a copy of configs/ (its storage, ../storage, is then in
    the temporary folder), with the demo model and rows behind the config's Hub ids."""
    (tmp_path / "configs").mkdir()
    shutil.copyfile(EXAMPLE_CONFIG, tmp_path / "configs" / EXAMPLE_CONFIG.name)
    hf_home = tmp_path / "hf"
    hub_cache(hf_home, "HuggingFaceTB/SmolLM2-135M-Instruct", demo_model_files(demo_assets), "1" * 40)
    data = gzip.compress(demo_valid_jsonl(demo_assets).encode())
    hub_cache(hf_home, "Anthropic/hh-rlhf", {"harmless-base/train.jsonl.gz": data}, "2" * 40, "datasets")
    env = _env(tmp_path, HF_HOME=str(hf_home))
    ran = [e.text for e in COMMANDS if on_the_hub_example(e) and not parse_only(e)]
    for example in COMMANDS:
        if on_the_hub_example(example) and not parse_only(example):
            _run(example, list(example.argv), tmp_path, env)
    assert len(ran) >= 4, ran
    assert (tmp_path / "storage" / "runs" / "smollm2-anthropic-hh" / "run.json").is_file()

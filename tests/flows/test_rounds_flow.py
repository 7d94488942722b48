"""`dpo rounds`: iterative DPO as one resumable flow (issue 30).

The plan cuts the prompts into a held-out set and one slice per round and builds each round's
configs; the win rate counts wins, ties and losses. Two tiny rounds on the demo run end to end
(generate, judge, prepare, score, audit, train, evaluation), write rounds.json, report.html and
each run's winrate.json, and a rerun skips every stage; `dpo status` lists the rounds. Slow:
`dpo demo --rounds 2` raises the held-out reward and the win rate round after round; kill -9
inside round 2's generate, then the same command, ends with the bytes of an uninterrupted run
(every file; metrics.jsonl and datasets' manifests apart from the timings they record).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config.load import config_from_dict, load_config
from pipeline.errors import ConfigError
from pipeline.reports.rounds_report import win_rate

from flows.cli.main import main
from flows.rounds_plan import check_prompt_count, plan_rounds, prompts_needed

from tests.helpers import mtimes, task_runs_of

DPO = str(Path(sys.executable).parent / "dpo")
TRAIN = {"learning_rate": 3e-3, "per_device_train_batch_size": 8, "max_steps": 4, "eval_steps": 2,
         "save_steps": 2, "warmup_steps": 1}
GENERATE = {"num_samples": 4, "max_new_tokens": 8, "batch_size": 32, "shard_prompts": 4}
ROUNDS = {"iterations": 2, "prompts_per_round": 12, "eval_prompts": 8, "name": "tiny"}
JUDGE = {"function": "pipeline.models.assets:demo_reward"}


def raw_config(storage: Path, demo_assets, **sections) -> dict:
    return {"storage": str(storage), "data": {"path": str(demo_assets["data"]), "eval_fraction": 0.1},
            "model": {"path": str(demo_assets["model"])}, "tokenize": {"max_length": 128, "max_prompt_length": 64},
            "train": TRAIN, "generate": GENERATE, "judge": JUDGE, "rounds": ROUNDS, **sections}


def write_config(path: Path, demo_assets, **sections) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw_config(path.parent / "storage", demo_assets, **sections)))
    return path


TIMING = ("seconds", "tokens/s")
"""What a rerun measures anew: a dataset manifest's and a run's metrics records' timings."""


def _content(path: Path) -> bytes:
    """A file's bytes; for metrics.jsonl and a dataset's manifest.json, without their timings."""
    if path.name == "metrics.jsonl":
        rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]
        return json.dumps(rows).encode()
    if path.name == "manifest.json" and path.parent.parent.name == "datasets":
        return json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING}).encode()
    return path.read_bytes()


def digests(storage: Path) -> dict[str, str]:
    """sha256 of every stage output under ``storage``, timings aside (locks and their owner
    files aside; audit reports, which say when they were made, too)."""
    kinds = ("prompts", "generations", "judgements", "datasets", "refscores", "runs", "rounds")
    return {str(p.relative_to(storage)): hashlib.sha256(_content(p)).hexdigest()
            for kind in kinds for p in sorted((storage / kind).rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


# --- the plan -------------------------------------------------------------------------------------


def test_the_plan_holds_out_prompts_and_slices_one_per_round(tmp_path, demo_assets):
    cfg = config_from_dict(raw_config(tmp_path / "storage", demo_assets))
    rounds = plan_rounds(cfg, "unused")
    assert rounds.name == "tiny" and rounds.directory == tmp_path / "storage" / "rounds" / "tiny"
    assert prompts_needed(cfg) == 8 + 2 * 12
    evaluation = rounds.eval_config(rounds.policy(0)).generate
    assert (evaluation.first_prompt, evaluation.num_prompts, evaluation.num_samples, evaluation.temperature) == (0, 8, 1, 0.0)
    assert evaluation.model == str(demo_assets["model"]) and evaluation.max_new_tokens == 8
    slices = [(rounds.sample_config(r, "p").generate.first_prompt, rounds.sample_config(r, "p").generate.num_prompts)
              for r in (1, 2)]
    assert slices == [(8, 12), (20, 12)]  # after the held-out 8, one slice of 12 per round, no overlap
    first = rounds.train_config(1, tmp_path / "pairs.jsonl", rounds.policy(0))
    assert first.train.init_from is None and first.train.step0_check == "error"  # starts from the reference
    assert first.train.run_name == "tiny-round1" and first.data.path == str(tmp_path / "pairs.jsonl")
    second = rounds.train_config(2, tmp_path / "pairs.jsonl", rounds.policy(1))
    assert second.model.path == str(demo_assets["model"])  # reference: initial, fixed
    assert second.train.init_from == str(rounds.run_dir(1) / "final") and second.train.step0_check == "off"
    previous = plan_rounds(config_from_dict(raw_config(tmp_path / "storage", demo_assets,
                                                       rounds={**ROUNDS, "reference": "previous"})), "x")
    moved = previous.train_config(2, tmp_path / "pairs.jsonl", previous.policy(1))
    assert moved.model.path == str(previous.run_dir(1) / "final") and moved.train.init_from is None


def test_rounds_need_their_sections_and_enough_prompts(tmp_path, demo_assets):
    raw = raw_config(tmp_path / "storage", demo_assets)
    with pytest.raises(ConfigError, match="needs a rounds: section"):
        plan_rounds(config_from_dict({**raw, "rounds": None}), "x")
    with pytest.raises(ConfigError, match="needs a judge: section"):
        plan_rounds(config_from_dict({**raw, "judge": None}), "x")
    with pytest.raises(ConfigError, match=r"rounds need 32 prompts \(8 held out \+ 2 rounds x 12\), and the source has 30"):
        check_prompt_count(config_from_dict(raw), 30, "the source")
    with pytest.raises(ConfigError, match="rounds.iterations: 0 is below the minimum 1"):
        config_from_dict({**raw, "rounds": {**ROUNDS, "iterations": 0}})


def test_win_rate_counts_wins_ties_and_losses():
    base = {"a": (1.0, 4), "b": (0.0, 6), "c": (2.0, 2), "d": (0.5, 8)}
    policy = {"a": (2.0, 5), "b": (0.0, 6), "c": (1.0, 4), "d": (0.5, 8), "x": (9.0, 1)}  # x: not held out
    result = win_rate(base, policy)
    assert (result["wins"], result["ties"], result["losses"], result["prompts_compared"]) == (1, 2, 1, 4)
    assert result["win_rate"] == pytest.approx((1 + 2 / 2) / 4)
    assert result["mean_reward"] == pytest.approx(3.5 / 4)
    assert result["mean_length"] == pytest.approx(23 / 4) and result["length_drift"] == pytest.approx(23 / 4 - 5)
    assert win_rate(base, base)["win_rate"] == 0.5


# --- the flow -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rounds(prefect_harness, tmp_path_factory, demo_assets):
    """Two tiny rounds on the demo, run once for the module's tests."""
    from flows.rounds_flow import dpo_rounds

    config = write_config(tmp_path_factory.mktemp("rounds") / "rounds.yaml", demo_assets)
    cfg = load_config(config)
    state = dpo_rounds(config=cfg.to_dict(), name="tiny", return_state=True)
    return config, cfg, state


def test_two_rounds_end_to_end(tiny_rounds):
    config, cfg, state = tiny_rounds
    result = state.result()
    storage = Path(cfg.storage)
    summary = json.loads((storage / "rounds" / "tiny" / "rounds.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2] and summary["rounds"] == result["rounds"]
    zero, *trained = summary["rounds"]
    assert zero["win_rate"] == 0.5 and zero["ties"] == 8 and zero["prompts_compared"] == 8
    for r, record in enumerate(trained, 1):
        assert record["prompts"] == 12 and record["samples"] == 48
        assert record["pairs"] + record["dropped"] == 12 and record["pairs"] > 0
        assert record["wins"] + record["ties"] + record["losses"] == 8
        assert 0 <= record["win_rate"] <= 1
        run = Path(record["run_dir"])
        final_eval = json.loads((run / "run.json").read_text()).get("final_eval") or {}
        assert record["eval_reward_accuracy"] == final_eval.get("eval/rewards/accuracies")
        assert run.name == f"tiny-round{r}" and (run / "run.json").is_file()
        win = json.loads((run / "winrate.json").read_text())
        assert win["round"] == r and win["win_rate"] == record["win_rate"]
        assert "Win rate against the starting policy" in (run / "report.html").read_text()
    # round 1 starts from the reference (step-0 check), round 2 from round 1's policy (none)
    step0 = [any("step0/max_mean_token_diff" in json.loads(line) for line in
                 (Path(record["run_dir"]) / "metrics.jsonl").read_text().splitlines()) for record in trained]
    assert step0 == [True, False]
    html = (storage / "rounds" / "tiny" / "report.html").read_text()
    assert "win rate vs round 0" in html and "tiny-round2" in html and "<img" in html
    assert {p.name for p in (storage / "rounds" / "tiny").iterdir()} >= {"rounds.json", "report.html",
                                                                          "round-0.json", "round-2.json"}


def test_a_rerun_skips_every_stage_and_status_lists_the_rounds(tiny_rounds, capsys):
    from flows.rounds_flow import dpo_rounds

    config, cfg, _ = tiny_rounds
    storage = Path(cfg.storage)
    before = mtimes(storage / "generations") | mtimes(storage / "judgements") | mtimes(storage / "runs")
    state = dpo_rounds(config=cfg.to_dict(), name="tiny", return_state=True)
    assert state.is_completed()
    after = mtimes(storage / "generations") | mtimes(storage / "judgements") | mtimes(storage / "runs")
    changed = [str(p) for p in after if after[p] != before.get(p) and p.name not in ("report.html", "winrate.json")]
    assert not changed, changed
    states = {run.name.rsplit("-", 1)[0] if not run.name.startswith(("generate ", "judge ")) else run.name: run.state.name
              for run in task_runs_of(state)}
    subflows = states.pop("dpo-pipeline")  # each round's prepare -> score -> audit -> train (its files: above)
    assert subflows == "Completed" and set(states) == {"prompts", *(f"{stage} {what}round {r}" for stage in
                                                                   ("generate", "judge") for what in ("", "eval ")
                                                                   for r in (0, 1, 2) if (what, r) != ("", 0))}
    assert all(name == "Skipped" for name in states.values()), states
    capsys.readouterr()
    assert main(["status", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "rounds tiny: 2 rounds" in out
    for r in (0, 1, 2):
        assert f"  round {r}: finished: mean reward" in out


def test_status_says_where_unfinished_rounds_stopped(tmp_path, demo_assets, capsys):
    config = write_config(tmp_path / "fresh.yaml", demo_assets)
    assert main(["status", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "  round 0: stopped in eval generate" in out
    assert "  round 1: not started (round 0 has not finished)" in out


# --- slow: the demo, and kill -9 -------------------------------------------------------------------


@pytest.mark.slow
def test_demo_rounds_raise_the_reward_and_the_win_rate_and_a_rerun_skips(tmp_path):
    """`dpo demo --rounds 2 --storage DIR` as a user runs it (docs/rounds.md, README)."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([DPO, "demo", "--rounds", "2", "--storage", str(tmp_path / "storage"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = json.loads((tmp_path / "storage" / "rounds" / "demo" / "rounds.json").read_text())["rounds"]
    rewards, wins = [r["mean_reward"] for r in rounds], [r["win_rate"] for r in rounds]
    assert rewards[0] < rewards[1] < rewards[2], rewards
    assert wins[0] == 0.5 < wins[1] < wins[2], wins
    for r in rounds:
        assert f"round {r['round']}: mean reward {r['mean_reward']:.3f}, win rate {r['win_rate']:.3f}" in done.stderr
    before = digests(tmp_path / "storage")
    again = subprocess.run([DPO, "demo", "--rounds", "2", "--storage", str(tmp_path / "storage"), "--no-progress"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "up to date" in again.stderr and " ran: " not in again.stderr
    assert digests(tmp_path / "storage") == before


@pytest.mark.slow
def test_kill_9_inside_round_2_generate_then_the_same_command_ends_with_the_same_bytes(tmp_path, demo_assets):
    config = write_config(tmp_path / "rounds.yaml", demo_assets, generate={**GENERATE, "shard_prompts": 1})
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    command = [DPO, "rounds", "-c", str(config), "--no-progress"]
    storage = tmp_path / "storage"
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = digests(storage)
    round2 = json.loads((storage / "rounds" / "tiny" / "round-2.json").read_text())["generations"]
    for child in list(storage.iterdir()):  # the same folder again, from nothing
        if child.is_dir():
            subprocess.run(["rm", "-rf", str(child)], check=True)

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    deadline = time.monotonic() + 600
    target = Path(round2)
    while time.monotonic() < deadline and len(list(target.glob("part-*.parquet"))) < 2:
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    progress = json.loads((target / "manifest.json").read_text()) if (target / "manifest.json").exists() else {}
    assert progress.get("complete") is not True, "killed too late: round 2's generate had finished"
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = digests(storage)
    assert sorted(resumed) == sorted(uninterrupted)
    assert [name for name in resumed if resumed[name] != uninterrupted[name]] == []

"""`dpo generate`, `dpo judge` and the refusals of `dpo rounds` as a user meets them (issue 30).

generate then judge on the demo: the summaries, the last line of stdout the output folder, the
pairs file that `dpo prepare` then reads. Bad input is one `error:` line with nothing written:
a prompts column absent, a judge function missing, raising or returning NaN or a non-number, a
judge before its generations, rounds without a rounds: section, rounds.iterations 0.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from flows.cli.main import main

JUDGE_MODULE = textwrap.dedent('''
    def nan(prompt, completion):
        return float("nan")

    def text(prompt, completion):
        return "good"

    def boom(prompt, completion):
        raise ValueError("the verifier crashed")
''')


@pytest.fixture
def config(tmp_path, demo_assets, monkeypatch):
    """A config on the demo with a small generate: section and the demo's rule as the judge; the
    folder holding it is the current one, with a module of bad judges."""
    (tmp_path / "bad_judges.py").write_text(JUDGE_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "storage": "storage", "data": {"path": str(demo_assets["data"]), "eval_fraction": 0.1},
        "model": {"path": str(demo_assets["model"])}, "tokenize": {"max_length": 128, "max_prompt_length": 64},
        "generate": {"num_samples": 4, "max_new_tokens": 8, "num_prompts": 12, "shard_prompts": 6},
        "judge": {"function": "pipeline.models.assets:demo_reward"},
    }))
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_generate_then_judge_then_prepare_reads_the_pairs(config, capsys):
    code, out, err = run(["generate", "-c", str(config), "--no-progress"], capsys)
    assert code == 0, err
    generations = Path(out.splitlines()[-1])
    assert generations.parent.name == "generations" and (generations / "manifest.json").is_file()
    assert "12 prompts x 4 samples = 48 completions" in err
    code, out, err = run(["judge", "-c", str(config), "--no-progress"], capsys)
    assert code == 0, err
    judged = Path(out.splitlines()[-1])
    assert "48 completions of 12 prompts: reward mean" in err and "pairs file" in err
    manifest = json.loads((judged / "manifest.json").read_text())
    assert manifest["generations"] == generations.name
    pairs = [json.loads(line) for line in (judged / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == manifest["counts"]["pairs"] > 0
    assert all(p["chosen_reward"] - p["rejected_reward"] == p["margin"] > 0 for p in pairs)
    code, out, err = run(["prepare", "-c", str(config), "--set", f"data.path={judged / 'pairs.jsonl'}",
                          "--no-progress"], capsys)
    assert code == 0, err
    assert "format conversational" in err
    code, out, again = run(["judge", "-c", str(config), "--no-progress"], capsys)
    assert code == 0 and "judge: up to date" in again


def test_judge_before_generate_says_what_to_run(config, capsys):
    code, _, err = run(["judge", "-c", str(config)], capsys)
    assert code == 2 and "run `dpo generate -c CONFIG` first" in one_error_line(err)


def test_a_prompts_column_absent_is_one_line_and_writes_nothing(config, capsys):
    code, _, err = run(["generate", "-c", str(config), "--set", "generate.prompt_column=question"], capsys)
    line = one_error_line(err)
    assert code == 1 and "no column 'question'" in line and "generate.prompt_column" in line
    assert not (config.parent / "storage" / "prompts").exists()
    assert not (config.parent / "storage" / "generations").exists()


@pytest.mark.parametrize("function, message", [
    ("no_such_module:reward", "no_such_module"),
    ("bad_judges:missing", "missing"),
    ("bad_judges:boom", "the verifier crashed"),
    ("bad_judges:nan", "nan"),
    ("bad_judges:text", "str"),
])
def test_a_bad_judge_function_is_one_line_and_writes_nothing(config, capsys, function, message):
    assert run(["generate", "-c", str(config), "--no-progress"], capsys)[0] == 0
    code, _, err = run(["judge", "-c", str(config), "--set", f"judge.function={function}"], capsys)
    line = one_error_line(err)
    assert code == 1 and message in line.lower() and function.split(":")[0] in line, line
    assert not (config.parent / "storage" / "judgements").exists()
    sys.modules.pop("bad_judges", None)


@pytest.mark.parametrize("overrides, message", [
    (["--set", "rounds.iterations=0"], "rounds.iterations: 0 is below the minimum 1"),
    ([], "dpo rounds needs a rounds: section"),
    (["--set", "judge=null", "--set", "rounds.iterations=1"], "dpo rounds needs a judge: section"),
])
def test_rounds_refused_before_anything_runs(config, capsys, overrides, message):
    code, _, err = run(["rounds", "-c", str(config), *overrides], capsys)
    assert code == 2 and message in one_error_line(err)
    assert not (config.parent / "storage").exists()

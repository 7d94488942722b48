"""pipeline.judge.stage: a hand-built generations folder judged by a function, paired, reused."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.load import config_from_dict
from pipeline.errors import CacheError, JudgeError
from pipeline.judge.stage import PAIRS_FILE, judge, read_generations, rewards_table
from pipeline.storage import paths, trust
from pipeline.store import canonical_json, ensure_dir, fingerprint, read_manifest, write_manifest, write_parquet

GEN_SCHEMA = pa.schema([("prompt_id", pa.string()), ("sample", pa.int32()), ("token_ids", pa.list_(pa.int32())),
                        ("text", pa.string()), ("finish_reason", pa.string()), ("num_tokens", pa.int32())])
PROMPTS_SCHEMA = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()),
                            ("prompt_ids", pa.list_(pa.int32())), ("source_row", pa.int64())])

# prompt_id -> (prompt as read, its completions): rewarded by len(text) with the RULES below
PROMPTS = {
    "chat": ([{"role": "user", "content": "Name a colour."}], ["Blue.", "A deep red.", "Green, I think."]),
    "text": ("Say something kind:", ["You are great.", "Hi.", "Nice."]),
    "tie": ("Pick one:", ["aaa", "bbb", "ccc"]),
    "single": ("Only one:", ["Something.", "", "   "]),
    "close": ("Close call:", ["abcde", "abcdf", "abcdefg"]),
}
RULES = '''
import numpy as np

def reward(prompt, completion):
    if completion.endswith("g"):
        return np.float32(len(completion)) - np.float32(1.5)   # "close": margin 0.5 over 5
    return len(completion)                                     # an int: taken as a float
'''


def write_generations(storage: Path, prompts: dict = PROMPTS, shard_rows: int = 7) -> Path:
    """A generations folder and its prompts folder as generate writes them (by hand): rows in
    prompt order then sample, in shards of ``shard_rows``; returns the generations folder."""
    prompt_rows = {"prompt_id": [], "prompt": [], "prompt_ids": [], "source_row": []}
    rows = {name: [] for name in GEN_SCHEMA.names}
    for n, (pid, (prompt, texts)) in enumerate(prompts.items()):
        for name, value in zip(PROMPTS_SCHEMA.names, (pid, canonical_json(prompt), [1, 2, 3], n)):
            prompt_rows[name].append(value)
        for k, text in enumerate(texts):
            for name, value in zip(GEN_SCHEMA.names, (pid, k, list(range(len(text))), text, "stop", len(text))):
                rows[name].append(value)
    prompts_fp = fingerprint({"prompts": prompt_rows})
    prompts_dir = ensure_dir(paths.prompts_dir(storage, prompts_fp))
    sha = write_parquet(pa.table(prompt_rows, schema=PROMPTS_SCHEMA), prompts_dir / "prompts.parquet", 1024)
    write_manifest(prompts_dir, {"kind": "prompts", "fingerprint": prompts_fp, "complete": True,
                                 "files": {"prompts.parquet": {"sha256": sha, "rows": len(prompts)}}})
    gen_fp = fingerprint({"generations": rows})
    gen_dir = ensure_dir(paths.generations_dir(storage, gen_fp))
    table, shards = pa.table(rows, schema=GEN_SCHEMA), []
    for i, start in enumerate(range(0, table.num_rows, shard_rows)):
        part = table.slice(start, shard_rows)
        name = f"part-{i:05d}.parquet"
        shards.append({"file": name, "sha256": write_parquet(part, gen_dir / name, 1024), "rows": part.num_rows})
    write_manifest(gen_dir, {"kind": "generations", "fingerprint": gen_fp, "identity": {}, "prompts_dir": prompts_fp,
                             "shards": shards, "rows": table.num_rows, "complete": True})
    return gen_dir


def rules_module(tmp_path: Path, monkeypatch, source: str = RULES) -> str:
    """A judge module in its own folder on the Python path; returns its (unique) name."""
    name = f"judge_rules_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "code"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    return name


def make_config(storage: Path, judge_section: dict, **pairs):
    return config_from_dict({"storage": str(storage), "data": {"path": str(storage / "none.jsonl")},
                             "model": {"path": str(storage / "no-model")}, "judge": judge_section,
                             "pairs": pairs})


def test_judge_writes_rewards_pairs_and_drops(tmp_path, monkeypatch):
    storage = tmp_path / "storage"
    gen_dir = write_generations(storage)
    cfg = make_config(storage, {"function": f"{rules_module(tmp_path, monkeypatch)}:reward"}, min_margin=1.0)
    result = judge(cfg, gen_dir, show_progress=False)
    assert not result.skipped and result.stats["judged"] == 15 and result.stats["judge"] == "function"
    out = result.output_dir
    assert out.parent == storage / "judgements" and trust.verified_judgements(out) == result.manifest

    table = rewards_table(out)
    assert table.column_names == ["prompt_id", "sample", "reward"]
    assert table.schema.field("sample").type == pa.int32() and table.schema.field("reward").type == pa.float64()
    assert table["prompt_id"].to_pylist() == [p for p, (_, texts) in PROMPTS.items() for _ in texts]
    assert table["reward"].to_pylist()[:3] == [5.0, 11.0, 15.0]
    assert table["reward"].to_pylist()[-1] == 5.5

    counts = result.manifest["counts"]
    assert counts["pairs"] + counts["dropped"] == counts["prompts"] == 5
    assert counts["dropped_by_reason"] == {"below_min_margin": 1, "single_sample": 1, "tie": 1}
    assert (counts["completions"], counts["empty_completions"], counts["truncated"]) == (15, 2, 0)
    assert result.manifest["rewards"]["max"] == 15.0 and result.manifest["generations"] == gen_dir.name
    assert result.manifest["identity"] == paths.judgements_identity(cfg, gen_dir.name, True)

    lines = (out / PAIRS_FILE).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["prompt_id"] for r in rows] == ["chat", "text"]
    keys = ["chosen", "chosen_reward", "chosen_sample", "margin", "prompt", "prompt_id", "rejected",
            "rejected_reward", "rejected_sample"]
    assert all(list(r) == keys for r in rows) and all(line == json.dumps(r, sort_keys=True, ensure_ascii=False)
                                                       for line, r in zip(lines, rows))
    chat, text = rows
    assert chat["prompt"] == PROMPTS["chat"][0]
    assert chat["chosen"] == [{"role": "assistant", "content": "Green, I think."}]
    assert chat["rejected"] == [{"role": "assistant", "content": "Blue."}]
    assert (chat["chosen_sample"], chat["rejected_sample"], chat["margin"]) == (2, 0, 10.0)
    assert text["prompt"] == "Say something kind:" and (text["chosen"], text["rejected"]) == ("You are great.", "Hi.")
    assert isinstance(text["chosen_reward"], float) and isinstance(text["chosen_sample"], int)

    dropped = pq.read_table(out / paths.DROPPED).to_pylist()
    assert [(d["prompt_id"], d["reason"]) for d in dropped] == [
        ("tie", "tie"), ("single", "single_sample"), ("close", "below_min_margin")]


def test_rerun_is_skipped_and_byte_identical(tmp_path, monkeypatch):
    storage = tmp_path / "storage"
    gen_dir = write_generations(storage)
    cfg = make_config(storage, {"function": f"{rules_module(tmp_path, monkeypatch)}:reward"})
    first = judge(cfg, gen_dir, show_progress=False)
    before = {p.name: p.read_bytes() for p in first.output_dir.iterdir()}
    again = judge(cfg, gen_dir, show_progress=False)
    assert again.skipped and again.output_dir == first.output_dir and again.manifest == first.manifest

    for path in first.output_dir.iterdir():
        path.unlink()
    first.output_dir.rmdir()
    redo = judge(cfg, gen_dir, show_progress=False)
    assert not redo.skipped and {p.name: p.read_bytes() for p in redo.output_dir.iterdir()} == before

    no_pairs = judge(cfg, gen_dir, make_pairs=False, show_progress=False)
    assert no_pairs.output_dir != first.output_dir
    assert sorted(no_pairs.manifest["files"]) == [paths.REWARDS] and not (no_pairs.output_dir / PAIRS_FILE).exists()
    assert rewards_table(no_pairs.output_dir).equals(rewards_table(first.output_dir))


def test_damaged_output_is_refused_then_rewritten(tmp_path, monkeypatch):
    storage = tmp_path / "storage"
    gen_dir = write_generations(storage)
    cfg = make_config(storage, {"function": f"{rules_module(tmp_path, monkeypatch)}:reward"})
    out = judge(cfg, gen_dir, show_progress=False).output_dir
    with open(out / PAIRS_FILE, "a") as fh:
        fh.write("{}\n")
    with pytest.raises(CacheError, match="damaged"):
        trust.verified_judgements(out)
    with pytest.raises(CacheError):
        rewards_table(out)
    assert not judge(cfg, gen_dir, show_progress=False).skipped  # rewritten whole
    trust.verified_judgements(out)


def test_damaged_or_incomplete_generations_are_refused(tmp_path, monkeypatch):
    storage = tmp_path / "storage"
    gen_dir = write_generations(storage)
    assert len(read_generations(gen_dir).texts) == 15
    with open(gen_dir / "part-00001.parquet", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(CacheError, match="damaged"):
        read_generations(gen_dir)
    gen_dir = write_generations(tmp_path / "other")
    manifest = read_manifest(gen_dir)
    write_manifest(gen_dir, {**manifest, "complete": False})
    cfg = make_config(storage, {"function": f"{rules_module(tmp_path, monkeypatch)}:reward"})
    with pytest.raises(CacheError, match="incomplete") as info:
        judge(cfg, gen_dir, show_progress=False)
    assert "dpo generate" in str(info.value) and not (storage / "judgements").exists()


# --- a judge that fails writes nothing ---------------------------------------------------------------


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


BAD = {
    "module_missing": (None, "no module named"),
    "function_missing": ("def other(prompt, completion):\n    return 1.0\n", "has no reward"),
    "not_callable": ("reward = 3\n", "is a int, not a function"),
    "import_error": ("raise RuntimeError('broken\\nmodule')\n", "importing"),
    "raises": ("def reward(prompt, completion):\n    if completion == 'Hi.':\n"
               "        raise KeyError('no\\nluck')\n    return 1.0\n", "prompt_id text sample 1 raised KeyError"),
    "nan": ("def reward(prompt, completion):\n    return float('nan')\n", "returned nan"),
    "inf": ("import numpy as np\ndef reward(prompt, completion):\n    return -np.inf\n", "returned -inf"),
    "string": ("def reward(prompt, completion):\n    return '1.0'\n", "returned str"),
    "none": ("def reward(prompt, completion):\n    return None\n", "returned NoneType"),
    "bool": ("def reward(prompt, completion):\n    return len(completion) > 3\n", "returned bool"),
    "array": ("import numpy as np\ndef reward(prompt, completion):\n    return np.ones(2)\n", "not a number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_function_is_one_line_and_writes_nothing(case, tmp_path, monkeypatch):
    storage = tmp_path / "storage"
    gen_dir = write_generations(storage)
    source, expected = BAD[case]
    name = rules_module(tmp_path, monkeypatch, source) if source else "no_such_judge_module.rules"
    cfg = make_config(storage, {"function": f"{name}:reward"})
    before = tree(storage)
    with pytest.raises(JudgeError) as info:
        judge(cfg, gen_dir, show_progress=False)
    message = str(info.value)
    assert expected in message and "\n" not in message and message.startswith(f"judge.function {name}")
    assert tree(storage) == before  # not a folder, not a lock




# --- a reward model -----------------------------------------------------------------------------------


@pytest.fixture
def reward_model_dir(demo_tokenizer, tmp_path) -> Path:
    """A tiny one-label Llama classifier with the demo tokenizer (ChatML template)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(demo_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=demo_tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path / "rm"
    LlamaForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    demo_tokenizer.save_pretrained(folder)
    return folder


def test_judge_stage_with_a_reward_model(reward_model_dir, tmp_path):
    storage = tmp_path / "storage"
    gen_dir = write_generations(storage)
    cfg = make_config(storage, {"reward_model": str(reward_model_dir), "batch_size": 4, "max_length": 24,
                                "device": "cpu"})
    result = judge(cfg, gen_dir, show_progress=False)
    manifest = result.manifest
    assert manifest["identity"]["judge"]["kind"] == "reward_model" and result.stats["judge"] == "reward_model"
    assert manifest["identity"]["judge"]["max_length"] == 24 and manifest["judge"]["device"] == "cpu"
    assert manifest["counts"]["truncated"] > 0 and manifest["counts"]["completions"] == 15
    assert manifest["counts"]["pairs"] + manifest["counts"]["dropped"] == 5
    assert judge(cfg, gen_dir, show_progress=False).skipped

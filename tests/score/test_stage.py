"""The score stage: numerics against an independent float64 computation, the cache's contracts."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.errors import CacheError, ModelError, ScoreError
from pipeline.logprobs import response as logprobs
from pipeline.logprobs.backends.transformers_backend import TransformersScorer
from pipeline.prepare.stage import prepare
from pipeline.score.stage import score

from tests.conftest import varied_rows, write_jsonl


@pytest.fixture
def scored_setup(tmp_path, make_config):
    def make(rows=None, **sections):
        path = write_jsonl(tmp_path / "d.jsonl", rows or varied_rows())
        cfg = make_config(path, **sections)
        prepared = prepare(cfg, show_progress=False)
        return cfg, prepared

    return make


def read_scores(result) -> list[dict]:
    rows = []
    for shard in result.manifest["shards"]:
        rows += pq.read_table(result.output_dir / shard["file"]).to_pylist()
    return rows


def float64_reference(model_dir, prompt_ids, response_ids) -> np.ndarray:
    """Independent computation: a float64 copy of the model, one sequence at a time, full logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for prompt, response in zip(prompt_ids, response_ids):
            ids = torch.tensor([prompt + response])
            logps = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
            out.append(logps[positions, torch.tensor(response)].numpy())
    return out


@pytest.mark.parametrize("prefix_sharing", [True, False])
@pytest.mark.parametrize("tokens_per_batch", [40, 300, 100000])
def test_sums_match_float64_per_example(scored_setup, demo_assets, tokens_per_batch, prefix_sharing):
    cfg, prepared = scored_setup(
        score={"tokens_per_batch": tokens_per_batch, "shard_rows": 16, "prefix_sharing": prefix_sharing}
    )
    result = score(cfg, show_progress=False)
    examples = pq.read_table(prepared.output_dir / "examples.parquet").to_pylist()
    scores = read_scores(result)
    assert [s["id"] for s in scores] == [e["id"] for e in examples]  # original order
    prompts = [e["prompt_ids"] for e in examples]
    for side in ("chosen", "rejected"):
        reference = float64_reference(demo_assets["model"], prompts, [e[f"{side}_ids"] for e in examples])
        for s, e, ref in zip(scores, examples, reference):
            assert abs(s[f"{side}_logp"] - ref.sum()) < 1e-4
            assert np.abs(np.array(s[f"{side}_token_logps"]) - ref).max() < 1e-4
            # Per-token values sum to the stored sum; token counts are the response lengths.
            assert s[f"{side}_logp"] == pytest.approx(np.sum(np.array(s[f"{side}_token_logps"], np.float64)), abs=1e-9)
            assert s[f"{side}_tokens"] == len(e[f"{side}_ids"]) == len(s[f"{side}_token_logps"])


def test_batches_are_sorted_and_within_budget(scored_setup):
    cfg, _ = scored_setup(score={"tokens_per_batch": 64})
    scorer = TransformersScorer(cfg)
    lengths = [5, 30, 12, 64, 1, 33, 33, 2]
    groups = scorer.batches(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths, reverse=True)
    for group in groups:
        assert len(group) == 1 or lengths[group[0]] * len(group) <= 64


def test_shared_prefix_packing_layout():
    batch = logprobs.pack_pairs([[1, 2, 3]], [[4, 5]], [[6, 7, 8]], packing="none")
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    assert batch.lengths == [2, 3]
    # chosen 4, 5 predicted from 3, 4; rejected 6, 7, 8 from 3 (last prompt token), 6, 7
    assert batch.cols.tolist() == [2, 3, 2, 5, 6]
    mask = logprobs.dense_mask(batch.segments)[0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True, False, False]  # 6 skips 4, 5
    assert mask[4].tolist() == [True] * 5 + [False] * 3


def test_token_logps_only_at_response_positions(monkeypatch):
    """The LM head sees only response positions, in chunks; values equal the full computation."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 8)
    head = torch.nn.Linear(8, 11, bias=False)
    seen = []
    monkeypatch.setattr(logprobs, "LOGSOFTMAX_CHUNK", 4)
    batch = logprobs.pack([[1, 2], [3], [4, 5, 6]], [[7, 8, 9], [1, 2, 3, 4, 5, 6], [2]], pad_id=0)
    recording = lambda x: (seen.append(x.shape[0]), head(x))[1]  # noqa: E731
    got = logprobs.token_logps(hidden, batch.rows, batch.cols, batch.targets, recording)
    assert sum(seen) == 10 and max(seen) <= 4  # 10 response tokens, never [B, T, V]
    full = torch.log_softmax(head(hidden).double(), dim=-1)
    expected = full[batch.rows, batch.cols, batch.targets]
    assert torch.allclose(got.double(), expected, atol=1e-6)
    # sequence 1: prompt [3] predicts 6 tokens from positions 0..5
    assert batch.cols[3:9].tolist() == [0, 1, 2, 3, 4, 5] and batch.lengths == [3, 6, 1]


def test_rerun_is_skipped_same_directory(scored_setup):
    cfg, _ = scored_setup()
    first = score(cfg, show_progress=False)
    shard = first.output_dir / "part-00000.parquet"
    stamp = os.stat(shard).st_mtime_ns
    again = score(cfg, show_progress=False)
    assert again.skipped and again.output_dir == first.output_dir
    assert os.stat(shard).st_mtime_ns == stamp
    other = score(cfg.__class__(**{**cfg.__dict__}), show_progress=False)
    assert other.output_dir == first.output_dir
    # A different layout or dtype is a different cache.
    cfg.score.store_token_logps = False
    lean = score(cfg, show_progress=False)
    assert lean.output_dir != first.output_dir
    assert "chosen_token_logps" not in pq.read_schema(lean.output_dir / "part-00000.parquet").names
    metadata = pq.read_schema(lean.output_dir / "part-00000.parquet").metadata
    assert metadata[b"dpo_pipeline.fingerprint"].decode() == lean.output_dir.name


def test_resume_after_crash_is_byte_identical(scored_setup, monkeypatch, tmp_path):
    cfg, _ = scored_setup(score={"shard_rows": 7})
    reference = score(cfg, show_progress=False)
    expected = {p.name: p.read_bytes() for p in reference.output_dir.iterdir()}
    assert len(expected) == 7  # 6 shards + manifest

    import pipeline.score.shards as score_module
    import pipeline.score.stage

    # The progress manifest after every shard (by default at most every 2 s), so that both cases
    # happen: a shard on disk and listed, and one on disk but not yet listed.
    monkeypatch.setattr(pipeline.score.stage, "PROGRESS_EVERY_S", 0.0)
    # Crash (as a kill would) right after the 3rd shard file is renamed into place, before the
    # progress manifest records it; and once more, after a recorded shard.
    for crash_after in (3, 5):
        shutil.rmtree(reference.output_dir)
        real_write = score_module.write_parquet
        calls = {"n": 0}

        def crashing_write(*args, **kwargs):
            sha = real_write(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == crash_after:
                raise KeyboardInterrupt("simulated kill")
            return sha

        monkeypatch.setattr(score_module, "write_parquet", crashing_write)
        with pytest.raises(KeyboardInterrupt):
            score(cfg, show_progress=False)
        monkeypatch.setattr(score_module, "write_parquet", real_write)
        partial = json.loads((reference.output_dir / "manifest.json").read_text())
        assert partial["complete"] is False and len(partial["shards"]) == crash_after - 1
        scored = []
        real_pairs = TransformersScorer.score_pairs
        monkeypatch.setattr(
            TransformersScorer, "score_pairs",
            lambda self, p, c, r, progress=None, rows=None: scored.append(len(p)) or real_pairs(self, p, c, r, progress),
        )
        resumed = score(cfg, show_progress=False)
        monkeypatch.setattr(TransformersScorer, "score_pairs", real_pairs)
        assert len(scored) == 6 - crash_after  # only the missing shards were scored
        assert {p.name: p.read_bytes() for p in resumed.output_dir.iterdir()} == expected


@pytest.mark.slow  # a real kill -9 of a child process: ~40 s; CI runs it in make test-slow
def test_kill_9_then_resume_is_byte_identical(tmp_path, demo_assets):
    """A real `kill -9` of `dpo score` mid-run, then a rerun, gives the uninterrupted bytes."""
    rows = varied_rows(200)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    dpo = str(Path(sys.executable).parent / "dpo")

    def config(storage):
        path = tmp_path / f"{storage}.yaml"
        path.write_text(
            f"storage: {tmp_path / storage}\ndata:\n  path: {data}\nmodel:\n  path: {demo_assets['model']}\n"
            "score:\n  shard_rows: 5\n  tokens_per_batch: 64\n"
        )
        return str(path)

    env = {**os.environ, "DPO_HASH_CACHE": str(tmp_path / "hashes")}
    for storage in ("a", "b"):
        subprocess.run([dpo, "prepare", "-c", config(storage), "--no-progress"], check=True,
                       capture_output=True, env=env)
    done = subprocess.run([dpo, "score", "-c", config("a"), "--no-progress"], check=True,
                          capture_output=True, text=True, env=env)
    out_a = Path(done.stdout.strip().splitlines()[-1])

    proc = subprocess.Popen([dpo, "score", "-c", config("b"), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out_b = tmp_path / "b" / "refscores" / out_a.name
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out_b.glob("part-*.parquet"))) < 3:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The progress manifest is written at most every 2 s: it may list some shards or none yet.
    if (out_b / "manifest.json").exists():
        manifest = json.loads((out_b / "manifest.json").read_text())
        assert manifest["complete"] is False, "the run finished before it could be killed"
    again = subprocess.run([dpo, "score", "-c", config("b"), "--no-progress"], check=True,
                           capture_output=True, text=True, env=env)
    assert again.stdout.strip().splitlines()[-1] == str(out_b)
    assert "resuming" in again.stderr
    files_a = {p.name: p.read_bytes() for p in out_a.iterdir()}
    files_b = {p.name: p.read_bytes() for p in out_b.iterdir()}
    assert files_a == files_b


def test_damaged_or_foreign_shards_are_rescored_and_foreign_files_refused(scored_setup):
    cfg, _ = scored_setup(score={"shard_rows": 10})
    result = score(cfg, show_progress=False)
    manifest_path = result.output_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = result.output_dir / "part-00001.parquet"
    original = shard.read_bytes()

    def rescored_after(damage, listed: bool = True) -> dict:
        shards = manifest["shards"] if listed else [s for s in manifest["shards"] if s["file"] != shard.name]
        manifest_path.write_text(json.dumps({**manifest, "shards": shards, "complete": False}))
        damage()
        again = score(cfg, show_progress=False)
        assert shard.read_bytes() == original and again.manifest["complete"]
        return again.stats["rescored"]

    # Truncated, listed: the manifest's sha256 no longer matches.
    assert "sha256 differs" in rescored_after(lambda: shard.write_bytes(original[:-10]))[shard.name]
    # Truncated, not listed: not even readable.
    assert "cannot be read" in rescored_after(lambda: shard.write_bytes(original[:-10]), listed=False)[shard.name]
    # A shard of another cache, not listed in the manifest.
    def foreign():
        table = pq.read_table(shard)
        meta = {**table.schema.metadata, b"dpo_pipeline.fingerprint": b"0" * 64}
        pq.write_table(table.replace_schema_metadata(meta), shard)
    assert rescored_after(foreign, listed=False) == {shard.name: "it was written for another cache"}
    # A file that is not ours is never deleted: the run stops and says what to do.
    manifest_path.write_text(json.dumps({**manifest, "complete": False}))
    (result.output_dir / "notes.txt").write_text("hi")
    with pytest.raises(ScoreError, match="foreign file .*notes.txt"):
        score(cfg, show_progress=False)
    assert (result.output_dir / "notes.txt").read_text() == "hi"


def test_non_finite_logprobs_stop_with_ids(scored_setup, tmp_path, demo_assets, make_config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"]))
    rows = varied_rows(12)
    for row in rows[:3]:
        row["chosen"] += " qqq"  # letters no other row uses
    # Poison the embedding of one token that only some responses use.
    probe = prepare(make_config(write_jsonl(tmp_path / "probe.jsonl", rows)), show_progress=False)
    examples = pq.read_table(probe.output_dir / "examples.parquet").to_pylist()
    def users(token):
        return {e["id"] for e in examples if token in e["prompt_ids"] + e["chosen_ids"] + e["rejected_ids"]}

    # A token used by some examples but not all: only those must be named.
    token = next(t for e in examples for t in e["chosen_ids"] if 0 < len(users(t)) < len(examples) // 2)
    bad_ids = users(token)
    assert 0 < len(bad_ids) < len(examples)
    # Untie the LM head first: a NaN row in a tied head would poison every position's softmax.
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    poisoned = tmp_path / "poisoned"
    model.save_pretrained(poisoned)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_assets["model"] / name, poisoned / name)
    cfg = make_config(tmp_path / "probe.jsonl", model_path=poisoned)
    prepare(cfg, show_progress=False)
    with pytest.raises(ScoreError, match="non-finite") as err:
        score(cfg, show_progress=False)
    named = set(str(err.value).split("ids ")[1].split(";")[0].split(", "))
    assert named and named <= bad_ids
    assert f"for {len(bad_ids)} examples" in str(err.value)
    assert not list(Path(cfg.storage, "refscores").glob("*/part-*.parquet"))


def test_bad_models_fail_before_work(tmp_path, demo_assets, make_config, demo_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", varied_rows(4))
    # 1. Not prepared yet.
    with pytest.raises(CacheError, match="run `dpo prepare"):
        score(make_config(path), show_progress=False)
    # 2. Not a causal LM (a T5 config), with the demo tokenizer beside it.
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 2000, "d_model": 8}))
    (t5 / "model.safetensors").write_bytes(b"not used")
    demo_tokenizer.save_pretrained(t5)
    cfg = make_config(path, model_path=t5)
    prepare(cfg, show_progress=False)
    with pytest.raises(ModelError, match="not a causal language model"):
        score(cfg, show_progress=False)
    # 3. A vocabulary smaller than the dataset's token ids.
    from transformers import LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(small)
    demo_tokenizer.save_pretrained(small)
    cfg = make_config(path, model_path=small)
    prepare(cfg, show_progress=False)
    with pytest.raises(ModelError, match="token id .* vocabulary has 100"):
        score(cfg, show_progress=False)
    # 4. No safetensors weights.
    (small / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no .safetensors"):
        score(cfg, show_progress=False)


def test_auto_backend_here_is_transformers_and_says_why(scored_setup, caplog):
    cfg, _ = scored_setup()
    with caplog.at_level(logging.INFO, logger="dpo.score"):
        result = score(cfg, show_progress=False)
    assert result.manifest["inputs"]["backend"] == "transformers"  # no measurement says vLLM is faster anywhere
    reason = "no CUDA GPU" if not torch.cuda.is_available() else "no measurement shows vLLM scoring faster"
    assert any("backend auto: transformers" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_auto_backend_follows_the_measured_table(monkeypatch, demo_assets):
    """auto picks vLLM only on a card and model size a measurement found it faster on (the table),
    with the reason; a model larger than measured, another card, no vLLM or no GPU: transformers."""
    from pipeline.config.schema import ModelConfig
    from pipeline.logprobs import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(backends, "vllm_available", lambda: True)
    tiny = ModelConfig(path=str(demo_assets["model"]))
    size = backends.model_billions(tiny)
    assert 0 < size < 0.01  # the demo model: 2 layers of 64, a 1,024-token vocabulary
    choice, why = backends.auto_backend(tiny)
    assert choice == "transformers" and "no measurement shows vLLM scoring faster on NVIDIA H100" in why
    monkeypatch.setattr(backends, "VLLM_MEASURED_FASTER", (("H100", 8.0),))
    assert backends.auto_backend(tiny) == ("vllm", "measured faster than transformers on H100 up to 8B parameters")
    assert backends.resolve_backend("auto", tiny) == "vllm"
    monkeypatch.setattr(backends, "VLLM_MEASURED_FASTER", (("H100", size / 2),))
    assert backends.auto_backend(tiny)[0] == "transformers"  # larger than what was measured
    monkeypatch.setattr(backends, "VLLM_MEASURED_FASTER", (("H200", 8.0),))
    assert backends.auto_backend(tiny)[0] == "transformers"  # another card
    monkeypatch.setattr(backends, "vllm_available", lambda: False)
    assert backends.auto_backend(tiny) == ("transformers", "vLLM is not installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backends.auto_backend(tiny) == ("transformers", "no CUDA GPU")

"""generate: shards and manifest, the slice, a rerun skipped, a killed run resumed to the same
bytes, batch_size out of the identity, a slice past the end refused before anything is written,
two local workers or Ray workers writing the bytes of one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.errors import CacheError, ConfigError, GenerateError
from pipeline.generate.stage import generate, generation_table, prompts_table, read_prompts
from pipeline.storage import locate, trust
from pipeline.store import MANIFEST, read_manifest, write_manifest

GENERATE = {"first_prompt": 2, "num_prompts": 5, "num_samples": 2, "max_new_tokens": 6, "shard_prompts": 2,
            "temperature": 1.0, "top_p": 0.95, "batch_size": 4}


@pytest.fixture
def gen_config(demo_assets, make_config):
    def make(**generate_options):
        return make_config(demo_assets["data"], tokenize={"max_length": 128, "max_prompt_length": 64},
                           generate={**GENERATE, **generate_options})

    return make


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_shards_manifest_and_the_slice(gen_config, demo_tokenizer):
    cfg = gen_config()
    result = generate(cfg, show_progress=False)
    assert not result.skipped and result.stats["sequences"] == 10 and result.stats["backend"] == "transformers"
    assert sorted(p.name for p in result.output_dir.iterdir()) == [MANIFEST, "part-00000.parquet",
                                                                   "part-00001.parquet", "part-00002.parquet"]
    manifest = result.manifest
    assert manifest == trust.verified_generations(result.output_dir) == read_manifest(result.output_dir)
    assert manifest["kind"] == "generations" and manifest["complete"] is True
    assert (manifest["rows"], manifest["prompts"], manifest["samples_per_prompt"]) == (10, 5, 2)
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]
    prompts_dir = read_prompts(cfg, show_progress=False).output_dir
    assert manifest["prompts_dir"] == prompts_dir.name
    assert result.output_dir == locate.generations_dir_for(cfg, prompts_dir.name)
    assert prompts_dir == locate.prompts_dir_for(cfg)
    table = generation_table(result.output_dir)
    positions = prompts_table(prompts_dir).column("prompt_id").to_pylist()[2:7]
    assert table.column("prompt_id").to_pylist() == [p for p in positions for _ in range(2)]
    assert table.column("sample").to_pylist() == [0, 1] * 5
    rows = table.to_pylist()
    assert all(r["num_tokens"] == len(r["token_ids"]) <= 6 and 2 not in r["token_ids"] for r in rows)
    assert all(r["text"] == demo_tokenizer.decode(r["token_ids"], skip_special_tokens=True) for r in rows)
    assert all(r["finish_reason"] == ("length" if r["num_tokens"] == 6 else "stop") for r in rows)
    assert manifest["tokens"] == sum(r["num_tokens"] for r in rows) == result.stats["tokens"]
    assert sum(manifest["finish_reasons"].values()) == 10
    again = generate(cfg, show_progress=False)
    assert again.skipped and again.manifest == manifest


def test_a_killed_run_resumes_to_the_same_bytes(gen_config):
    cfg = gen_config()
    first = generate(cfg, show_progress=False)
    out = first.output_dir
    before = _hashes(out)
    # Killed after writing shard 2 but before listing it: shard 1 never written, no final manifest.
    (out / MANIFEST).unlink()
    (out / "part-00001.parquet").unlink()
    resumed = generate(cfg, show_progress=False)
    assert not resumed.skipped and resumed.stats["shards_sampled"] == 1 and resumed.stats["shards_kept"] == 2
    assert _hashes(out) == before
    # A damaged shard is not trusted: found by the manifest's sha256, sampled again.
    shard = out / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-9] + b"damaged!!")
    with pytest.raises(CacheError):
        trust.verified_generations(out)
    repaired = generate(cfg, show_progress=False)
    assert repaired.stats["shards_sampled"] == 1 and _hashes(out) == before


def test_batch_size_changes_neither_the_folder_nor_the_bytes(gen_config, tmp_path):
    first = generate(gen_config(), show_progress=False)
    cfg = gen_config(batch_size=1)
    cfg.storage = str(tmp_path / "other-storage")
    other = generate(cfg, show_progress=False)
    assert other.output_dir.name == first.output_dir.name
    assert _hashes(other.output_dir) == _hashes(first.output_dir)


def test_a_slice_past_the_end_is_refused_before_anything_is_written(gen_config, tmp_path):
    cfg = gen_config(first_prompt=100_000)
    with pytest.raises(GenerateError) as info:
        generate(cfg, show_progress=False)
    count = read_prompts(cfg, show_progress=False).manifest["count"]
    assert f"the prompts table has {count} prompts" in str(info.value)
    assert not (Path(cfg.storage) / "generations").exists()


def test_a_slice_cut_at_the_end(gen_config):
    cfg = gen_config(num_prompts=None, first_prompt=0, num_samples=1, max_new_tokens=2, shard_prompts=64,
                     batch_size=64)
    count = read_prompts(cfg, show_progress=False).manifest["count"]
    cfg.generate.first_prompt, cfg.generate.num_prompts = count - 3, 10
    result = generate(cfg, show_progress=False)
    assert result.manifest["prompts"] == 3 and pq.read_metadata(result.output_dir / "part-00000.parquet").num_rows == 3


def test_a_prompts_samples_do_not_depend_on_its_slice(gen_config, tmp_path):
    whole = generation_table(generate(gen_config(), show_progress=False).output_dir).to_pylist()
    cfg = gen_config(first_prompt=4, num_prompts=2, batch_size=3)
    cfg.storage = str(tmp_path / "other-storage")
    part = generation_table(generate(cfg, show_progress=False).output_dir).to_pylist()
    by_key = {(r["prompt_id"], r["sample"]): r["token_ids"] for r in whole}
    assert len(part) == 4 and all(by_key[(r["prompt_id"], r["sample"])] == r["token_ids"] for r in part)


def test_a_changed_value_is_caught_by_the_shards_value_checksums(gen_config):
    """Each shard carries a sha256 of each column's values (as reference caches do): a shard
    rewritten with one changed token, its manifest made to match, is refused by every reader."""
    import pyarrow as pa

    from pipeline.errors import ValueProofError
    from pipeline.judge.stage import read_generations
    from pipeline.store import sha256_file

    result = generate(gen_config(), show_progress=False)
    path = result.output_dir / "part-00001.parquet"
    table = pq.read_table(path)
    tokens = table.column("token_ids").to_pylist()
    tokens[0] = [tokens[0][0] + 1, *tokens[0][1:]] if tokens[0] else [5]
    changed = table.set_column(table.schema.get_field_index("token_ids"), table.schema.field("token_ids"),
                               pa.array(tokens, type=table.schema.field("token_ids").type))
    pq.write_table(changed.replace_schema_metadata(table.schema.metadata), path)
    manifest = read_manifest(result.output_dir)
    manifest["shards"][1]["sha256"] = sha256_file(path, use_cache=False)
    write_manifest(result.output_dir, manifest)
    with pytest.raises(ValueProofError, match="token_ids differ from the checksum"):
        generation_table(result.output_dir)
    with pytest.raises(CacheError, match="token_ids differ from the checksum"):
        read_generations(result.output_dir)


def test_two_local_workers_write_the_bytes_of_one_and_resume_the_same(gen_config, tmp_path):
    """generate.workers 2 (two spawned processes on the CPU, each with the coordinator's torch
    threads): the folder and every file as one in-process worker writes them; a run resumed on
    two workers samples only the missing shards and ends the same."""
    one = generate(gen_config(shard_prompts=1), show_progress=False)
    cfg = gen_config(shard_prompts=1, workers=2)
    cfg.storage = str(tmp_path / "two-workers")
    two = generate(cfg, show_progress=False)
    assert (two.stats["workers"], two.stats["runner"], two.stats["shards_sampled"]) == (2, "local", 5)
    assert two.stats["sequences"] == 10 and two.stats["tokens"] == one.stats["tokens"]
    assert two.stats["device"] == "cpu"
    assert two.output_dir.name == one.output_dir.name
    assert _hashes(two.output_dir) == _hashes(one.output_dir)
    # Killed with shards 1 and 3 not written: the manifest still incomplete.
    manifest = read_manifest(two.output_dir)
    write_manifest(two.output_dir, {**manifest, "complete": False})
    for name in ("part-00001.parquet", "part-00003.parquet"):
        (two.output_dir / name).unlink()
    resumed = generate(cfg, show_progress=False)
    assert (resumed.stats["workers"], resumed.stats["shards_sampled"], resumed.stats["shards_kept"]) == (2, 2, 3)
    assert _hashes(resumed.output_dir) == _hashes(one.output_dir)


def test_workers_must_be_at_least_one(gen_config):
    with pytest.raises(ConfigError, match="generate.workers"):
        gen_config(workers=0)


@pytest.mark.slow  # a local Ray with two actors: ~1 min on 2 cores
def test_ray_workers_write_the_bytes_of_one(gen_config, tmp_path, monkeypatch):
    """generate.runner ray (a local Ray for the run), two workers: the bytes of one worker's."""
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    one = generate(gen_config(shard_prompts=1), show_progress=False)
    cfg = gen_config(shard_prompts=1, workers=2, runner="ray")
    cfg.storage = str(tmp_path / "ray")
    result = generate(cfg, show_progress=False)
    assert (result.stats["runner"], result.stats["workers"], result.stats["shards_sampled"]) == ("ray", 2, 5)
    assert result.output_dir.name == one.output_dir.name
    assert _hashes(result.output_dir) == _hashes(one.output_dir)

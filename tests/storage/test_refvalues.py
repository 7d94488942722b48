"""A reference value is used only when proven (issue 20 §1): a damaged value is rescored by
`dpo score`, named row by row by `dpo audit`, and never reaches training.

The case that was silent before: a cache's manifest deleted, one bit of ``chosen_logp[0]`` in
``part-00001.parquet`` flipped (the file rewritten as valid Parquet with its metadata), then
`dpo score` adopted the shard, the audit passed and training used the value. The same with the
bit flipped in the per-token column only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import store
from pipeline.audit.checks import audit
from pipeline.config.load import config_from_dict
from pipeline.errors import TrainError
from pipeline.models.assets import demo_preferences
from pipeline.prepare.stage import prepare
from pipeline.score.shards import scores_schema, shard_table
from pipeline.score.stage import score
from pipeline.storage import refvalues, trust
from pipeline.train.stage import train

from tests.conftest import write_jsonl

TRAIN = {"per_device_train_batch_size": 4, "max_steps": 2, "eval_steps": 0, "save_steps": 0, "learning_rate": 1e-3}
SHARD = "part-00001.parquet"


@pytest.fixture(scope="module")
def scored_once(tmp_path_factory, demo_assets):
    """60 demo rows scored in 4 shards of 16 (the issue's repro); copied by each test."""
    root = tmp_path_factory.mktemp("proof")
    raw = {"storage": str(root / "storage"), "data": {"path": str(write_jsonl(root / "d.jsonl", demo_preferences(60)))},
           "model": {"path": str(demo_assets["model"])}, "score": {"shard_rows": 16},
           "tokenize": {"max_length": 128, "max_prompt_length": 64}, "train": TRAIN}
    cfg = config_from_dict(raw)
    prepare(cfg, show_progress=False)
    cache = score(cfg, show_progress=False).output_dir
    return raw, root / "storage", cache.relative_to(root / "storage")


@pytest.fixture
def cached(scored_once, tmp_path):
    raw, storage, cache = scored_once
    shutil.copytree(storage, tmp_path / "storage")
    cfg = config_from_dict({**raw, "storage": str(tmp_path / "storage")})
    cache_dir = tmp_path / "storage" / cache
    return cfg, cache_dir, {p.name: p.read_bytes() for p in cache_dir.iterdir()}


def flip_bit(value: float, bit: int, dtype) -> float:
    """``value`` with one bit of its IEEE representation flipped (bit 52 of a float64: the
    exponent's lowest bit, -41.80 -> -83.61)."""
    raw = np.array([value], dtype)
    ints = raw.view(np.uint64 if raw.itemsize == 8 else np.uint32)
    ints ^= type(ints[0])(1) << type(ints[0])(bit)
    return float(ints.view(dtype)[0])


def damage(path: Path, column: str) -> tuple[str, float, float]:
    """Flip one exponent bit of row 0's ``column`` (a per-token column: its first token) and
    rewrite the shard as valid Parquet with its metadata, as a careless tool would."""
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    before = values[0] if not isinstance(values[0], list) else values[0][0]
    if isinstance(values[0], list):
        values[0] = [flip_bit(values[0][0], 23, np.float32)] + values[0][1:]
    else:
        values[0] = flip_bit(values[0], 52, np.float64)
    after = values[0] if not isinstance(values[0], list) else values[0][0]
    array = pa.array(values, table.schema.field(column).type)
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, array), path)
    return table.column("id")[0].as_py(), before, after


def record_as_adopted(cache: Path) -> None:
    """The manifest an earlier version wrote after adopting the damaged shard: its sha256 listed."""
    manifest_path = cache / store.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["shards"]:
        if entry["file"] == SHARD:
            entry["sha256"] = store.sha256_verified(cache / SHARD)
    manifest_path.write_text(json.dumps(manifest))


def test_flip_changes_what_the_issue_says():
    assert round(flip_bit(-41.80, 52, np.float64), 2) == -83.60
    assert flip_bit(flip_bit(-2.5, 23, np.float32), 23, np.float32) == -2.5


@pytest.mark.parametrize("column", ["chosen_logp", "chosen_token_logps"])
def test_unlisted_damaged_shard_is_rescored_not_adopted(cached, column):
    cfg, cache, original = cached
    (cache / store.MANIFEST).unlink()
    damage(cache / SHARD, column)
    again = score(cfg, show_progress=False)
    assert not again.skipped
    assert list(again.stats["rescored"]) == [SHARD]
    assert column in again.stats["rescored"][SHARD] and "checksum" in again.stats["rescored"][SHARD]
    assert again.stats["rows_scored"] == 16  # that shard alone
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == original


@pytest.mark.parametrize("column", ["chosen_logp", "chosen_token_logps"])
def test_adopted_damaged_shard_fails_audit_by_row_train_and_score_repair(cached, column):
    cfg, cache, original = cached
    example_id, before, after = damage(cache / SHARD, column)
    record_as_adopted(cache)
    trust.verified_refscores(cache)  # the bytes match the manifest: only the values can tell
    # The audit names the shard's checksum and the row, and re-scores that row whatever the sample.
    report = audit(cache, cfg=cfg, rescore_rows=2, seed=0)
    assert not report.passed
    failed = {f.check: f.message for f in report.findings if not f.ok}
    assert f"shard {SHARD}: the values of {column} differ from the checksum" in failed["integrity"]
    assert f"id {example_id} in {SHARD}" in failed["rows"]
    assert report.stats["row_checks"]["failed_rows"] == 1
    assert example_id in report.rescore["ids"] and report.rescore["rows"] == 3
    assert "rescore" in failed  # the cached value is far from the model's
    # Training never sees the value: refused before the model loads, naming the shard.
    raw = cfg.to_dict()
    if column.endswith("token_logps"):  # only a run that reads the per-token values
        raw["train"]["max_completion_length"] = 64
    train_cfg = config_from_dict(raw)
    with pytest.raises(TrainError, match=f"{SHARD}.*{column}.*dpo score"):
        train(train_cfg, show_progress=False)
    assert not (Path(cfg.storage) / "runs").exists() or not any((Path(cfg.storage) / "runs").iterdir())
    # `dpo score` does not call the cache up to date: it rescores the shard, and only it.
    again = score(cfg, show_progress=False)
    assert not again.skipped and list(again.stats["rescored"]) == [SHARD]
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == original
    assert audit(cache).passed


def test_sequence_value_off_its_per_token_sum_fails_even_with_recomputed_checksums(cached):
    """Someone "repairs" the checksums after changing a value: the row check still catches it."""
    cfg, cache, _ = cached
    path = cache / SHARD
    table = pq.read_table(path)
    logp = table.column("chosen_logp").to_pylist()
    logp[3] += 0.5
    table = table.set_column(1, "chosen_logp", pa.array(logp, pa.float64()))
    metadata = {**table.schema.metadata, refvalues.COLUMNS_KEY.encode(): refvalues.column_digests(table).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), path)
    with pytest.raises(refvalues.ValueProofError, match=r"id .* \(chosen: sequence log-prob .* the sum of its per-token"):
        refvalues.read_shard(path)
    (cache / store.MANIFEST).unlink()
    again = score(cfg, show_progress=False)
    assert "sum of its per-token values" in again.stats["rescored"][SHARD]


def test_row_checks_by_hand():
    """Each model-free check on a hand-made shard: one bad row per rule, the good row passes."""
    tokens = [np.array([-1.0, -2.0], np.float32)] * 6
    table = shard_table(pa.array([f"r{i}" for i in range(6)]), tokens, tokens, scores_schema(True))
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    columns["chosen_logp"][1] = float("nan")
    columns["chosen_logp"][2] = -3.0 + 1e-6  # off its per-token sum
    columns["chosen_token_logps"][3] = [-1.0, 0.5]  # a positive log-prob
    columns["chosen_logp"][3] = -0.5
    columns["rejected_tokens"][4] = 3  # 2 per-token values
    columns["rejected_token_logps"][5] = [-1.0, -5000.0]  # below the floor
    columns["rejected_logp"][5] = -5001.0
    bad = pa.table(columns, schema=table.schema)
    found: dict = {}
    for p in refvalues.row_problems(bad):
        found[(p.id, p.side)] = found.get((p.id, p.side), "") + p.problem + "; "
    assert set(found) == {("r1", "chosen"), ("r2", "chosen"), ("r3", "chosen"), ("r4", "rejected"), ("r5", "rejected")}
    assert "nan" in found[("r1", "chosen")]
    assert "sum of its per-token" in found[("r2", "chosen")]
    assert "per-token log-prob 0.5 at position 1" in found[("r3", "chosen")]
    assert "2 per-token values for 3 tokens" in found[("r4", "rejected")]
    assert "per-token log-prob -5000 at position 1" in found[("r5", "rejected")]
    assert "sequence log-prob -5001 below -1000 nats x 2 tokens" in found[("r5", "rejected")]
    assert refvalues.row_problems(table) == []


def test_page_checksums_catch_a_flipped_byte_in_a_data_page(cached, tmp_path):
    """The shard is written with page CRCs: a byte flipped inside a data page fails the read
    (even where zstd would have decoded the damaged page)."""
    _, cache, _ = cached
    path = cache / SHARD
    table = pq.read_table(path)
    plain = tmp_path / "plain.parquet"
    pq.write_table(table, plain, compression="none", use_dictionary=False, write_page_checksum=True)
    data = bytearray(plain.read_bytes())
    meta = pq.ParquetFile(plain).metadata.row_group(0).column(1)  # chosen_logp, uncompressed
    data[meta.data_page_offset + meta.total_compressed_size - 3] ^= 0x40  # inside the values
    plain.write_bytes(bytes(data))
    pq.read_table(plain)  # without verification the damage goes unseen...
    with pytest.raises(refvalues.ValueProofError, match="cannot be read"):
        refvalues.read_shard(plain, require_digests=False)  # ...with it, the read fails

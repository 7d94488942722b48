"""Nothing on disk is trusted: every reader checks each file against its manifest before using it.

Each case here was a silent failure before: a damaged shard trained on, a deleted shard reported
"up to date", a crash instead of an audit finding, a quick audit overwriting a full one, a cache
of another model picked for training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import store
from pipeline.audit.checks import audit
from pipeline.audit.report import current_full_audit, save_report
from pipeline.errors import CacheError
from pipeline.models.assets import demo_preferences
from pipeline.prepare.stage import prepare
from pipeline.score.stage import score
from pipeline.storage import locate, paths, trust
from pipeline.train.stage import train

from flows.cli.main import main as dpo_main

from tests.conftest import write_jsonl

TRAIN = {"per_device_train_batch_size": 4, "max_steps": 2, "eval_steps": 0, "save_steps": 0, "learning_rate": 1e-3}


@pytest.fixture
def cached(tmp_path, make_config):
    """60 demo rows, prepared and scored in 3 shards; returns (cfg, cache_dir, config file)."""
    data = write_jsonl(tmp_path / "d.jsonl", demo_preferences(60))
    sections = {"score": {"shard_rows": 20}, "train": TRAIN, "tokenize": {"max_length": 128, "max_prompt_length": 64}}
    cfg = make_config(data, **sections)
    prepare(cfg, show_progress=False)
    cache = score(cfg, show_progress=False).output_dir
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(cfg.to_dict()))
    return cfg, cache, config_file


def flip(path: Path, offset: int) -> bytes:
    original = path.read_bytes()
    data = bytearray(original)
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return original


def test_flipped_byte_at_spread_offsets_is_a_clean_audit_failure(cached, capsys):
    """>= 200 offsets across a shard: `dpo audit` exits 1 with the damage named, never a traceback,
    and writes its report every time."""
    cfg, cache, _ = cached
    shard = cache / "part-00001.parquet"
    size = shard.stat().st_size
    offsets = sorted({round(i * (size - 1) / 239) for i in range(240)})
    assert len(offsets) >= 200
    report_file = paths.audit_report_path(cfg.storage, cache.name, "quick")
    for offset in offsets:
        original = flip(shard, offset)
        report_file.unlink(missing_ok=True)
        code = dpo_main(["audit", str(cache)])
        shard.write_bytes(original)
        assert code == 1, offset
        saved = json.loads(report_file.read_text())
        assert saved["passed"] is False
        assert any("part-00001.parquet: sha256 differs" in f["message"] for f in saved["findings"]), offset
    capsys.readouterr()
    assert dpo_main(["audit", str(cache)]) == 0  # restored: passes again


def test_damaged_cache_is_refused_by_train_status_and_flow(cached, capsys):
    cfg, cache, config_file = cached
    from flows.dpo_flow import stage_complete

    shard = cache / "part-00002.parquet"
    # One value rewritten: still valid Parquet, but not the bytes the manifest records.
    table = pq.read_table(shard)
    values = table.column("chosen_logp").to_pylist()
    values[0] = -6695.0
    pq.write_table(table.set_column(1, "chosen_logp", [values]), shard)
    with pytest.raises(CacheError, match=r"part-00002.parquet is damaged.*dpo score"):
        train(cfg, show_progress=False)
    assert not (Path(cfg.storage) / "runs").exists() or not any((Path(cfg.storage) / "runs").iterdir())
    assert not stage_complete(cfg, "score", cache)
    assert dpo_main(["train", "-c", str(config_file), "--no-progress"]) == 1
    assert "part-00002.parquet is damaged" in capsys.readouterr().err
    dpo_main(["status", "-c", str(config_file)])
    status = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(status) if line.startswith("score"))
    assert status[at].split()[1] == "incomplete"
    assert "part-00002.parquet is damaged" in status[at + 1] and "dpo score" in status[at + 1]
    # `dpo score` does not call it up to date either: it rescores that shard and says why.
    assert dpo_main(["score", "-c", str(config_file), "--no-progress"]) == 0
    assert "rescored part-00002.parquet: its sha256 differs" in capsys.readouterr().err
    assert stage_complete(cfg, "score", cache)


def test_deleted_shard_is_rescored_not_up_to_date(cached):
    cfg, cache, _ = cached
    expected = {p.name: p.read_bytes() for p in cache.iterdir()}
    (cache / "part-00000.parquet").unlink()
    with pytest.raises(CacheError, match="part-00000.parquet is missing"):
        train(cfg, show_progress=False)
    again = score(cfg, show_progress=False)
    assert not again.skipped and again.stats["rows_scored"] == 20
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == expected


def test_damaged_dataset_is_refused(cached):
    cfg, _, _ = cached
    examples = locate.dataset_dir_for(cfg) / paths.EXAMPLES
    flip(examples, examples.stat().st_size // 2)
    with pytest.raises(CacheError, match="examples.parquet is damaged.*dpo prepare"):
        train(cfg, show_progress=False)
    # prepare sees it too: it rewrites the dataset instead of calling it up to date.
    assert not prepare(cfg, show_progress=False).skipped
    trust.verified_dataset(examples.parent)


def test_scoring_and_training_need_no_raw_data(cached):
    """Later stages only need token ids: with data.path gone they find the prepared dataset."""
    cfg, cache, _ = cached
    Path(cfg.data.path).unlink()
    assert locate.find_dataset(cfg) == cache.parent.parent / "datasets" / trust.verified_refscores(cache)["inputs"]["dataset_fingerprint"]
    assert score(cfg, show_progress=False).skipped
    assert train(cfg, show_progress=False).summary["steps"] == 2


def test_cache_of_another_model_is_never_used(cached, tmp_path):
    cfg, cache, _ = cached
    other = tmp_path / "other-model"
    shutil.copytree(cfg.model.path, other)
    flip(other / "model.safetensors", (other / "model.safetensors").stat().st_size - 1)
    cfg.model.path = str(other)  # same tokenizer files, so the same dataset; other weights
    dataset_fp = trust.verified_dataset(locate.dataset_dir_for(cfg))["fingerprint"]
    with pytest.raises(CacheError, match=rf"other model weights exist \({cache.name[:12]}\)"):
        locate.find_refscores(cfg, dataset_fp)
    cfg.train.ref_cache = str(cache)
    with pytest.raises(CacheError, match="scored by other weights than model.path"):
        locate.find_refscores(cfg, dataset_fp)


def test_audit_result_is_valid_only_for_the_bytes_it_read(cached, capsys):
    cfg, cache, _ = cached
    report = audit(cache, cfg, rescore_rows=2)
    assert report.passed and set(report.shards) == {"part-00000.parquet", "part-00001.parquet", "part-00002.parquet"}
    save_report(report)
    full = paths.audit_report_path(cfg.storage, cache.name, "full")
    assert current_full_audit(cache, rescore_rows=2) is not None
    assert current_full_audit(cache, rescore_rows=5) is None  # it re-scored fewer rows than asked
    assert not any(p.name.startswith(("audit", "full", "quick")) for p in cache.iterdir())  # not in the cache
    # A quick audit never replaces the full one.
    before = full.read_bytes()
    assert dpo_main(["audit", str(cache)]) == 0
    assert full.read_bytes() == before
    assert paths.audit_report_path(cfg.storage, cache.name, "quick").is_file()
    # Rewrite one shard and its manifest entry consistently (as a legitimate rescore would): the
    # cache verifies, but the saved audit saw other bytes, so it no longer counts.
    shard = cache / "part-00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, 20), shard, compression="snappy")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = store.sha256_file(shard, use_cache=False)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    trust.verified_refscores(cache)
    assert current_full_audit(cache) is None
    # A failed audit replaces the pass: no stale "passed" is left behind.
    flip(cache / "part-00001.parquet", 100)
    failed = audit(cache, cfg)
    save_report(failed)
    assert json.loads(full.read_text())["passed"] is False
    capsys.readouterr()


def test_each_file_is_hashed_once_per_process(cached, monkeypatch):
    _, cache, _ = cached
    calls = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda path, use_cache=True: calls.append(Path(path).name) or real(path, use_cache))
    store.forget_verified()  # as in a new process
    trust.verified_refscores(cache)
    trust.verified_refscores(cache)
    assert sorted(calls) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    # A rewrite of a file (even to the same bytes) is hashed again.
    shard = cache / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes())
    calls.clear()
    trust.verified_refscores(cache)
    assert calls == ["part-00000.parquet"]


def test_audit_of_garbage_never_crashes(tmp_path, cached):
    cfg, cache, _ = cached
    cases = {
        "missing folder": tmp_path / "nope",
        "manifest not JSON": None,
        "manifest with a wrong shard list": None,
    }
    bad = tmp_path / "storage" / "refscores" / "bad"
    shutil.copytree(cache, bad)
    (bad / "manifest.json").write_text("{not json")
    cases["manifest not JSON"] = bad
    worse = tmp_path / "storage" / "refscores" / "worse"
    shutil.copytree(cache, worse)
    manifest = json.loads((worse / "manifest.json").read_text())
    manifest["shards"] = [{"file": 3}]
    (worse / "manifest.json").write_text(json.dumps(manifest))
    cases["manifest with a wrong shard list"] = worse
    for name, path in cases.items():
        report = audit(path, cfg)
        assert not report.passed, name
        save_report(report, tmp_path / "reports" / name.replace(" ", "-"))


def test_read_only_storage_is_a_one_line_error(cached, monkeypatch, capsys):
    """Root can write into a chmod 0o555 folder, so the read-only filesystem is simulated: the
    first write a stage makes (its lock folder) fails as it does on a read-only mount."""
    import errno

    cfg, _, config_file = cached
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(cfg.storage):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    shutil.rmtree(Path(cfg.storage) / "locks")
    capsys.readouterr()
    assert dpo_main(["prepare", "-c", str(config_file), "--set", "tokenize.max_length=100", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot create folder") and "read-only file system" in err[-1]
    assert "set `storage` to a writable folder" in err[-1]


def test_audit_on_read_only_storage_names_report_dir(cached, monkeypatch, capsys, tmp_path):
    """The cache may be read-only on purpose: the error says where else the report can go, and
    with --report-dir the audit runs on the read-only storage."""
    import errno

    _, cache, _ = cached
    storage = str(paths.storage_of(cache))
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(storage):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    capsys.readouterr()
    assert dpo_main(["audit", str(cache)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "read-only file system" in err[-1] and "--report-dir DIR" in err[-1]
    assert dpo_main(["audit", str(cache), "--report-dir", str(tmp_path / "reports")]) == 0
    assert (tmp_path / "reports" / "quick.html").is_file()

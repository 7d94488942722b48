"""The score stage: reference log-probs of every chosen and rejected response, cached once.

    result = score(load_config("run.yaml"))
    result.output_dir  # <storage>/refscores/<fingerprint>/ with part-NNNNN.parquet, manifest.json

For each prepared example: ``chosen_logp = log pi_ref(chosen | prompt)`` and ``rejected_logp``,
sums over the response tokens of per-token log-probs, computed from the token ids that prepare
stored (never re-tokenized), plus the per-token values (``score.store_token_logps``).

The cache is content-addressed (dataset fingerprint + model content + dtype + backend + layout
settings + schema version), written shard by shard (``score.shard_rows`` examples each), each
shard atomically; a progress manifest records finished shards with their sha256, and the final
manifest (``complete: true``) is written last. A killed run, started again, scores only the
missing shards and ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config.schema import Config
from pipeline.errors import ModelError, ScoreError, ValueProofError
from pipeline.logprobs.backends import Scorer, resolve_backend
from pipeline.logprobs.backends.transformers_backend import resolve_device
from pipeline.models.loading import check_causal_lm, model_source
from pipeline.progress import Progress
from pipeline.score.shards import META, ShardJob, ShardWork, find_donors, scores_schema, shard_tokens
from pipeline.storage import locate, paths, trust
from pipeline.storage.refvalues import read_shard
from pipeline.storage.shards import ShardPlan
from pipeline.store import (
    MANIFEST,
    ensure_dir,
    exclusive,
    fingerprint,
    lock_path,
    read_manifest,
    remove_leftovers,
    sha256_verified,
    write_manifest,
)
from pipeline.workers import Result, Workers, default_workers, run_shards

log = logging.getLogger("dpo.score")

__all__ = ["ScoreResult", "score", "scores_schema"]

PROGRESS_EVERY_S = 2.0
"""The progress manifest is rewritten at most this often (it lists every finished shard: with
10,000 shards, once per shard would write gigabytes). A shard written but not yet listed is
found and checked on resume all the same."""


@dataclass
class ScoreResult:
    output_dir: Path
    manifest: dict
    skipped: bool
    stats: dict  # this run: backend, device, rows and tokens scored, seconds, tokens/s


# --- checks --------------------------------------------------------------------------------------


def _check_vocabulary(examples: pa.Table, model_config, dataset_manifest: dict) -> None:
    vocab = model_config.vocab_size
    max_id = -1
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        value = pc.max(pc.list_flatten(examples.column(column))).as_py()
        max_id = max(max_id, -1 if value is None else value)
    if max_id >= vocab:
        raise ModelError(
            f"the dataset has token id {max_id} but the model's vocabulary has {vocab} entries: "
            "the data was tokenized with another tokenizer. Prepare it with this model's "
            "tokenizer (same model.path for prepare and score)"
        )
    tokenizer_vocab = dataset_manifest["contract"]["vocab_size"]
    if tokenizer_vocab > vocab:
        raise ModelError(
            f"the dataset's tokenizer has {tokenizer_vocab} tokens, the model only {vocab}: "
            "they do not belong together"
        )


def _verify_existing(
    out_dir: Path, fp: str, shard_ids: list[pa.Array], recorded: dict
) -> tuple[set[int], dict[str, str]]:
    """(indices of the shards on disk whose values are proven, {shard: why it is rescored}).

    A shard is adopted only when proven (``_unproven``); any other is deleted here and scored
    again. A file that is not a shard of this cache is never touched: a clear error instead."""
    remove_leftovers(out_dir)  # of a killed write; we hold the cache's lock
    done, rescored = set(), {}
    for path in sorted(out_dir.iterdir()):
        name = path.name
        if name == MANIFEST:
            continue
        index = ShardPlan.index_of(name)
        if index is None or index >= len(shard_ids):
            raise ScoreError(
                f"foreign file {path} in the score cache: this directory holds only "
                f"{ShardPlan.file(0)}..{ShardPlan.file(len(shard_ids) - 1)} and manifest.json. Remove it and "
                "run again"
            )
        reason = _unproven(path, fp, shard_ids[index], recorded.get(name))
        if reason is None:
            done.add(index)
            continue
        log.warning("score: rescoring %s: %s", name, reason)
        rescored[name] = reason
        path.unlink()
    return done, rescored


def _unproven(path: Path, fp: str, ids: pa.Array, entry: dict | None) -> str | None:
    """Why the shard at ``path`` may not be adopted, or None when its values are proven: its
    bytes as the manifest lists them (when listed), its value checksums (required when not
    listed: nothing else vouches for it), every row consistent, and the planned examples."""
    listed = isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
    if listed and sha256_verified(path) != entry["sha256"]:
        return "its sha256 differs from the manifest's (the file changed after it was written)"
    try:
        table = read_shard(path, require_digests=not listed)
    except ValueProofError as exc:
        return str(exc).removeprefix(f"{path.name}: ")
    metadata = table.schema.metadata or {}  # the file's key-value metadata, from the same read
    if metadata.get(f"{META}fingerprint".encode()) != fp.encode():
        return "it was written for another cache"
    if not table.column("id").combine_chunks().equals(ids):
        return "it holds other examples than planned"
    return None


# --- the stage ---------------------------------------------------------------------------------


def score(cfg: Config, show_progress: bool = True, scorer: Scorer | None = None) -> ScoreResult:
    """Run the score stage (or find its complete output) and return where the cache lives.

    ``scorer``: an already-loaded scorer to reuse (tests, audits); by default one is built.
    """
    dataset_dir = locate.find_dataset(cfg)
    dataset_manifest = trust.verified_dataset(dataset_dir)
    backend = scorer.name if scorer is not None else resolve_backend(cfg.score.backend, cfg.model, logging.INFO)
    inputs = paths.refscores_identity(cfg, dataset_manifest["fingerprint"], backend)
    fp = fingerprint(inputs)
    out_dir = paths.refscores_dir(cfg.storage, fp)
    # tokens_scored: response tokens; sequence_tokens: prompt + response tokens run through the model
    stats = {"backend": backend, "rows_scored": 0, "tokens_scored": 0, "sequence_tokens": 0, "seconds": 0.0}
    # Up to date only when every value is proven; anything else goes to _score_missing, which
    # keeps the proven shards and rescores the others.
    if trust.is_verified(trust.verified_refscores, out_dir, values=True):
        log.info("score: up to date, %s", out_dir)
        return ScoreResult(out_dir, trust.verified_refscores(out_dir), True, stats)
    # One writer per cache: a second `dpo score` waits, then finds the cache done (or resumes it).
    with exclusive(lock_path(cfg.storage, "refscores", fp), f"reference cache {out_dir}", wait=True):
        if trust.is_verified(trust.verified_refscores, out_dir, values=True):
            return ScoreResult(out_dir, trust.verified_refscores(out_dir), True, stats)
        started = time.perf_counter()
        job = _Job(cfg, dataset_dir, dataset_manifest, inputs, out_dir, scorer, stats, show_progress)
        manifest = _score_missing(job)
    stats["seconds"] = time.perf_counter() - started
    # Throughput counts every token the model processes (prompt + response).
    stats["tokens_per_s"] = stats["sequence_tokens"] / stats["seconds"] if stats["seconds"] else 0.0
    return ScoreResult(out_dir, manifest, False, stats)


@dataclass
class _Job:
    """One run of the stage on one cache (under its lock): what the steps below share."""

    cfg: Config
    dataset_dir: Path
    dataset_manifest: dict
    inputs: dict
    out_dir: Path
    scorer: Scorer | None
    stats: dict
    show_progress: bool


@dataclass
class _Listing:
    """The cache's manifest as shards land: its fixed part and the finished shards by index."""

    out_dir: Path
    base: dict
    shards: dict[int, dict]

    def write(self, complete: bool, settings: dict) -> dict:
        listed = [self.shards[k] for k in sorted(self.shards)]
        tokens = {side: sum(s[f"{side}_tokens"] for s in listed) for side in ("chosen", "rejected")}
        # settings: how the numbers were computed, resolved (device, batch budget, sharing). They
        # change low-order bits only, so they are recorded here rather than in the fingerprint.
        manifest = {**self.base, "settings": settings, "shards": listed, "tokens": tokens, "complete": complete}
        reused = {}
        for entry in listed:
            for donor, rows in entry.get("reused_from", {}).items():
                reused[donor] = reused.get(donor, 0) + rows
        if reused:
            manifest["reused_from"] = reused  # rows copied from each donor cache (per shard: shards[])
        write_manifest(self.out_dir, manifest)
        return manifest


@dataclass
class _Missing:
    """The shards this run scores (``indices``), every shard's example ids, the examples."""

    indices: list[int]
    shard_ids: list[pa.Array]
    examples: pa.Table


def _score_missing(job: _Job) -> dict:
    """Write the shards not yet on disk (a killed run resumes here) and then the manifest."""
    cfg, dataset_dir, out_dir = job.cfg, job.dataset_dir, job.out_dir
    examples = pq.read_table(dataset_dir / paths.EXAMPLES, columns=["id", "prompt_ids", "chosen_ids", "rejected_ids"])
    if examples.num_rows == 0:
        raise ScoreError(f"the prepared dataset {dataset_dir} has no examples to score")
    _check_vocabulary(examples, check_causal_lm(cfg.model), job.dataset_manifest)
    sharding = ShardPlan(examples.num_rows, cfg.score.shard_rows)
    spans = [sharding.rows_of(k) for k in range(sharding.count)]
    shard_ids = [examples.column("id").slice(span.start, len(span)).combine_chunks() for span in spans]
    ensure_dir(out_dir)
    previous = read_manifest(out_dir) or {}
    recorded = {s.get("file"): s for s in previous.get("shards", []) if isinstance(s, dict)}
    shards, rescored = _finished_shards(out_dir, sharding, shard_ids, recorded)
    job.stats["rescored"] = rescored
    missing = [k for k in range(sharding.count) if k not in shards]
    if shards:
        log.info("score: resuming, %d of %d shards already scored", len(shards), sharding.count)
    base = {"kind": "refscores", "fingerprint": out_dir.name, "inputs": job.inputs, "model_path": str(cfg.model.path),
            "model_source": model_source(cfg.model),
            "rows": examples.num_rows, "columns": scores_schema(cfg.score.store_token_logps).names,
            "versions": paths.library_versions()}
    listing = _Listing(out_dir, base, shards)
    settings = previous.get("settings") or {}
    if missing:
        settings = _score_shards(job, _Missing(missing, shard_ids, examples), listing, settings)
    return listing.write(True, settings)


def _score_shards(job: _Job, todo: _Missing, listing: _Listing, settings: dict) -> dict:
    """Score the missing shards (rows found in other caches copied); the settings to record."""
    cfg, inputs = job.cfg, job.inputs
    work = ShardWork(cfg.to_dict(), str(job.dataset_dir), str(job.out_dir), inputs, todo.examples.num_rows,
                     job.dataset_manifest["tokens"]["max_sequence"])
    if inputs["backend"] == "transformers" and resolve_device(cfg.score.device) == "cpu":
        import torch

        work.cpu_threads = torch.get_num_threads()
    if cfg.score.reuse:
        work.donors = find_donors(cfg.storage, job.out_dir.name, inputs, job.dataset_manifest["inputs"])
    settings = _run_missing(job, work, todo, listing, settings)
    if not settings and work.donors:  # every row copied, no model loaded: the donor's settings
        settings = (read_manifest(Path(work.donors[0])) or {}).get("settings") or {}
    # Every worker has stopped: a temporary file left now is a killed worker's half shard.
    remove_leftovers(job.out_dir)
    return settings


def _workers(cfg, backend: str) -> tuple[int, int]:
    """(workers, GPUs per worker) of this run."""
    gpus = cfg.score.tensor_parallel_size if backend == "vllm" else 1
    device = "cuda" if backend == "vllm" else resolve_device(cfg.score.device)
    return cfg.score.workers or default_workers(device, gpus), gpus


def _run_missing(job: _Job, work: ShardWork, todo: _Missing, listing: _Listing, settings: dict) -> dict:
    """Run the missing shards on the configured workers; record each as it lands."""
    cfg, stats, missing = job.cfg, job.stats, todo.indices
    workers, gpus = _workers(cfg, work.inputs["backend"])
    workers = min(workers, len(missing))
    stats.update(workers=workers, runner=cfg.score.runner, rows_reused=0)
    if work.donors:
        log.info("score: rows already scored in %d other cache(s) are copied: %s", len(work.donors),
                 ", ".join(Path(d).name[:12] for d in work.donors))
    if workers > 1 or cfg.score.runner == "ray":
        log.info("score: %d shards on %d %s worker(s)", len(missing), workers, cfg.score.runner)
    todo_rows = sum(len(todo.shard_ids[k]) for k in missing)
    bar = Progress(todo_rows, f"score ({work.inputs['backend']})", "rows", job.show_progress, log)
    clock = time.perf_counter()
    last_write = time.perf_counter()
    here = ShardJob(work, job.scorer, todo.examples)  # used when one local worker: this process

    def progress(sequences: int, response_tokens: int, sequence_tokens: int) -> None:
        bar.update(sequences / 2)  # two sequences (chosen, rejected) per row
        live = stats["sequence_tokens"] + sequence_tokens
        elapsed = time.perf_counter() - clock
        if elapsed > 0:
            bar.set_postfix_str(f"{live / elapsed:,.0f} tok/s", refresh=False)

    with bar:
        where = Workers("score", ScoreError, cfg.score.runner, workers, gpus, cfg.score.ray_address)
        for result in run_shards(work, missing, where, here, progress):
            settings = _record(job, listing, result, settings)
            if workers > 1 or cfg.score.runner == "ray":
                bar.update(result[0]["rows"])
            if time.perf_counter() - last_write >= PROGRESS_EVERY_S:
                listing.write(False, settings)
                last_write = time.perf_counter()
    return settings


def _record(job: _Job, listing: _Listing, result: Result, settings: dict) -> dict:
    """Add a finished shard to the listing and its counts to the stats; the settings to record
    (the first worker's; another's that differ are logged)."""
    entry, shard_stats, worker_settings = result
    index = ShardPlan.index_of(entry["file"])
    listing.shards[index] = entry
    for key in ("rows_scored", "rows_reused", "tokens_scored", "sequence_tokens"):
        job.stats[key] += shard_stats[key]
    if worker_settings is not None:
        if settings and worker_settings != settings:
            log.warning("score: a worker scored with other settings (%s) than the cache records (%s)",
                        worker_settings, settings)
        settings = settings or worker_settings
        job.stats.setdefault("device", worker_settings.get("device"))
    return settings


def _finished_shards(out_dir: Path, sharding: ShardPlan, shard_ids: list[pa.Array],
                     recorded: dict) -> tuple[dict[int, dict], dict[str, str]]:
    """(manifest entries of the proven shards already on disk, {shard: why it is rescored});
    removes dead writers' temp files and the shards that are not proven."""
    shards = {}
    done, rescored = _verify_existing(out_dir, out_dir.name, shard_ids, recorded)
    for index in sorted(done):
        path = out_dir / ShardPlan.file(index)
        entry = recorded.get(path.name)
        if entry is None or "chosen_tokens" not in entry:  # written, but its run died before recording it
            entry = {"file": path.name, "first_row": sharding.rows_of(index).start, "rows": len(shard_ids[index]),
                     "sha256": sha256_verified(path), **shard_tokens(path)}
        shards[index] = entry
    return shards, rescored

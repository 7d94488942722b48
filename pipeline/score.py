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
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import layout
from .config import Config
from .layout import SHARD_RE, shard_name
from .models import ModelError, check_causal_lm
from .scorers import ScoreError, Scorer, make_scorer, resolve_backend
from .store import (
    MANIFEST,
    ensure_dir,
    exclusive,
    fingerprint,
    lock_path,
    read_manifest,
    remove_leftovers,
    sha256_verified,
    write_manifest,
    write_parquet,
)

log = logging.getLogger("dpo.score")

META = "dpo_pipeline."


def scores_schema(store_token_logps: bool) -> pa.Schema:
    fields = [
        ("id", pa.string()),
        ("chosen_logp", pa.float64()),
        ("rejected_logp", pa.float64()),
        ("chosen_tokens", pa.int32()),
        ("rejected_tokens", pa.int32()),
    ]
    if store_token_logps:
        fields += [
            ("chosen_token_logps", pa.list_(pa.float32())),
            ("rejected_token_logps", pa.list_(pa.float32())),
        ]
    return pa.schema(fields)


@dataclass
class ScoreResult:
    output_dir: Path
    manifest: dict
    skipped: bool
    stats: dict  # this run: backend, device, rows and tokens scored, seconds, tokens/s


# --- shard plan ----------------------------------------------------------------------------------


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
    out_dir: Path, fp: str, n_shards: int, shard_ids: list[pa.Array], recorded: dict
) -> set[int]:
    """Indices of finished shards; clear errors for anything corrupted or foreign."""
    remove_leftovers(out_dir)  # of a killed write; we hold the cache's lock
    done = set()
    for path in sorted(out_dir.iterdir()):
        name = path.name
        if name == MANIFEST:
            continue
        match = SHARD_RE.match(name)
        if not match or int(match.group(1)) >= n_shards:
            raise ScoreError(
                f"foreign file {path} in the score cache: this directory holds only "
                f"{shard_name(0)}..{shard_name(n_shards - 1)} and manifest.json. Remove it and "
                "run again"
            )
        index = int(match.group(1))
        fix = f"delete {path} and run `dpo score` again to rescore that shard"
        if name in recorded:
            if sha256_verified(path) != recorded[name].get("sha256"):
                raise ScoreError(f"corrupted shard {path}: its sha256 differs from the manifest; {fix}")
        else:  # written, but the run died before recording it: check what it says it is
            try:
                meta = pq.read_schema(path).metadata or {}
                ids = pq.read_table(path, columns=["id"]).column("id").combine_chunks()
            except Exception as exc:
                raise ScoreError(f"corrupted shard {path} ({exc}); {fix}") from None
            if meta.get(f"{META}fingerprint".encode()) != fp.encode():
                raise ScoreError(f"foreign shard {path}: written for another cache; {fix}")
            if not ids.equals(shard_ids[index]):
                raise ScoreError(f"shard {path} holds other examples than planned; {fix}")
        done.add(index)
    return done


def _shard_table(ids: pa.Array, chosen: list[np.ndarray], rejected: list[np.ndarray], schema):
    def sums(values):
        return pa.array([float(np.sum(v, dtype=np.float64)) for v in values], pa.float64())

    def lists(values):
        offsets = np.zeros(len(values) + 1, dtype=np.int32)
        np.cumsum([len(v) for v in values], out=offsets[1:])
        flat = np.concatenate(values).astype(np.float32, copy=False)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))

    columns = {
        "id": ids,
        "chosen_logp": sums(chosen),
        "rejected_logp": sums(rejected),
        "chosen_tokens": pa.array([len(v) for v in chosen], pa.int32()),
        "rejected_tokens": pa.array([len(v) for v in rejected], pa.int32()),
    }
    if "chosen_token_logps" in schema.names:
        columns["chosen_token_logps"] = lists(chosen)
        columns["rejected_token_logps"] = lists(rejected)
    return pa.table(columns, schema=schema)


# --- the stage ---------------------------------------------------------------------------------


def score(cfg: Config, show_progress: bool = True, scorer: Scorer | None = None) -> ScoreResult:
    """Run the score stage (or find its complete output) and return where the cache lives.

    ``scorer``: an already-loaded scorer to reuse (tests, audits); by default one is built.
    """
    dataset_dir = layout.locate_dataset(cfg)
    dataset_manifest = layout.verified_dataset(dataset_dir)
    backend = scorer.name if scorer is not None else resolve_backend(cfg.score.backend)
    inputs = layout.refscores_identity(cfg, dataset_manifest["fingerprint"], backend)
    fp = fingerprint(inputs)
    out_dir = layout.refscores_dir(cfg.storage, fp)
    # tokens_scored: response tokens; sequence_tokens: prompt + response tokens run through the model
    stats = {"backend": backend, "rows_scored": 0, "tokens_scored": 0, "sequence_tokens": 0, "seconds": 0.0}
    if layout.is_verified(layout.verified_refscores, out_dir):
        log.info("score: up to date, %s", out_dir)
        return ScoreResult(out_dir, layout.verified_refscores(out_dir), True, stats)
    # One writer per cache: a second `dpo score` waits, then finds the cache done (or resumes it).
    with exclusive(lock_path(cfg.storage, "refscores", fp), f"reference cache {out_dir}", wait=True):
        if layout.is_verified(layout.verified_refscores, out_dir):
            return ScoreResult(out_dir, layout.verified_refscores(out_dir), True, stats)
        started = time.perf_counter()
        manifest = _score_missing(cfg, dataset_dir, dataset_manifest, inputs, out_dir, scorer, stats, show_progress)
    stats["seconds"] = time.perf_counter() - started
    # Throughput counts every token the model processes (prompt + response).
    stats["tokens_per_s"] = stats["sequence_tokens"] / stats["seconds"] if stats["seconds"] else 0.0
    return ScoreResult(out_dir, manifest, False, stats)


def _score_missing(cfg, dataset_dir, dataset_manifest, inputs, out_dir, scorer, stats, show_progress) -> dict:
    """Score the shards not yet on disk (a killed run resumes here) and write the manifest."""
    examples = pq.read_table(dataset_dir / layout.EXAMPLES, columns=["id", "prompt_ids", "chosen_ids", "rejected_ids"])
    if examples.num_rows == 0:
        raise ScoreError(f"the prepared dataset {dataset_dir} has no examples to score")
    _check_vocabulary(examples, check_causal_lm(cfg.model), dataset_manifest)
    shard_rows = cfg.score.shard_rows
    n_shards = math.ceil(examples.num_rows / shard_rows)
    shard_ids = [examples.column("id").slice(k * shard_rows, shard_rows).combine_chunks() for k in range(n_shards)]
    ensure_dir(out_dir)
    previous = read_manifest(out_dir) or {}
    recorded = {s.get("file"): s for s in previous.get("shards", []) if isinstance(s, dict)}
    shards = _finished_shards(out_dir, inputs, n_shards, shard_ids, recorded, shard_rows)
    missing = [k for k in range(n_shards) if k not in shards]
    if shards:
        log.info("score: resuming, %d of %d shards already scored", len(shards), n_shards)
    base = {"kind": "refscores", "fingerprint": out_dir.name, "inputs": inputs, "model_path": str(cfg.model.path),
            "rows": examples.num_rows, "columns": scores_schema(cfg.score.store_token_logps).names,
            "versions": layout.library_versions()}

    def write_progress(complete: bool, settings: dict) -> dict:
        listed = [shards[k] for k in sorted(shards)]
        tokens = {side: sum(s[f"{side}_tokens"] for s in listed) for side in ("chosen", "rejected")}
        # settings: how the numbers were computed, resolved (device, batch budget, sharing). They
        # change low-order bits only, so they are recorded here rather than in the fingerprint.
        manifest = {**base, "settings": settings, "shards": listed, "tokens": tokens, "complete": complete}
        write_manifest(out_dir, manifest)
        return manifest

    settings = previous.get("settings") or {}
    if missing:
        scorer = scorer or make_scorer(inputs["backend"], cfg, dataset_manifest["tokens"]["max_sequence"])
        if settings and settings != scorer.settings and shards:
            log.warning("score: resuming with other settings (%s) than the finished shards (%s)",
                        scorer.settings, settings)
        settings = scorer.settings
        stats["device"] = scorer.device
        _score_shards(cfg, examples, missing, shard_ids, inputs, out_dir, scorer, shards, stats,
                      lambda: write_progress(False, settings), show_progress)
    return write_progress(True, settings)


def _finished_shards(out_dir: Path, inputs: dict, n_shards: int, shard_ids: list[pa.Array], recorded: dict,
                     shard_rows: int) -> dict[int, dict]:
    """Manifest entries of the shards already on disk (checked); removes dead writers' temp files."""
    fp = out_dir.name
    shards = {}
    for index in sorted(_verify_existing(out_dir, fp, n_shards, shard_ids, recorded)):
        path = out_dir / shard_name(index)
        entry = recorded.get(path.name)
        if entry is None or "chosen_tokens" not in entry:  # written, but its run died before recording it
            counts = pq.read_table(path, columns=["chosen_tokens", "rejected_tokens"])
            entry = {"file": path.name, "first_row": index * shard_rows, "rows": len(shard_ids[index]),
                     "sha256": sha256_verified(path),
                     "chosen_tokens": int(pc.sum(counts.column("chosen_tokens")).as_py()),
                     "rejected_tokens": int(pc.sum(counts.column("rejected_tokens")).as_py())}
        shards[index] = entry
    return shards


def _score_shards(cfg, examples, missing, shard_ids, inputs, out_dir, scorer, shards, stats, write_progress,
                  show_progress) -> None:
    from tqdm.auto import tqdm

    shard_rows = cfg.score.shard_rows
    schema = scores_schema(cfg.score.store_token_logps)
    todo_rows = sum(len(shard_ids[k]) for k in missing)
    bar = tqdm(total=todo_rows, unit="rows", desc=f"score ({scorer.name})", file=sys.stderr,
               disable=not show_progress, dynamic_ncols=True)
    clock = time.perf_counter()

    def progress(sequences: int, response_tokens: int, sequence_tokens: int) -> None:
        stats["tokens_scored"] += response_tokens
        stats["sequence_tokens"] += sequence_tokens
        bar.update(sequences / 2)  # two sequences (chosen, rejected) per row
        elapsed = time.perf_counter() - clock
        if elapsed > 0:
            bar.set_postfix_str(f"{stats['sequence_tokens'] / elapsed:,.0f} tok/s", refresh=False)

    with bar:
        for index in missing:
            part = examples.slice(index * shard_rows, shard_rows)
            token_ids = [part.column(f"{name}_ids").to_pylist() for name in ("prompt", "chosen", "rejected")]
            chosen, rejected = scorer.score_pairs(*token_ids, progress)
            _check_values(scorer.name, index, shard_ids[index], token_ids[1:], (chosen, rejected))
            table = _shard_table(shard_ids[index], chosen, rejected, schema)
            metadata = {
                f"{META}fingerprint": out_dir.name,
                f"{META}schema_version": str(inputs["schema_version"]),
                f"{META}shard": str(index),
                f"{META}first_row": str(index * shard_rows),
                f"{META}dataset_fingerprint": inputs["dataset_fingerprint"],
                f"{META}backend": inputs["backend"],
                f"{META}dtype": inputs["dtype"],
            }
            # One row group per shard: a shard is read whole (by training, audit, resume checks).
            sha = write_parquet(table, out_dir / shard_name(index), table.num_rows, metadata)
            shards[index] = {"file": shard_name(index), "first_row": index * shard_rows, "rows": table.num_rows,
                             "sha256": sha, "chosen_tokens": int(sum(len(v) for v in chosen)),
                             "rejected_tokens": int(sum(len(v) for v in rejected))}
            stats["rows_scored"] += table.num_rows
            write_progress()


def _check_values(backend: str, index: int, ids: pa.Array, token_ids, values) -> None:
    """Every response got one finite log-prob per token, or nothing is written for the shard."""
    for name, ref, got in zip(("chosen", "rejected"), token_ids, values):
        if any(len(a) != len(b) for a, b in zip(ref, got)):
            raise ScoreError(f"backend {backend} returned the wrong number of {name} log-probs")
    chosen, rejected = values
    bad = [ids[i].as_py() for i in range(len(ids))
           if not (np.isfinite(chosen[i]).all() and np.isfinite(rejected[i]).all())]
    if bad:
        raise ScoreError(
            f"non-finite (NaN or inf) reference log-probs for {len(bad)} examples, e.g. ids "
            f"{', '.join(bad[:5])}; nothing was written for shard {index}. Check the model "
            "weights and dtype (float16 overflows: try model.dtype=bfloat16 or float32)"
        )

"""One shard of a reference cache: the unit of scoring work, idempotent and verifiable alone.

    job = work.job()                      # a ShardJob, in a worker: loads the model once, lazily
    entry, stats, settings = job.run(index)   # writes <out_dir>/part-NNNNN.parquet atomically

A shard holds the rows ``work.shards.rows_of(index)`` of the prepared dataset (a ShardPlan,
storage/shards.py: the audit re-scores in the same shards). Its bytes depend only on those rows
and the cache's identity and settings, never on which worker wrote it or when, so any number
of workers, in any order, produce the same cache. Rows that a complete cache of another dataset
already holds (same model, tokenizer, dtype, backend; see ``find_donors``) are copied from it,
verified, instead of being scored again.

Everything a worker gets is plain data and file paths (``ShardWork``), never tensors or tables:
the same job runs in this process, in a local worker process, or in a Ray actor
(``pipeline.workers.run_shards``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config.load import config_from_dict
from pipeline.errors import ScoreError, ValueProofError
from pipeline.logprobs.backends import Progress, make_scorer
from pipeline.storage import paths, trust
from pipeline.storage.refvalues import COLUMNS_KEY, column_digests, read_shard
from pipeline.storage.shards import ShardPlan
from pipeline.store import MANIFEST, read_json, write_parquet

log = logging.getLogger("dpo.score")

META = "dpo_pipeline."
EXAMPLE_COLUMNS = ["id", "prompt_ids", "chosen_ids", "rejected_ids"]
SCORE_COLUMNS = ["id", "chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens"]


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
class ShardWork:
    """What a worker needs to write any shard of one cache: plain values and paths."""

    config: dict
    dataset_dir: str
    out_dir: str
    inputs: dict
    rows: int
    max_sequence: int
    donors: list[str] = field(default_factory=list)
    """Complete caches of other datasets whose rows may be copied (find_donors)."""
    cpu_threads: int | None = None
    """Scoring on a CPU: the intra-op threads every worker uses (the count changes low-order
    bits, so all workers use the coordinator's); None on a GPU."""

    @property
    def shards(self) -> ShardPlan:
        return ShardPlan(self.rows, self.inputs["shard_rows"])

    @property
    def gpu(self) -> bool:
        """Whether the workers run on GPUs (when some are visible): score.device is not cpu."""
        return self.config.get("score", {}).get("device", "auto") != "cpu"

    def job(self) -> "ShardJob":
        """A job writing this cache's shards (``pipeline.workers``: one per worker)."""
        return ShardJob(self)


class ShardJob:
    """Writes shards of one cache; reads the dataset, the donors' ids and the model once each,
    and only when needed (a shard whose rows are all reused loads no model)."""

    def __init__(self, work: ShardWork, scorer=None, examples: pa.Table | None = None):
        """``scorer``: an already-loaded one to use; ``examples``: the prepared examples, whole,
        when the caller holds them already (the coordinator's own job), else read as needed."""
        self.work = work
        self.cfg = config_from_dict(work.config)
        self._scorer = scorer
        self._examples = examples
        self._groups: tuple | None = None
        self._donors: dict | None = None

    @property
    def scorer(self):
        if self._scorer is None:
            self._scorer = make_scorer(self.work.inputs["backend"], self.cfg, self.work.max_sequence)
        return self._scorer

    def rows(self, start: int, count: int) -> pa.Table:
        """Rows [start, start + count) of the prepared examples, reading only the row groups
        that hold them (a worker never holds the whole dataset; the last groups read are kept
        for the next shard, usually the following rows)."""
        if self._examples is not None:  # given whole (the coordinator's own job)
            return self._examples.slice(start, count)
        file = pq.ParquetFile(Path(self.work.dataset_dir) / paths.EXAMPLES)
        bounds = np.cumsum([0] + [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)])
        first = int(np.searchsorted(bounds, start, side="right") - 1)
        last = int(np.searchsorted(bounds, start + count, side="left"))
        key = (first, last)
        if self._groups is None or self._groups[0] != key:
            self._groups = (key, file.read_row_groups(list(range(first, last)), columns=EXAMPLE_COLUMNS))
        return self._groups[1].slice(start - int(bounds[first]), count)

    def donor_rows(self) -> dict:
        """id -> (donor cache dir, shard file, row in it), over every donor."""
        if self._donors is None:
            self._donors = {}
            for donor in self.work.donors:
                manifest = read_json(Path(donor) / MANIFEST) or {}
                for shard in manifest.get("shards", []):
                    ids = pq.read_table(Path(donor) / shard["file"], columns=["id"]).column("id").to_pylist()
                    for row, example_id in enumerate(ids):
                        self._donors.setdefault(example_id, (donor, shard["file"], row))
        return self._donors

    def run(self, index: int, progress: Progress | None = None) -> tuple[dict, dict, dict | None]:
        """Write shard ``index``; returns (its manifest entry, this call's stats, the scorer's
        settings: None when no model was loaded)."""
        work, started = self.work, time.perf_counter()
        span = work.shards.rows_of(index)
        part = self.rows(span.start, len(span))
        ids = part.column("id").combine_chunks()
        token_ids = [part.column(f"{name}_ids").to_pylist() for name in ("prompt", "chosen", "rejected")]
        stats = {"rows_scored": 0, "rows_reused": 0, "tokens_scored": 0, "sequence_tokens": 0}
        chosen, rejected, reused = self._reuse(ids.to_pylist(), token_ids)
        todo = [i for i in range(len(ids)) if chosen[i] is None]
        if todo:
            def counted(sequences: int, response_tokens: int, sequence_tokens: int) -> None:
                stats["tokens_scored"] += response_tokens
                stats["sequence_tokens"] += sequence_tokens
                if progress is not None:
                    progress(sequences, response_tokens, sequence_tokens)

            picked = [[column[i] for i in todo] for column in token_ids]
            new_chosen, new_rejected = self.scorer.score_pairs(*picked, counted)
            for i, c, r in zip(todo, new_chosen, new_rejected):
                chosen[i], rejected[i] = c, r
        elif progress is not None:
            progress(2 * len(ids), 0, 0)
        stats["rows_scored"], stats["rows_reused"] = len(todo), len(ids) - len(todo)
        check_values(work.inputs["backend"], index, ids, token_ids[1:], (chosen, rejected))
        table = shard_table(ids, chosen, rejected, scores_schema(work.inputs["store_token_logps"]))
        # The values are proven from here on: their digests travel inside the shard (refvalues).
        metadata = {**self._metadata(index), COLUMNS_KEY: column_digests(table)}
        sha = write_parquet(table, Path(work.out_dir) / ShardPlan.file(index), table.num_rows, metadata,
                            page_checksum=True)
        entry = {"file": ShardPlan.file(index), "first_row": span.start, "rows": table.num_rows,
                 "sha256": sha, "chosen_tokens": int(sum(len(v) for v in chosen)),
                 "rejected_tokens": int(sum(len(v) for v in rejected))}
        if reused:
            entry["reused_from"] = reused
        stats["seconds"] = time.perf_counter() - started
        return entry, stats, self.settings()

    def settings(self) -> dict | None:
        """The scorer's resolved settings, when this job loaded one."""
        return None if self._scorer is None else self._scorer.settings

    def _metadata(self, index: int) -> dict:
        inputs = self.work.inputs
        return {
            f"{META}fingerprint": Path(self.work.out_dir).name,
            f"{META}schema_version": str(inputs["schema_version"]),
            f"{META}shard": str(index),
            f"{META}first_row": str(self.work.shards.rows_of(index).start),
            f"{META}dataset_fingerprint": inputs["dataset_fingerprint"],
            f"{META}backend": inputs["backend"],
            f"{META}dtype": inputs["dtype"],
        }

    def _reuse(self, ids: list[str], token_ids) -> tuple[list, list, dict]:
        """Per-token log-probs of the rows a donor holds (None for the others), and
        {donor fingerprint: rows copied}. A donor row must have this row's token counts."""
        chosen: list = [None] * len(ids)
        rejected: list = [None] * len(ids)
        if not self.work.donors:
            return chosen, rejected, {}
        found: dict = {}
        index = self.donor_rows()
        for i, example_id in enumerate(ids):
            hit = index.get(example_id)
            if hit is not None:
                found.setdefault((hit[0], hit[1]), []).append((i, hit[2]))
        reused: dict = {}
        for (donor, file), rows in sorted(found.items()):
            try:  # the donor's manifest vouched for its bytes; its values are proven here too
                table = read_shard(Path(donor) / file, require_digests=False)
            except ValueProofError as exc:
                log.warning("score: not copying rows of %s: %s; they are scored", Path(donor).name[:12], exc)
                continue
            take = pa.array([row for _, row in rows], pa.int64())
            donor_chosen = table.column("chosen_token_logps").take(take).to_pylist()
            donor_rejected = table.column("rejected_token_logps").take(take).to_pylist()
            for (i, _), c, r in zip(rows, donor_chosen, donor_rejected):
                if len(c) != len(token_ids[1][i]) or len(r) != len(token_ids[2][i]):
                    continue  # same id, other tokens: score it
                chosen[i], rejected[i] = np.asarray(c, np.float32), np.asarray(r, np.float32)
                reused[Path(donor).name] = reused.get(Path(donor).name, 0) + 1
        return chosen, rejected, reused


def find_donors(storage: str, fp: str, inputs: dict, dataset_identity: dict) -> list[str]:
    """Complete caches whose rows this cache may copy: scored by the same model weights, dtype,
    backend and schema, with per-token values stored, on a dataset tokenized the same way (same
    tokenizer files, tokenize and format settings), and whose files verify. Newest first."""
    found = []
    root = paths.refscores_dir(storage, fp).parent
    if not inputs.get("store_token_logps") or not root.is_dir():
        return found
    same = ("schema_version", "model", "dtype", "backend", "store_token_logps")
    for directory in root.iterdir():
        manifest = read_json(directory / MANIFEST)
        if not manifest or manifest.get("complete") is not True or directory.name == fp:
            continue
        donor_inputs = manifest.get("inputs") or {}
        if any(donor_inputs.get(key) != inputs.get(key) for key in same):
            continue
        dataset = read_json(paths.dataset_dir(storage, donor_inputs.get("dataset_fingerprint", "")) / MANIFEST)
        if not dataset or not _tokenized_alike(dataset.get("inputs") or {}, dataset_identity):
            continue
        if not trust.is_verified(trust.verified_refscores, directory):
            log.warning("score: not reusing rows of %s: its files do not verify", directory)
            continue
        found.append((directory.stat().st_mtime, str(directory)))
    return [path for _, path in sorted(found, reverse=True)]


def _tokenized_alike(a: dict, b: dict) -> bool:
    """Whether two datasets turn the same example into the same token ids."""
    loose = ("eval_fraction", "max_row_bytes")
    settings = [{k: v for k, v in (x.get("data_settings") or {}).items() if k not in loose} for x in (a, b)]
    return (settings[0] == settings[1] and a.get("tokenizer_files") == b.get("tokenizer_files")
            and a.get("tokenize_settings") == b.get("tokenize_settings") and a.get("schema_version") == b.get("schema_version"))


def shard_table(ids: pa.Array, chosen: list[np.ndarray], rejected: list[np.ndarray], schema) -> pa.Table:
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


def check_values(backend: str, index: int, ids: pa.Array, token_ids, values) -> None:
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


def shard_tokens(path: Path) -> dict:
    """Token counts of a shard file (for a shard written but not yet in the manifest)."""
    counts = pq.read_table(path, columns=["chosen_tokens", "rejected_tokens"])
    return {"chosen_tokens": int(pc.sum(counts.column("chosen_tokens")).as_py() or 0),
            "rejected_tokens": int(pc.sum(counts.column("rejected_tokens")).as_py() or 0)}

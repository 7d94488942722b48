"""One shard of generations: the unit of sampling work, the same bytes wherever it runs.

    work = GenerateWork(cfg.to_dict(), str(prompts_dir), first, count, str(out_dir), "transformers")
    job = work.job()                              # in a worker: loads the sampler once, lazily
    entry, stats, settings = job.run(index)       # writes <out_dir>/part-NNNNN.parquet atomically

Shard ``index`` holds the prompts ``ShardPlan(count, generate.shard_prompts).rows_of(index)`` of
the slice (positions ``first`` .. ``first + count`` of the prompts table), each sampled
generate.num_samples times from its own seeded generator, rows in (prompt position, sample)
order. Its bytes depend only on those prompts and the output's identity, never on which worker
wrote it or when. Everything a worker gets is plain data and file paths (``GenerateWork``): the
same job runs in this process, in a local worker process, or in a Ray actor
(``pipeline.workers.run_shards``). Part of the generate stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config.load import config_from_dict
from pipeline.config.schema import Config
from pipeline.errors import GenerateError
from pipeline.generate.sampler import Completion, Sampling, TransformersSampler, sequence_seed, stop_ids
from pipeline.models.loading import check_model_path, load_causal_lm, load_tokenizer, pick_device
from pipeline.storage import paths, refvalues
from pipeline.storage.shards import ShardPlan
from pipeline.store import write_parquet

ROW_GROUP_ROWS = 4096
FINGERPRINT_KEY = "dpo.generations.fingerprint"
"""Key of the shard files' metadata naming the output they belong to (checked on resume)."""

GENERATIONS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("sample", pa.int32()),
    ("token_ids", pa.list_(pa.int32())),
    ("text", pa.string()),
    ("finish_reason", pa.string()),
    ("num_tokens", pa.int32()),
])


@dataclass
class GenerateWork:
    """What a worker needs to write any shard of one generations output: plain values and paths."""

    config: dict
    prompts_dir: str
    first: int
    """The slice: its first position in the prompts table."""
    count: int
    """The slice: how many prompts."""
    out_dir: str
    backend: str
    cpu_threads: int | None = None
    """Sampling on a CPU: the intra-op threads every worker uses (the count changes low-order
    bits, so all workers use the coordinator's); None on a GPU."""

    @property
    def shards(self) -> ShardPlan:
        return ShardPlan(self.count, self.config["generate"]["shard_prompts"])

    @property
    def gpu(self) -> bool:
        """Whether the workers run on GPUs (when some are visible)."""
        return self.backend == "vllm" or self.config.get("generate", {}).get("device", "auto") != "cpu"

    def job(self) -> "GenerateJob":
        """A job writing this output's shards (``pipeline.workers``: one per worker)."""
        return GenerateJob(self)


class GenerateJob:
    """Writes shards of one generations output; loads the tokenizer and the sampler once, when
    first needed."""

    def __init__(self, work: GenerateWork, cfg: Config | None = None, prompts: pa.Table | None = None):
        """``cfg``: the config ``work.config`` came from; ``prompts``: the slice of the prompts
        table (prompt_id, prompt_ids), when the caller holds them already (the coordinator)."""
        self.work = work
        self.cfg = cfg if cfg is not None else config_from_dict(work.config)
        self._prompts = prompts
        self._tokenizer = None
        self._sampler = None

    @property
    def prompts(self) -> pa.Table:
        if self._prompts is None:
            table = pq.read_table(Path(self.work.prompts_dir) / paths.PROMPTS, columns=["prompt_id", "prompt_ids"])
            self._prompts = table.slice(self.work.first, self.work.count)
        return self._prompts

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # the project's tokenizer: generate.model shares it
            self._tokenizer = load_tokenizer(self.cfg.model)
        return self._tokenizer

    @property
    def sampler(self):
        """The sampler of the output's backend, its model loaded."""
        if self._sampler is None:
            cfg, tokenizer = self.cfg, self.tokenizer
            model = paths.generation_model(cfg)
            stop = stop_ids(tokenizer, check_model_path(model))
            if self.work.backend == "vllm":
                from pipeline.generate.vllm_sampler import VllmSampler

                longest = max(len(p) for p in self.prompts.column("prompt_ids").to_pylist())
                self._sampler = VllmSampler(cfg, model, longest + cfg.generate.max_new_tokens, stop)
            else:
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
                self._sampler = TransformersSampler(load_causal_lm(model, generate_device(cfg)), stop, pad,
                                                    cfg.generate.batch_size)
        return self._sampler

    def run(self, index: int, progress=None) -> tuple[dict, dict, dict]:
        """Sample and write shard ``index``; returns (its manifest entry, this call's stats:
        sequences, tokens, seconds; the sampler's settings: device). ``progress(sequences,
        tokens)`` is called after each batch."""
        cfg, started = self.cfg, time.perf_counter()
        k = cfg.generate.num_samples
        span = self.work.shards.rows_of(index)
        shard = self.prompts.slice(span.start, len(span))
        ids = shard.column("prompt_id").to_pylist()
        prompts = [p for p in shard.column("prompt_ids").to_pylist() for _ in range(k)]
        seeds = [sequence_seed(cfg.generate.seed, pid, s) for pid in ids for s in range(k)]
        stats = {"sequences": 0, "tokens": 0}

        def counted(sequences: int, tokens: int) -> None:
            stats["sequences"] += sequences
            stats["tokens"] += tokens
            if progress is not None:
                progress(sequences, tokens)

        completions = self.sampler.sample(prompts, seeds, Sampling.of(cfg.generate), counted)
        entry = write_shard(Path(self.work.out_dir), index, shard_table(ids, k, completions, self.tokenizer))
        stats["seconds"] = time.perf_counter() - started
        return entry, stats, {"device": str(self.sampler.device)}


def generate_device(cfg: Config) -> str:
    """generate.device resolved (transformers backend): cpu or cuda."""
    return pick_device(cfg.generate.device, "generate.device", GenerateError)


def shard_table(prompt_ids: list[str], k: int, completions: list[Completion], tokenizer) -> pa.Table:
    tokens = [c.token_ids for c in completions]
    columns = {
        "prompt_id": [pid for pid in prompt_ids for _ in range(k)],
        "sample": list(range(k)) * len(prompt_ids),
        "token_ids": tokens,
        "text": tokenizer.batch_decode(tokens, skip_special_tokens=True),
        "finish_reason": [c.finish_reason for c in completions],
        "num_tokens": [len(t) for t in tokens],
    }
    return pa.table(columns, schema=GENERATIONS_SCHEMA)


def write_shard(out_dir: Path, index: int, table: pa.Table) -> dict:
    """Shard ``index`` written atomically, its values' checksums and the output's name in its
    metadata; its manifest entry."""
    path = out_dir / ShardPlan.file(index)
    sha = write_parquet(table, path, ROW_GROUP_ROWS, page_checksum=True,
                        metadata={FINGERPRINT_KEY: out_dir.name, refvalues.COLUMNS_KEY: refvalues.column_digests(table)})
    return {"file": path.name, "sha256": sha, "rows": table.num_rows}

"""The judge stage: a reward per generated completion, then one preference pair per prompt.

    result = judge(load_config("round.yaml"), "storage/generations/<fp>")
    result.output_dir  # <storage>/judgements/<fingerprint>/ with rewards.parquet, pairs.jsonl,
                       # dropped.parquet, manifest.json
    table = rewards_table(result.output_dir)   # verified: prompt_id, sample, reward

Reads a complete generations folder (every shard checked against its manifest's sha256) and its
prompts folder, judges every completion with judge.function or judge.reward_model
(pipeline.judge.rewards), and pairs each prompt's completions with the pairs section's rules
(pipeline.judge.pairs, DROP_REASONS). Files:

- ``rewards.parquet``: prompt_id (string), sample (int32), reward (float64), in generation order.
- ``pairs.jsonl`` (``make_pairs``): one object per line, keys sorted, in prompt order: prompt (as
  read: text, or chat messages), chosen and rejected (the text for a text prompt, else
  ``[{"role": "assistant", "content": text}]``), prompt_id, chosen_sample, rejected_sample,
  chosen_reward, rejected_reward, margin: standard or conversational preference rows that
  `dpo prepare` reads as they are.
- ``dropped.parquet`` (``make_pairs``): prompt_id, reason (a DROP_REASONS key), detail.
- ``manifest.json``, last: identity (paths.judgements_identity), counts (pairs + dropped ==
  prompts), reward statistics, each file's sha256; no timings, so a rerun writes the same bytes.

Every reward is computed, and checked, in memory before anything is written: a judge that fails
(a function missing, raising, or returning no number) leaves storage as it was, not even an empty
folder. The folder is then written under its lock; a complete, verified one is reused (skipped).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config.schema import Config
from pipeline.errors import CacheError, JudgeError, ValueProofError
from pipeline.judge.pairs import Drop, make_pairs
from pipeline.judge.rewards import RewardModel, check_reward, function_rewards, load_function
from pipeline.progress import Progress
from pipeline.storage import paths, trust
from pipeline.store import (
    atomic_write_text,
    ensure_dir,
    exclusive,
    fingerprint,
    lock_path,
    sha256_file,
    write_manifest,
    write_parquet,
)

log = logging.getLogger("dpo.judge")

PAIRS_FILE = paths.PAIRS
REWARDS_SCHEMA = pa.schema([("prompt_id", pa.string()), ("sample", pa.int32()), ("reward", pa.float64())])
DROPPED_SCHEMA = pa.schema([("prompt_id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
GENERATION_COLUMNS = ("prompt_id", "sample", "text")
PROMPTS_FILE = "prompts.parquet"


@dataclass
class JudgeResult:
    output_dir: Path
    manifest: dict
    skipped: bool
    stats: dict = field(default_factory=dict)  # this run: seconds, completions judged, judge kind


@dataclass
class Generations:
    """A verified generations folder, read: its completions in order, and each prompt as read."""

    fingerprint: str
    prompt_ids: list[str]
    samples: list[int]
    texts: list[str]
    prompts: dict[str, object]  # prompt_id -> the prompt as read (text, or chat messages)


# --- reading the generations ----------------------------------------------------------------------


def _read_prompts(gen_dir: Path, manifest: dict, fix: str) -> dict[str, object]:
    """prompt_id -> the prompt as read, from the generations' prompts folder (verified)."""
    name = manifest.get("prompts_dir")
    if not isinstance(name, str) or not name:
        raise CacheError(f"{gen_dir}: the manifest names no prompts_dir", hint=fix)
    folder = Path(name) if Path(name).is_absolute() else paths.prompts_dir(paths.storage_of(gen_dir), name)
    trust.verified_prompts(folder)
    table = pq.read_table(folder / PROMPTS_FILE, columns=["prompt_id", "prompt"])
    return {pid: json.loads(text) for pid, text in zip(table["prompt_id"].to_pylist(), table["prompt"].to_pylist())}


def read_generations(generations_dir: str | Path) -> Generations:
    """A complete generations folder whose shards match their sha256 (and their values their
    checksums, where written), read; else CacheError."""
    gen_dir = Path(generations_dir)
    fix = f"run `dpo generate -c CONFIG` (delete {gen_dir} first if it is damaged)"
    manifest = trust.verified_generations(gen_dir)
    try:
        table = trust.generation_table(gen_dir, require_digests=False)  # every column, so every checksum
    except ValueProofError as exc:
        raise CacheError(f"{gen_dir}: {exc}", hint=fix) from None
    if table.num_rows == 0:
        raise JudgeError(f"{gen_dir} holds no completions: nothing to judge", hint=fix)
    missing = [c for c in GENERATION_COLUMNS if c not in table.column_names]
    if missing:
        raise CacheError(f"{gen_dir}: its shards have no column {', '.join(missing)}", hint=fix)
    prompts = _read_prompts(gen_dir, manifest, fix)
    prompt_ids = table["prompt_id"].to_pylist()
    unknown = next((p for p in prompt_ids if p not in prompts), None)
    if unknown is not None:
        raise CacheError(f"{gen_dir}: prompt_id {unknown} is not in its prompts folder", hint=fix)
    return Generations(manifest["fingerprint"], prompt_ids, table["sample"].to_pylist(), table["text"].to_pylist(),
                       prompts)


# --- the stage -------------------------------------------------------------------------------------


def judge(cfg: Config, generations_dir: str | Path, make_pairs: bool = True, show_progress: bool = True) -> JudgeResult:
    """Judge the completions of ``generations_dir`` (or find the complete judgements) and pair them."""
    if cfg.judge is None:
        raise JudgeError("no judge configured", hint="set judge.function (module:function) or judge.reward_model")
    started = time.perf_counter()
    fn = load_function(cfg.judge.function) if cfg.judge.function else None  # fails before any work
    gens = read_generations(generations_dir)
    identity = paths.judgements_identity(cfg, gens.fingerprint, make_pairs)
    fp = fingerprint(identity)
    out_dir = paths.judgements_dir(cfg.storage, fp)
    kind = identity["judge"]["kind"]
    if trust.is_verified(trust.verified_judgements, out_dir):
        log.info("judge: up to date, %s", out_dir)
        return JudgeResult(out_dir, trust.verified_judgements(out_dir), True, _skipped_stats(started, kind))
    rewards, truncated, settings = _rewards(cfg, fn, gens, show_progress)
    outputs = _outputs(cfg, gens, rewards, make_pairs)  # everything in memory: nothing written yet
    with exclusive(lock_path(cfg.storage, "judgements", fp), f"judgements {out_dir}", wait=True):
        if trust.is_verified(trust.verified_judgements, out_dir):
            return JudgeResult(out_dir, trust.verified_judgements(out_dir), True, _skipped_stats(started, kind))
        _clear(out_dir)
        files = _write(out_dir, outputs)
        manifest = {
            "kind": "judgements",
            "fingerprint": fp,
            "identity": identity,
            "generations": gens.fingerprint,
            "judge": {"kind": kind, **settings},
            "counts": {**outputs["counts"], "truncated": truncated},
            "rewards": _reward_stats(rewards),
            "files": files,
            "versions": paths.library_versions(),
            "complete": True,
        }
        write_manifest(out_dir, manifest)
    stats = {"seconds": round(time.perf_counter() - started, 3), "judged": len(rewards), "judge": kind}
    log.info("judge: %d completions judged (%s), %s pairs, %s", len(rewards), kind,
             manifest["counts"].get("pairs", "no"), out_dir)
    return JudgeResult(out_dir, manifest, False, stats)


def _skipped_stats(started: float, kind: str) -> dict:
    return {"seconds": round(time.perf_counter() - started, 3), "judged": 0, "judge": kind}


def _rewards(cfg: Config, fn, gens: Generations, show_progress: bool) -> tuple[list[float], int, dict]:
    """Every completion's reward (checked), the rows truncated, and the judge's settings."""
    prompts = [gens.prompts[p] for p in gens.prompt_ids]
    keys = list(zip(gens.prompt_ids, gens.samples))
    if fn is not None:
        with Progress(len(keys), "judge (function)", "completions", show_progress, log) as bar:
            return function_rewards(fn, prompts, gens.texts, keys, bar), 0, {"function": cfg.judge.function}
    model = RewardModel(cfg.judge)
    with Progress(len(keys), "judge (reward model)", "completions", show_progress, log) as bar:
        values = model(prompts, gens.texts, bar)
    rewards = [check_reward(v, f"judge.reward_model on prompt_id {p} sample {s}") for v, (p, s) in zip(values, keys)]
    settings = {"reward_model": cfg.judge.reward_model, "revision": cfg.judge.revision,
                "batch_size": cfg.judge.batch_size, "device": model.device}
    return rewards, model.truncated, settings


def _grouped(gens: Generations, rewards: list[float]) -> dict[str, list[tuple[int, float, str]]]:
    """prompt_id -> its completions (sample, reward, text), prompts in generation order."""
    groups: dict[str, list] = {}
    for pid, sample, reward, text in zip(gens.prompt_ids, gens.samples, rewards, gens.texts):
        groups.setdefault(pid, []).append((sample, reward, text))
    return groups


def _outputs(cfg: Config, gens: Generations, rewards: list[float], make: bool) -> dict:
    """The folder's contents, in memory: tables, pairs.jsonl's lines and the counts."""
    rewards_table_ = pa.table({"prompt_id": gens.prompt_ids, "sample": gens.samples, "reward": rewards},
                              schema=REWARDS_SCHEMA)
    groups = _grouped(gens, rewards)
    empty = sum(not t.strip() for t in gens.texts)
    counts = {"prompts": len(groups), "completions": len(rewards), "empty_completions": empty}
    out = {"rewards": rewards_table_, "counts": counts}
    if not make:
        return out
    lines, dropped = [], {name: [] for name in DROPPED_SCHEMA.names}
    for pid, completions in groups.items():
        outcome = make_pairs(completions, cfg.pairs.strategy, cfg.pairs.min_margin, cfg.pairs.seed, pid)
        if isinstance(outcome, Drop):
            for name, value in zip(DROPPED_SCHEMA.names, (pid, outcome.reason, outcome.detail)):
                dropped[name].append(value)
        else:
            lines.append(_pair_line(gens.prompts[pid], outcome))
    by_reason = dict(sorted(Counter(dropped["reason"]).items()))
    counts.update(pairs=len(lines), dropped=len(dropped["reason"]), dropped_by_reason=by_reason)
    if counts["pairs"] + counts["dropped"] != counts["prompts"]:  # an invariant; never expected to fire
        raise JudgeError(f"accounting error: {counts['pairs']} pairs + {counts['dropped']} dropped != "
                         f"{counts['prompts']} prompts")
    out.update(pairs="".join(line + "\n" for line in lines), dropped=pa.table(dropped, schema=DROPPED_SCHEMA))
    return out


def _pair_line(prompt, pair) -> str:
    """One pairs.jsonl line: a preference row (standard for a text prompt, else conversational)."""
    def response(text: str):
        return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]

    row = {"prompt": prompt, "chosen": response(pair.chosen.text), "rejected": response(pair.rejected.text),
           "prompt_id": pair.prompt_id, "chosen_sample": pair.chosen.sample,
           "rejected_sample": pair.rejected.sample, "chosen_reward": pair.chosen.reward,
           "rejected_reward": pair.rejected.reward, "margin": pair.margin}
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def _reward_stats(rewards: list[float]) -> dict:
    values = np.asarray(rewards, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max())}


def _clear(out_dir: Path) -> None:
    """Remove what a dead writer left (called under the lock): the folder is written whole."""
    ensure_dir(out_dir)
    for leftover in out_dir.iterdir():
        leftover.unlink()


def _write(out_dir: Path, outputs: dict) -> dict:
    """Write the files (atomically each); return the manifest's files entry."""
    files = {}
    sha = write_parquet(outputs["rewards"], out_dir / paths.REWARDS, row_group_size=65536)
    files[paths.REWARDS] = {"sha256": sha, "rows": outputs["rewards"].num_rows}
    if "pairs" in outputs:
        atomic_write_text(out_dir / PAIRS_FILE, outputs["pairs"])
        files[PAIRS_FILE] = {"sha256": sha256_file(out_dir / PAIRS_FILE, use_cache=False),
                             "rows": outputs["counts"]["pairs"]}
        sha = write_parquet(outputs["dropped"], out_dir / paths.DROPPED, row_group_size=65536)
        files[paths.DROPPED] = {"sha256": sha, "rows": outputs["dropped"].num_rows}
    return files


def rewards_table(output_dir: str | Path) -> pa.Table:
    """The rewards of a verified judgements folder: prompt_id, sample, reward (CacheError if not)."""
    output_dir = Path(output_dir)
    trust.verified_judgements(output_dir)
    return pq.read_table(output_dir / paths.REWARDS).select(list(REWARDS_SCHEMA.names))

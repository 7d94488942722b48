"""What proving a reference cache's values costs, on the 2,312-row HH-RLHF harmless-base cache.

    PYTHONPATH=. .venv/bin/python bench/value_checks_bench.py [--repeats 5] [--out bench/results/value_checks.json]

The HH test split is prepared with the SmolLM2 tokenizer (the real rows and token counts, as
prepare keeps them) and scored by a random one-layer Llama with SmolLM2's vocabulary (the values' bytes are what is measured, not the model; per-token values
stored, as by default). Then, each the median of ``--repeats`` in this process (files in the page
cache; sha256 of the files is memoized per process and is not part of any row):

  row checks     refvalues.row_problems over every row (finite, bounds, per-token counts, sums)
  audit rows     the audit's row checks (the above + token counts against the dataset), polars in
  column sums    refvalues.column_digests of the whole cache (what a proof recomputes)
  proven read    refvalues.read_shards, every column (score's up-to-date check, the audit)
  plain read     the same columns with pyarrow, no page checksums, no digests, no row checks
  train read     refvalues.read_shards of the columns training reads vs the plain pyarrow scan
  quick audit    pipeline.audit.checks.audit(cache) end to end (no model)

Prints a table and writes JSON.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import HH_TEST, bench_parser, finish

TRAIN_COLUMNS = ["id", "chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens"]


def build_cache(tmp: Path, data: str) -> Path:
    """HH prepared with SmolLM2's tokenizer, scored by a random one-layer model of its vocabulary."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.config.load import config_from_dict
    from pipeline.models.assets import smollm2_folder
    from pipeline.prepare.stage import prepare
    from pipeline.score.stage import score

    tokenizer_dir = smollm2_folder(with_model=False)
    model_dir = tmp / "model"
    shutil.copytree(tokenizer_dir, model_dir, ignore=shutil.ignore_patterns(".*"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=8192,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    cfg = config_from_dict({"storage": str(tmp / "storage"), "data": {"path": data},
                            "model": {"path": str(model_dir)}})
    prepare(cfg, show_progress=False)
    return score(cfg, show_progress=False).output_dir


def timed(function, repeats: int) -> tuple[float, object]:
    seconds, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), value


def measure(cache: Path, repeats: int) -> dict:
    import polars as pl
    import pyarrow.dataset as pa_dataset

    from pipeline.audit.checks import AuditReport, audit, check_rows, load_scores
    from pipeline.storage import refvalues, trust

    manifest = trust.verified_refscores(cache)
    paths = [cache / s["file"] for s in manifest["shards"]]
    table = pa_dataset.dataset([str(p) for p in paths]).to_table()
    scores = load_scores(cache, manifest)
    rows = {}
    rows["row checks"], problems = timed(lambda: refvalues.row_problems(table), repeats)
    rows["audit rows"], _ = timed(lambda: check_rows(AuditReport(str(cache)), cache, manifest, scores), repeats)
    rows["column sums"], _ = timed(lambda: refvalues.column_digests(table), repeats)
    rows["proven read"], _ = timed(lambda: refvalues.read_shards(paths, None), repeats)
    rows["plain read"], _ = timed(lambda: pa_dataset.dataset([str(p) for p in paths]).to_table(), repeats)
    rows["train read, proven"], _ = timed(lambda: refvalues.read_shards(paths, TRAIN_COLUMNS), repeats)
    rows["train read, plain"], _ = timed(
        lambda: pa_dataset.dataset([str(p) for p in paths]).to_table(columns=TRAIN_COLUMNS), repeats)
    rows["quick audit"], report = timed(lambda: audit(cache), repeats)
    tokens = int(pl.Series(scores["chosen_tokens"]).sum() + pl.Series(scores["rejected_tokens"]).sum())
    return {"rows": table.num_rows, "shards": len(paths), "response_tokens": tokens,
            "cache_mb": sum(p.stat().st_size for p in paths) / 1e6, "failing_rows": len(problems),
            "audit_passed": report.passed, "seconds": rows}


def main() -> int:
    parser = bench_parser(__doc__, "value_checks.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", default=str(HH_TEST))
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"no data at {args.data}: see ../shared/data/README.md", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DPO_HASH_CACHE"] = tmp
        cache = build_cache(Path(tmp), args.data)
        result = measure(cache, args.repeats)
    print(f"\n{result['rows']} rows, {result['shards']} shards, {result['response_tokens']:,} response tokens, "
          f"{result['cache_mb']:.1f} MB; failing rows: {result['failing_rows']}; audit passed: {result['audit_passed']}")
    print(f"{'step':<22}{'median s':>10}")
    for name, seconds in result["seconds"].items():
        print(f"{name:<22}{seconds:>10.4f}")
    return finish(args.out, {"bench": "value_checks", "data": args.data, "repeats": args.repeats,
                             "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, **result})


if __name__ == "__main__":
    sys.exit(main())

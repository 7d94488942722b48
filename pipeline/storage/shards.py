"""How a reference cache is cut into shards: which rows each holds, and its file's name.

    shards = ShardPlan(rows=10_000, shard_rows=4096)   # or ShardPlan.of(manifest), a cache's
    shards.count                  # 3
    shards.rows_of(2)             # range(8192, 10000): the rows of the prepared dataset it holds
    shards.shard_of(5000)         # 1: the shard that holds row 5000
    ShardPlan.file(2)             # "part-00002.parquet"; ShardPlan.index_of("part-00002.parquet") == 2

Shard ``i`` holds rows ``[i x shard_rows, (i + 1) x shard_rows)`` of the prepared dataset (the
last one fewer), in the dataset's order: the score stage writes them, the audit re-scores in them,
and both find them here, so the arithmetic is written once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.errors import CacheError

_FILE = re.compile(r"^part-(\d{5})\.parquet$")


@dataclass(frozen=True)
class ShardPlan:
    """The shards of a cache of ``rows`` examples, ``shard_rows`` (score.shard_rows) each."""

    rows: int
    shard_rows: int

    @classmethod
    def of(cls, manifest: dict) -> ShardPlan:
        """The shards of a reference cache, from its manifest (rows, inputs.shard_rows), or
        CacheError when it does not record them."""
        rows, inputs = manifest.get("rows"), manifest.get("inputs")
        shard_rows = inputs.get("shard_rows") if isinstance(inputs, dict) else None
        if not (isinstance(rows, int) and isinstance(shard_rows, int) and shard_rows > 0):
            raise CacheError("the refscores manifest does not record its rows and shard_rows")
        return cls(rows, shard_rows)

    @property
    def count(self) -> int:
        return math.ceil(self.rows / self.shard_rows)

    def rows_of(self, index: int) -> range:
        """The rows of the prepared dataset that shard ``index`` holds."""
        first = index * self.shard_rows
        return range(first, min(first + self.shard_rows, self.rows))

    def shard_of(self, row: int) -> int:
        """The shard that holds ``row``."""
        return row // self.shard_rows

    @staticmethod
    def file(index: int) -> str:
        """The file name of shard ``index`` in its cache's folder."""
        return f"part-{index:05d}.parquet"

    @staticmethod
    def index_of(file: str) -> int | None:
        """The shard index a file name stands for; None when it is no shard's name."""
        match = _FILE.match(file)
        return int(match.group(1)) if match else None

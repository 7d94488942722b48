"""ShardPlan (pipeline/storage/shards.py), the one place that says which rows a shard holds."""

from __future__ import annotations

import pytest

from pipeline.errors import CacheError
from pipeline.storage.shards import ShardPlan


@pytest.mark.parametrize("rows, shard_rows", [(1, 1), (10, 3), (12, 4), (4096, 4096), (10_000, 4096)])
def test_the_shards_cover_every_row_once_in_order(rows, shard_rows):
    shards = ShardPlan(rows, shard_rows)
    covered = [row for index in range(shards.count) for row in shards.rows_of(index)]
    assert covered == list(range(rows))  # every row once, in the dataset's order
    assert all(len(shards.rows_of(i)) == shard_rows for i in range(shards.count - 1))
    assert 0 < len(shards.rows_of(shards.count - 1)) <= shard_rows  # only the last one is short
    assert all(row in shards.rows_of(shards.shard_of(row)) for row in range(rows))


def test_file_names_and_back():
    assert ShardPlan.file(0) == "part-00000.parquet" and ShardPlan.file(123) == "part-00123.parquet"
    assert [ShardPlan.index_of(ShardPlan.file(i)) for i in (0, 7, 99999)] == [0, 7, 99999]
    for name in ("manifest.json", "part-1.parquet", ".tmp-part-00000.parquet.x", "part-00000.parquet.bak"):
        assert ShardPlan.index_of(name) is None, name


def test_a_caches_shards_come_from_its_manifest():
    assert ShardPlan.of({"rows": 600, "inputs": {"shard_rows": 100}}) == ShardPlan(600, 100)
    for manifest in ({}, {"rows": 600}, {"rows": 600, "inputs": {}}, {"rows": "600", "inputs": {"shard_rows": 100}},
                     {"rows": 600, "inputs": {"shard_rows": 0}}, {"rows": 600, "inputs": None}):
        with pytest.raises(CacheError, match="does not record its rows and shard_rows"):
            ShardPlan.of(manifest)

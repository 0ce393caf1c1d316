"""Partition strategies: which partition of a projection sees which aggregate.

All events of one aggregate go to one partition, so a partitioned projection still
sees each aggregate's events in version order.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import sqlalchemy as sa

_FNV32_OFFSET = 0x811C9DC5
_FNV32_PRIME = 0x01000193


def fnv1a_32(value: str) -> int:
    """FNV-1a 32-bit hash of the UTF-8 bytes, as Go's ``hash/fnv`` ``New32a``."""
    h = _FNV32_OFFSET
    for byte in value.encode("utf-8"):
        h = ((h ^ byte) * _FNV32_PRIME) & 0xFFFFFFFF
    return h


@runtime_checkable
class PartitionStrategy(Protocol):
    """Decides whether partition ``partition_key`` of ``total_partitions`` handles an aggregate."""

    def should_process(
        self, aggregate_id: str, partition_key: int, total_partitions: int
    ) -> bool: ...


class HashPartitionStrategy:
    """FNV-1a 32 of the aggregate id modulo the partition count (the Go original's rule).

    The hash is stored with each event at append, so the filter runs in SQL.
    """

    def should_process(self, aggregate_id: str, partition_key: int, total_partitions: int) -> bool:
        if total_partitions <= 1:
            return True
        return fnv1a_32(aggregate_id) % total_partitions == partition_key

    def sql_filter(
        self, partition_hash: sa.ColumnElement[int], partition_key: int, total_partitions: int
    ) -> sa.ColumnElement[bool] | None:
        """The same rule as a SQL condition on the stored hash (None: no filter needed)."""
        if total_partitions <= 1:
            return None
        return (partition_hash % total_partitions) == partition_key

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return "HashPartitionStrategy()"

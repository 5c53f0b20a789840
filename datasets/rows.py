"""Decoded rows in flat numpy form (:class:`Rows`): jagged take / slice / truncation plans, concatenation,
padding, cutting into batches and conversion to :class:`datasets.batch.Batch`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from datasets.batch import Batch
from datasets.schema import SchemaConfig

__all__ = ["Plan", "Rows", "rebatch", "tail_plan"]


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


# A jagged selection is planned once per distinct lengths array and applied to every column sharing it
# (aligned sequence columns share one lengths object): (positions or slice into values, new lengths).
Plan = tuple[object, np.ndarray]


def _gather_plan(starts: np.ndarray, new_lengths: np.ndarray) -> Plan:
    """Positions of rows that start at value index ``starts [R']`` with ``new_lengths [R']`` items each."""
    new_offsets = _offsets(new_lengths)
    pos = np.arange(new_offsets[-1], dtype=np.int64) + np.repeat(starts - new_offsets[:-1], new_lengths)
    return pos, new_lengths


def _take_plan(lengths: np.ndarray, idx: np.ndarray) -> Plan:
    """Rows ``idx`` (any order, repeats allowed) of a jagged array with row lengths ``lengths [R]``."""
    return _gather_plan(_offsets(lengths)[:-1][idx], lengths[idx])


def _slice_plan(lengths: np.ndarray, a: int, b: int) -> Plan:
    """Rows ``a:b``: a contiguous slice of the values (no copy)."""
    start = int(lengths[:a].sum())
    return slice(start, start + int(lengths[a:b].sum())), lengths[a:b]


def tail_plan(lengths: np.ndarray, max_len: int) -> Plan:
    """The last ``max_len`` items of every row (the most recent behaviours); ``max_len <= 0`` keeps all."""
    if max_len <= 0 or len(lengths) == 0 or int(lengths.max()) <= max_len:
        return slice(None), lengths
    cut = np.maximum(lengths - max_len, 0)
    return _gather_plan(_offsets(lengths)[:-1] + cut, lengths - cut)


_PlanCache = dict[int, tuple[np.ndarray, Plan]]


def _apply_plans(
    values: list[np.ndarray],
    lengths: list[np.ndarray],
    plan_fn: Callable[[np.ndarray], Plan],
    cache: _PlanCache,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Applies ``plan_fn(lengths)`` to each (values, lengths) pair, planning once per lengths object."""
    out_v: list[np.ndarray] = []
    out_n: list[np.ndarray] = []
    for v, n in zip(values, lengths):
        if id(n) not in cache:
            cache[id(n)] = (n, plan_fn(n))  # holding n keeps its id unique while the cache lives
        index, new_n = cache[id(n)][1]
        out_v.append(v[index])
        out_n.append(new_n)
    return out_v, out_n


@dataclass
class Rows:
    """Decoded, validated rows in flat numpy form; the unit of shuffling and batching.

    Shapes: R rows, N id features, S float sequence features, F scalar floats, T tasks, Q sequence labels,
    E_i items of jagged feature i. Jagged columns of one sequence group share one lengths array object.
    """

    id_values: list[np.ndarray]  # N x [E_i] int64 (scalar features: E_i = R)
    id_lengths: list[np.ndarray]  # N x [R] int64
    seq_values: list[np.ndarray]  # S x [E_i] float32
    seq_lengths: list[np.ndarray]  # S x [R] int64
    floats: np.ndarray  # [R, F] float32
    labels: np.ndarray  # [R, T] float32
    lab_values: list[np.ndarray]  # Q x [E_i] float32, sequence labels
    lab_lengths: list[np.ndarray]  # Q x [R] int64
    groups: np.ndarray  # [R] int64
    weights: np.ndarray  # [R] float32
    valid: np.ndarray  # [R] bool
    fixes: np.ndarray  # [R, N] int64, ids rewritten per row and feature

    def __len__(self) -> int:
        return len(self.labels)

    def _map(self, plan_fn: Callable[[np.ndarray], Plan], dense: Callable[[np.ndarray], np.ndarray]) -> "Rows":
        cache: _PlanCache = {}
        id_values, id_lengths = _apply_plans(self.id_values, self.id_lengths, plan_fn, cache)
        seq_values, seq_lengths = _apply_plans(self.seq_values, self.seq_lengths, plan_fn, cache)
        lab_values, lab_lengths = _apply_plans(self.lab_values, self.lab_lengths, plan_fn, cache)
        return Rows(
            id_values=id_values,
            id_lengths=id_lengths,
            seq_values=seq_values,
            seq_lengths=seq_lengths,
            floats=dense(self.floats),
            labels=dense(self.labels),
            lab_values=lab_values,
            lab_lengths=lab_lengths,
            groups=dense(self.groups),
            weights=dense(self.weights),
            valid=dense(self.valid),
            fixes=dense(self.fixes),
        )

    def take(self, idx: np.ndarray) -> "Rows":
        return self._map(lambda n: _take_plan(n, idx), lambda x: x[idx])

    def slice(self, a: int, b: int) -> "Rows":
        return self._map(lambda n: _slice_plan(n, a, b), lambda x: x[a:b])

    @staticmethod
    def concat(parts: Sequence["Rows"]) -> "Rows":
        if len(parts) == 1:
            return parts[0]

        def cat(get: Callable[[Rows], list[np.ndarray]]) -> list[np.ndarray]:
            return [np.concatenate(xs) for xs in zip(*(get(p) for p in parts))]

        shared: dict[tuple[int, ...], tuple[tuple[np.ndarray, ...], np.ndarray]] = {}  # shared lengths stay shared

        def cat_lengths(get: Callable[[Rows], list[np.ndarray]]) -> list[np.ndarray]:
            out = []
            for ns in zip(*(get(p) for p in parts)):
                key = tuple(id(n) for n in ns)
                if key not in shared:
                    shared[key] = (ns, np.concatenate(ns))
                out.append(shared[key][1])
            return out

        return Rows(
            id_values=cat(lambda p: p.id_values),
            id_lengths=cat_lengths(lambda p: p.id_lengths),
            seq_values=cat(lambda p: p.seq_values),
            seq_lengths=cat_lengths(lambda p: p.seq_lengths),
            floats=np.concatenate([p.floats for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            lab_values=cat(lambda p: p.lab_values),
            lab_lengths=cat_lengths(lambda p: p.lab_lengths),
            groups=np.concatenate([p.groups for p in parts]),
            weights=np.concatenate([p.weights for p in parts]),
            valid=np.concatenate([p.valid for p in parts]),
            fixes=np.concatenate([p.fixes for p in parts]),
        )

    def padding(self, count: int) -> "Rows":
        """``count`` copies of this chunk's first row, marked invalid with weight 0 and no id fixes."""
        pad = self.take(np.zeros(count, dtype=np.int64))
        pad.weights = np.zeros(count, dtype=np.float32)
        pad.valid = np.zeros(count, dtype=bool)
        pad.fixes = np.zeros_like(pad.fixes)
        return pad

    def to_batch(self, schema: SchemaConfig) -> Batch:
        """The torch form; shapes as documented on :class:`Batch` with ``B = len(self)``."""
        b = len(self)

        def kjt(
            keys: list[str], values: list[np.ndarray], lengths: list[np.ndarray], dtype: torch.dtype
        ) -> KeyedJaggedTensor:
            # values [sum of lengths], lengths [len(keys) * B] key-major; stride=B keeps B when keys == []
            if not keys:
                return KeyedJaggedTensor(
                    keys=[], values=torch.empty(0, dtype=dtype), lengths=torch.empty(0, dtype=torch.int32), stride=b
                )
            return KeyedJaggedTensor(
                keys=keys,
                values=torch.from_numpy(np.concatenate(values)).to(dtype),
                lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
                stride=b,
            )

        return Batch(
            sparse_features=kjt([f.name for f in schema.id_features], self.id_values, self.id_lengths, torch.int64),
            float_sequences=kjt(
                [f.name for f in schema.float_sequences], self.seq_values, self.seq_lengths, torch.float32
            ),
            float_features=torch.from_numpy(np.require(self.floats, np.float32, ["C", "W"])),
            labels=torch.from_numpy(np.require(self.labels, np.float32, ["C", "W"])),
            sequence_labels=kjt(
                [f.name for f in schema.sequence_labels], self.lab_values, self.lab_lengths, torch.float32
            ),
            group_ids=torch.from_numpy(np.require(self.groups, np.int64, ["C", "W"])),
            weights=torch.from_numpy(np.require(self.weights, np.float32, ["C", "W"])),
            valid=torch.from_numpy(np.require(self.valid, bool, ["C", "W"])),
            id_fixes=torch.from_numpy(np.require(self.fixes.sum(axis=0), np.int64, ["C", "W"])),
        )


def rebatch(parts: Iterable[Rows], batch_size: int, pad_last: bool) -> Iterator[Rows]:
    """Cuts a stream of row chunks into chunks of exactly ``batch_size`` rows (chunks may span parts).

    With ``pad_last`` a final partial chunk is padded with invalid copies of its first row.
    """
    pending: list[Rows] = []
    have = 0
    for part in parts:
        pos = 0
        while pos < len(part):
            take = min(batch_size - have, len(part) - pos)
            pending.append(part if (pos == 0 and take == len(part)) else part.slice(pos, pos + take))
            have += take
            pos += take
            if have == batch_size:
                yield Rows.concat(pending)
                pending, have = [], 0
    if pad_last and have:
        yield Rows.concat(pending + [pending[0].padding(batch_size - have)])

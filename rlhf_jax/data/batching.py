"""Fixed-shape batches in a reproducible order.

Batch k of epoch e is a pure function of (seed, e, k): an epoch shuffles groups with
`default_rng([seed, e])` and packs them, in that order, into batches of `batch_size` items,
so a run resumes at any step without replaying the data. Items of one group (the pairs of
a K-way ranking) always share a batch; a batch that a group does not fill is padded with
-1 (an empty slot, weight 0). Each batch is padded to the smallest length bucket that holds
its longest item, so the step compiles once per bucket.

On several hosts each plans its own slice of the data; the hosts then agree on the number
of batches per epoch and on each batch's bucket (one all-gather per epoch), so every global
batch has one shape.

`load_splits` puts it together for a stage's data section: rows loaded, held out, sliced to
this host, checked and tokenised by the stage's own function, and planned into batches.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from rlhf_jax.data import sources
from rlhf_jax.data.checks import DataError
from rlhf_jax.data.config import DataConfig

Agree = Callable[[np.ndarray, str], np.ndarray]


def agree_across_hosts(values: np.ndarray, op: str) -> np.ndarray:
    """Element-wise max or min of `values` over all hosts (identity on one host)."""
    import jax

    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(values))  # [hosts, ...]
    return gathered.max(axis=0) if op == "max" else gathered.min(axis=0)


def pad_right(
    seqs: Sequence[np.ndarray], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [N, length] and attention mask [N, length] (int32)."""
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


class BatchPlan:
    """Which items make up batch k, and the length it is padded to.

    Args:
      lengths: [N] tokens of each item (its longest sequence).
      groups: [N] group id of each item; items of a group share a batch (None: no groups).
      batch_size: items per batch on this host.
      buckets: increasing padded lengths; the last must hold the longest item.
      seed: seed of the shuffle.
      shuffle: shuffle groups each epoch (else keep their order).
      drop_last: drop an epoch's last, partly filled batch (training); keep it padded (eval).
      agree: how hosts agree on shapes (default: all-gather when there are several).
    """

    def __init__(
        self,
        lengths: np.ndarray,
        groups: Optional[np.ndarray],
        batch_size: int,
        buckets: Sequence[int],
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        agree: Agree = agree_across_hosts,
    ):
        self.lengths = np.asarray(lengths, np.int64)
        self.batch_size = int(batch_size)
        self.buckets = np.asarray(buckets, np.int64)
        self.seed, self.shuffle, self.drop_last, self.agree = seed, shuffle, drop_last, agree
        if len(self.lengths) and self.lengths.max() > self.buckets[-1]:
            raise ValueError(f"an item of {self.lengths.max()} tokens exceeds the last bucket "
                             f"{self.buckets[-1]}")
        if groups is None:
            self._members = None
        else:
            _, first, inverse = np.unique(np.asarray(groups), return_index=True,
                                          return_inverse=True)
            order = np.argsort(first)  # groups in order of first appearance
            rank = np.empty_like(order)
            rank[order] = np.arange(len(order))
            by_group = np.argsort(rank[inverse], kind="stable")
            sizes = np.bincount(rank[inverse], minlength=len(order))
            self._members = np.split(by_group, np.cumsum(sizes)[:-1])
            if sizes.size and sizes.max() == 1:
                self._members = None  # every group is one item: the fast path
            elif sizes.size and sizes.max() > self.batch_size:
                raise DataError(
                    f"a group of {sizes.max()} items (pairs of one ranking) does not fit in a "
                    f"batch of {self.batch_size}; raise the batch size or use fewer responses"
                )
        self._cache: tuple[int, np.ndarray, np.ndarray] = (-1, np.zeros((0, 0)), np.zeros(0))
        self._counts: dict[int, int] = {}  # batches per epoch, remembered for `locate`

    def _pack(self, epoch: int) -> np.ndarray:
        """Item indices [n, batch_size] of this host's batches of `epoch` (-1 = empty slot)."""
        b = self.batch_size
        rng = np.random.default_rng([self.seed, epoch])
        if self._members is None:
            n_items = len(self.lengths)
            order = rng.permutation(n_items) if self.shuffle else np.arange(n_items)
            full = n_items // b
            rows = [order[: full * b].reshape(full, b)]
            if not self.drop_last and n_items % b:
                rows.append(np.concatenate([order[full * b:], np.full(b - n_items % b, -1)])[None])
            return np.concatenate(rows).astype(np.int64)
        n_groups = len(self._members)
        order = rng.permutation(n_groups) if self.shuffle else np.arange(n_groups)
        batches, current = [], []
        for g in order:
            members = self._members[g]
            if len(current) + len(members) > b:
                batches.append(current + [-1] * (b - len(current)))
                current = []
            current.extend(members.tolist())
        if current and (len(current) == b or not self.drop_last):
            batches.append(current + [-1] * (b - len(current)))
        return np.asarray(batches, np.int64).reshape(-1, b)

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices [n, batch_size], padded length [n]) of every batch of `epoch`."""
        if self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        rows = self._pack(epoch)
        n = int(self.agree(np.asarray([len(rows)]), "min" if self.drop_last else "max")[0])
        if n > len(rows):  # another host has more: empty batches here
            rows = np.concatenate([rows, np.full((n - len(rows), self.batch_size), -1)])
        rows = rows[:n]
        longest = np.where(rows >= 0, self.lengths[np.maximum(rows, 0)], 0).max(axis=1, initial=0)
        padded = self.agree(self.buckets[np.searchsorted(self.buckets, longest)], "max")
        self._cache = (epoch, rows, padded)
        self._counts[epoch] = n
        return rows, padded

    def batches_per_epoch(self, epoch: int = 0) -> int:
        if epoch not in self._counts:
            self.epoch(epoch)
        return self._counts[epoch]

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, k) of the run's `index`-th batch (0-based), walking the epochs."""
        epoch = 0
        while True:
            n = self.batches_per_epoch(epoch)
            if n == 0:  # `load_splits` refuses such data with the source's name first
                raise DataError("the data has fewer items than one batch; lower batch_size")
            if index < n:
                return epoch, index
            index -= n
            epoch += 1

    def batch(self, index: int) -> tuple[np.ndarray, int]:
        """(item indices [batch_size] with -1 at empty slots, padded length) of batch `index`."""
        epoch, k = self.locate(index)
        rows, padded = self.epoch(epoch)
        return rows[k], int(padded[k])


class Batches:
    """A split served as fixed-shape batches by a `BatchPlan`; subclasses say how the items
    of one batch become arrays (`collate`)."""

    plan: BatchPlan
    summary: str  # one line on what was loaded, dropped and truncated

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return self.plan.batches_per_epoch(epoch)

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Batch `index` of the run (0-based; epochs follow one another)."""
        items, length = self.plan.batch(index)
        return self.collate(items, length)

    def epoch_batches(self, epoch: int = 0):
        """Every batch of one epoch in order (for evaluation)."""
        items, lengths = self.plan.epoch(epoch)
        for r, n in zip(items, lengths):
            yield self.collate(r, int(n))

    def collate(self, items: np.ndarray, length: int) -> dict[str, np.ndarray]:
        raise NotImplementedError


def load_splits(
    cfg: DataConfig,
    seed: int,
    batch_size: int,
    make: Callable[..., Batches],
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    agree: Optional[Agree] = None,
):
    """(train, held-out or None) of a data config, served on this host.

    Args:
      cfg: the data section (sources, held-out split, buckets, shuffle).
      seed: seed of the held-out split and of the shuffle.
      batch_size: items per global batch; each of `process_count` hosts serves its share.
      make: `make(rows, name, plan)` checks and tokenises one split's rows (this host's
        slice, never empty) and returns its `Batches`, planned by `plan(lengths, groups)`
        (`BatchPlan`'s first two arguments).
      process_index, process_count: this host's slice (default: from jax).
      agree: how hosts agree on batch shapes (default: an all-gather; for tests).

    Raises:
      DataError: naming the source, when a split has no rows on this host or the training
        split fills no batch.
    """
    import jax

    count = jax.process_count() if process_count is None else process_count
    if batch_size % count:
        raise DataError(f"batch size {batch_size} does not split over {count} hosts")
    hosts = f" on this host ({count} hosts share it)" if count > 1 else ""
    train_ds, eval_ds, eval_name = sources.train_and_eval(cfg, seed)

    def split(ds, name: str, train: bool) -> Batches:
        ds = sources.host_slice(ds, process_index, count)
        if len(ds) == 0:
            raise DataError(f"{name}: no rows{hosts}; give a source with rows")

        def plan(lengths: np.ndarray, groups: Optional[np.ndarray]) -> BatchPlan:
            try:
                return BatchPlan(lengths, groups, batch_size // count, cfg.bucket_lengths(), seed,
                                 shuffle=train and cfg.shuffle, drop_last=train,
                                 **({} if agree is None else {"agree": agree}))
            except DataError as e:  # a ranking too large for a batch: name the source
                raise DataError(f"{name}: {e}") from None

        data = make(ds, name, plan)
        if train and data.batches_per_epoch(0) == 0:
            raise DataError(f"{data.summary}: too few for one batch of batch_size={batch_size}"
                            f"{hosts}; lower batch_size or add rows")
        return data

    train = split(train_ds, cfg.train, True)
    return train, (split(eval_ds, eval_name, False) if eval_ds is not None else None)

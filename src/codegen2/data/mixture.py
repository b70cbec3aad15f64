"""The weighted mixture of packed token streams: sample i is a pure function of (i, seed).

Chunks: source s's stream (documents joined by `<|endoftext|>`) is cut into chunks of
`seq_len + 1` tokens that overlap by one token (chunk c = stream[c*T : c*T + T + 1]), so every
token is a target exactly once per epoch. Documents run across chunk boundaries, so a chunk
usually holds the end of one document, several whole ones and the start of another.

Which source sample i comes from: samples are grouped in blocks of `BLOCK` consecutive indices.
Within block b, slot j goes to the source whose cumulative-weight interval holds (j + u_b) / BLOCK,
with u_b a seeded uniform offset (systematic sampling): each block holds every source's exact
expected share, rounded up or down by at most one, and the expectation is exact. A seeded
permutation of each block then spreads the sources over its slots, so neighbouring samples (one
batch) are mixed.

Which chunk: the k-th sample of source s takes position k mod n_s of a seeded permutation of
that source's n_s chunks, a fresh permutation for every epoch e = k div n_s. A small source with
a large weight thus repeats, in a new order each epoch.

Everything is computed from (seed, index) through counter-seeded generators and cached, so any
index can be read in any order, by any number of threads, and a resumed run reads the same data.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from codegen2.errors import UserError

BLOCK = 1024
_OFFSET_GROUP = 4096  # block offsets are drawn in groups of this many blocks
_DOMAIN_OFFSET, _DOMAIN_SLOTS, _DOMAIN_EPOCH = 0x5EED01, 0x5EED02, 0x5EED03


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


class _LRU:
    """A tiny thread-safe memo: key -> value computed once, the oldest dropped beyond `size`."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key, compute):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = compute()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


class PackedMixture:
    """Random access to an endless, weighted, shuffled mixture of packed token streams.

    `mixture[i]` is an int64 array of `seq_len + 1` tokens; it depends only on (i, seed, the
    streams and the weights). There is no length: a run takes as many samples as it needs.
    """

    def __init__(self, streams: Sequence[np.ndarray], weights: Sequence[float], seq_len: int, seed: int,
                 names: Sequence[str] | None = None):
        if not streams or len(streams) != len(weights):
            raise UserError(f"need one weight per stream, got {len(streams)} streams and {len(weights)} weights")
        if seq_len < 1:
            raise UserError(f"seq_len={seq_len} must be positive")
        names = list(names) if names is not None else [f"source {i}" for i in range(len(streams))]
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise UserError(f"mixture weights must be positive, got {list(weights)}")
        for name, stream in zip(names, streams):
            if stream.ndim != 1 or len(stream) < seq_len + 1:
                raise UserError(f"data source {name} has {len(stream)} tokens; seq_len={seq_len} needs at least "
                                f"{seq_len + 1} (add data or lower train.seq_len)")
        self.streams = list(streams)
        self.names = names
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.weights = w / w.sum()
        self._cum = np.cumsum(self.weights)
        self._cum[-1] = 1.0
        self.num_chunks = [(len(s) - 1) // self.seq_len for s in self.streams]
        self._offsets = _LRU(16)
        self._blocks = _LRU(64)
        self._epochs = _LRU(2 * len(self.streams) + 2)
        self._prefix_lock = threading.Lock()
        self._prefix = np.zeros((1, len(self.streams)), dtype=np.int64)  # samples per source before block b

    # ------------------------------------------------------------------------------- summaries
    @property
    def num_samples_per_epoch(self) -> int:
        """Samples in one pass over every chunk of every source (at their natural sizes)."""
        return int(sum(self.num_chunks))

    def epochs_at(self, num_samples: int) -> list[float]:
        """Expected passes over each source after `num_samples` samples (shows upsampling)."""
        return [float(num_samples * w / n) for w, n in zip(self.weights, self.num_chunks)]

    # --------------------------------------------------------------------- source assignment
    def _block_offset(self, block: int) -> float:
        group = block // _OFFSET_GROUP
        draws = self._offsets.get(group, lambda: _rng(self.seed, _DOMAIN_OFFSET, group).random(_OFFSET_GROUP))
        return float(draws[block % _OFFSET_GROUP])

    def _block_sources(self, block: int) -> np.ndarray:
        """Source of each slot of `block`, before the in-block permutation (systematic sampling)."""
        positions = (np.arange(BLOCK) + self._block_offset(block)) / BLOCK
        return np.searchsorted(self._cum, positions, side="right").clip(max=len(self.streams) - 1)

    def _block_layout(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, rank among that source's slots) for each position of `block`."""

        def compute():
            sources = self._block_sources(block)[_rng(self.seed, _DOMAIN_SLOTS, block).permutation(BLOCK)]
            order = np.argsort(sources, kind="stable")
            first = np.searchsorted(sources[order], np.arange(len(self.streams)))
            ranks = np.empty(BLOCK, dtype=np.int64)
            ranks[order] = np.arange(BLOCK) - first[sources[order]]
            return sources, ranks

        return self._blocks.get(block, compute)

    def _samples_before(self, blocks: np.ndarray) -> np.ndarray:
        """[len(blocks), S]: samples of each source in all blocks before each given block."""
        need = int(blocks.max()) + 1  # rows 0..need-1 of the prefix table
        with self._prefix_lock:
            have = len(self._prefix)
            if need > have:
                counts = self._block_counts(np.arange(have - 1, need - 1))
                self._prefix = np.concatenate([self._prefix, self._prefix[-1] + np.cumsum(counts, axis=0)])
            prefix = self._prefix
        return prefix[blocks]

    def _block_counts(self, blocks: np.ndarray) -> np.ndarray:
        """[len(blocks), S]: samples of each source inside each block (vectorised _block_sources)."""
        out = np.empty((len(blocks), len(self.streams)), dtype=np.int64)
        slots = np.arange(BLOCK)
        for start in range(0, len(blocks), 256):
            part = blocks[start:start + 256]
            offsets = np.array([self._block_offset(int(b)) for b in part])
            positions = (slots[None, :] + offsets[:, None]) / BLOCK
            src = np.searchsorted(self._cum, positions, side="right").clip(max=len(self.streams) - 1)
            flat = src + len(self.streams) * np.arange(len(part))[:, None]
            out[start:start + len(part)] = np.bincount(flat.ravel(), minlength=len(part) * len(self.streams)).reshape(
                len(part), len(self.streams))
        return out

    def locate(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each sample index: (source, k = how many earlier samples chose that source, chunk id)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and idx.min() < 0:
            raise IndexError(f"sample indices must be non-negative, got {int(idx.min())}")
        blocks, slots = idx // BLOCK, idx % BLOCK
        source = np.empty(idx.size, dtype=np.int64)
        k = np.empty(idx.size, dtype=np.int64)
        if idx.size:
            before = self._samples_before(blocks)
            for n, (b, p) in enumerate(zip(blocks.tolist(), slots.tolist())):
                src, ranks = self._block_layout(b)
                source[n] = src[p]
                k[n] = before[n, src[p]] + ranks[p]
        chunk = np.empty(idx.size, dtype=np.int64)
        for n, (s, kk) in enumerate(zip(source.tolist(), k.tolist())):
            epoch, pos = divmod(kk, self.num_chunks[s])
            chunk[n] = self._epoch_order(s, epoch)[pos]
        return source, k, chunk

    def _epoch_order(self, source: int, epoch: int) -> np.ndarray:
        n = self.num_chunks[source]
        return self._epochs.get((source, epoch), lambda: _rng(self.seed, _DOMAIN_EPOCH, source, epoch).permutation(n))

    # ------------------------------------------------------------------------------- access
    def get_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """int64 [len(indices), seq_len + 1]: the samples at these indices."""
        source, _, chunk = self.locate(indices)
        out = np.empty((len(source), self.seq_len + 1), dtype=np.int64)
        for n, (s, c) in enumerate(zip(source.tolist(), chunk.tolist())):
            start = c * self.seq_len
            out[n] = self.streams[s][start:start + self.seq_len + 1]
        return out

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get_batch([int(index)])[0]

"""A process-wide store of prefilled prompt prefixes (the KV of a declared shared prefix).

A request may declare the part of its prompt that many requests share
(``GenRequest.shared_prefix``: the judge's heuristic menu and instruction). The hf back-end
prefills that part once, keeps its keys and values here, and starts every later batch whose
requests declare the same prefix from them: across batches, across ``generate`` calls, and across
back-ends loaded from the same weights in one process (an experiment runs every arm's analyze
stage in one process, each loading the judge anew).

The key is (weights fingerprint, KV dtype, device, prefix tokens). The fingerprint hashes every
parameter's name, shape, dtype and a strided sample of its values (:func:`weights_fingerprint`):
two models that differ in any trained matrix get different keys. The split point is the
declared prefix, not whatever a batch happens to share, and a stored prefix is the tensor the
same one-row forward computes, so a request's answer does not depend on whether its prefix came
from the store, nor (beyond the floating-point effects of padding and batch shape that every
batched path has) on which requests share its batch (tested on the tiny model in float32: the
same greedy answers alone, in batches, chunked, and from the store).

Memory is bounded: least recently used prefixes are evicted beyond ``max_bytes`` (default 1 GiB;
the 64-entry judge menu of SmolLM2-135M in float32 is about 70 MB).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import torch

SAMPLE_VALUES = 256  # values hashed per parameter (strided over the whole tensor)
DEFAULT_MAX_BYTES = 1 << 30

PrefixLayers = list[
    tuple[torch.Tensor, torch.Tensor]
]  # per layer: keys^T [1, kv, dim, P], values [1, kv, P, dim]


def weights_fingerprint(model: Any) -> str:
    """A hash of every parameter's name, shape, dtype and ``SAMPLE_VALUES`` of its values, taken at
    an even stride over the whole tensor (cheap: a few hundred KB hashed for any model size)."""
    digest = hashlib.sha1()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            stride = max(1, flat.numel() // SAMPLE_VALUES)
            sample = flat[::stride][:SAMPLE_VALUES].float().cpu().contiguous()
            digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:20]


class PrefixStore:
    """Prefix KV by key, least recently used evicted beyond ``max_bytes``; thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[Any, ...], tuple[PrefixLayers, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[Any, ...]) -> PrefixLayers | None:
        """The stored layers of ``key`` (counted as a hit), or None (a miss)."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: tuple[Any, ...], layers: PrefixLayers) -> None:
        """Keep ``layers`` under ``key``; a prefix larger than the whole budget is not kept."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            self._items[key] = (layers, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted

    def clear(self) -> None:
        """Forget every prefix and reset the counters."""
        with self._lock:
            self._items.clear()
            self._bytes = 0
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        """Bytes held."""
        return self._bytes


PREFIX_STORE = PrefixStore()

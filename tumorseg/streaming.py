"""Bounded, ordered streaming helpers shared by the case reader, evaluate and predict."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_END = object()


def prefetch(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """``map(fn, items)`` in order, computed by ``workers`` threads up to ``ahead`` items in advance.

    Decoding (Pillow, zlib, nibabel) releases the GIL, so threads overlap it with the network.
    ``workers=0`` runs ``fn`` inline. At most ``ahead`` results are held, whatever the input size.
    """
    if workers <= 0:
        for item in items:
            yield fn(item)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tumorseg-decode")
    pending: deque[Future[R]] = deque()
    source = iter(items)
    try:
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max(ahead, 1):
                break
        while pending:
            fut = pending.popleft()
            nxt = next(source, _END)
            if nxt is not _END:
                pending.append(pool.submit(fn, nxt))  # type: ignore[arg-type]
            yield fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch

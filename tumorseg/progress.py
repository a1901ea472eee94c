"""Progress reporting: a rich bar on a terminal, sparse log lines otherwise (cron jobs)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("tumorseg")


def is_interactive() -> bool:
    """True when stderr is a terminal."""
    return sys.stderr.isatty()


def track(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    """Iterate with a progress bar on a terminal, or a log line every ~10 s otherwise."""
    if is_interactive():
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    last = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last > 10:
            log.info("%s: %d/%s", description, i, total if total is not None else "?")
            last = now

"""Run an iterator ahead in a background thread, so reading (and pinning) the next batch overlaps this one's compute."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

_DONE = object()

#: The name of every helper thread (tests look for leftovers by it).
THREAD_NAME = "robustft-prefetch"


def prefetched(items: Iterable[T], depth: int = 2, prepare: Callable[[T], T] | None = None) -> Iterator[T]:
    """Yield ``items`` (each passed through ``prepare``) in order, produced up to ``depth`` ahead by a helper thread.

    The helper thread owns the source iterator: it opens, reads and closes it (an ``iter_pixel_batches`` generator
    closes its HDF5 file there). An exception raised while producing an item is raised here, in its place. A
    consumer that stops early (``break``, an error, ``close()``) stops the helper after at most the item it is
    producing, and returns only once the source is closed. ``depth`` 0: no thread, the items are produced inline.
    """
    if depth <= 0:
        for item in items:
            yield prepare(item) if prepare else item
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple[object, object]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not offer((prepare(item) if prepare else item, None)):
                    return
            offer((_DONE, None))
        except BaseException as exc:  # handed to the consumer, raised there
            offer((_DONE, exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    helper = threading.Thread(target=produce, name=THREAD_NAME, daemon=True)
    helper.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        helper.join()

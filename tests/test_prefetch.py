"""The reader thread behind feature extraction: same items in order, produced ahead, errors and early exits."""

from __future__ import annotations

import threading

import pytest

from robustft.io.prefetch import THREAD_NAME, prefetched


def _helpers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def _source(n: int, produced: list[int], closed: threading.Event | None = None, fail_at: int | None = None):
    try:
        for i in range(n):
            if i == fail_at:
                raise OSError(f"cache.h5: unreadable chunk {i}")
            produced.append(i)
            yield i
    finally:
        if closed is not None:
            closed.set()


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_yields_every_prepared_item_in_order(depth):
    produced: list[int] = []
    assert list(prefetched(_source(10, produced), depth, prepare=lambda i: i * i)) == [i * i for i in range(10)]
    assert produced == list(range(10))
    assert not _helpers()


def test_prefetched_produces_ahead_of_the_consumer_but_at_most_depth_items_ahead():
    produced: list[int] = []
    depth = 2
    items = prefetched(_source(50, produced), depth)
    assert next(items) == 0
    # While the consumer holds item 0, the helper reads on until the queue of `depth` items is full (one more item
    # may be produced and wait to be queued).
    for _ in range(200):
        if len(produced) >= 1 + depth:
            break
        threading.Event().wait(0.01)
    assert len(produced) >= 1 + depth
    threading.Event().wait(0.1)
    assert len(produced) <= 1 + depth + 1
    items.close()
    assert not _helpers()


def test_an_error_while_reading_is_raised_in_its_place():
    produced: list[int] = []
    seen = []
    with pytest.raises(OSError, match="unreadable chunk 3"):
        for item in prefetched(_source(10, produced, fail_at=3), depth=2):
            seen.append(item)
    assert seen == [0, 1, 2]
    assert not _helpers()


def test_an_error_in_prepare_is_raised_in_its_place():
    def prepare(i: int) -> int:
        if i == 2:
            raise ValueError("cannot pin batch 2")
        return i

    with pytest.raises(ValueError, match="cannot pin batch 2"):
        list(prefetched(_source(5, []), depth=2, prepare=prepare))
    assert not _helpers()


def test_stopping_early_closes_the_source_in_the_helper_and_ends_the_helper():
    closed = threading.Event()
    produced: list[int] = []
    for item in prefetched(_source(1000, produced, closed), depth=2):
        if item == 1:
            break
    assert closed.is_set()  # the source generator's finally ran (an HDF5 reader closes its file there)
    assert not _helpers()
    assert len(produced) <= 2 + 2 + 1


def test_on_cuda_the_helper_thread_pins_the_pixels_of_each_batch(monkeypatch):
    """pinned_batches pins each batch's pixels (not its labels) in the helper thread, ahead of the consumer."""
    import torch

    from robustft.features import pinned_batches

    pinned_by: list[tuple[str, int]] = []

    def fake_pin(self):  # no CUDA here: record who pinned what, return a copy as pin_memory does
        pinned_by.append((threading.current_thread().name, int(self.shape[0])))
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batches = [(torch.zeros(n, 2, 2, 3, dtype=torch.uint8), torch.arange(n), torch.arange(n)) for n in (4, 4, 2)]
    out = list(pinned_batches(iter(batches), torch.device("cuda"), depth=2))
    assert [b[0].shape[0] for b in out] == [4, 4, 2]
    assert pinned_by == [(THREAD_NAME, 4), (THREAD_NAME, 4), (THREAD_NAME, 2)]
    assert all(o[1] is b[1] for o, b in zip(out, batches))  # labels and row ids pass through untouched
    pinned_by.clear()
    assert list(pinned_batches(iter(batches), torch.device("cpu"), depth=2))[0][0] is batches[0][0]
    assert pinned_by == []

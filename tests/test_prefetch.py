"""Background prefetching keeps the order, builds ahead, re-raises errors and stops when closed."""

import threading
import time

import pytest

from vdvae_sr_jax.prefetch import prefetch


def test_items_arrive_in_order_and_end():
    assert list(prefetch(iter(range(7)), size=2)) == list(range(7))


def test_items_are_built_ahead_up_to_the_buffer_size():
    built = []

    def items():
        for k in range(100):
            built.append(k)
            yield k

    batches = prefetch(items(), size=2)
    assert next(batches) == 0
    deadline = time.time() + 10
    while len(built) < 4 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(built) == 4  # item 0 taken, items 1 and 2 waiting in the buffer, item 3 waiting for room
    batches.close()


def test_an_error_in_the_producer_is_raised_in_the_consumer():
    def items():
        yield 1
        raise ValueError("bad image")

    batches = prefetch(items())
    assert next(batches) == 1
    with pytest.raises(ValueError, match="bad image"):
        next(batches)


def test_closing_stops_the_producer_thread():
    before = threading.active_count()
    batches = prefetch(iter(range(10**9)), size=2)
    next(batches)
    batches.close()
    deadline = time.time() + 10
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before

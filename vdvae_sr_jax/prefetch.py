"""Background prefetching: the next items of an iterator are built while the caller works on the current one."""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")
_END = object()


def _produce(items: Iterator, buffer: queue.Queue, closed: threading.Event) -> None:
    """Puts each item (then the end marker, or the error raised) into `buffer` until `closed` is set."""
    try:
        for item in items:
            if not _put(buffer, (item, None), closed):
                return
        _put(buffer, (_END, None), closed)
    except Exception as error:  # re-raised in the consumer's thread
        _put(buffer, (_END, error), closed)


def _put(buffer: queue.Queue, entry, closed: threading.Event) -> bool:
    """Waits for room in `buffer` for `entry`; False if the consumer closed first."""
    while not closed.is_set():
        try:
            buffer.put(entry, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def prefetch(items: Iterator[T], size: int = 2) -> Iterator[T]:
    """`items` in order, with up to `size` of them built ahead by a background thread; its errors re-raise here.
    Closing the iterator waits for the item being built."""
    buffer: queue.Queue = queue.Queue(maxsize=size)
    closed = threading.Event()
    producer = threading.Thread(target=_produce, args=(items, buffer, closed), daemon=True)
    producer.start()
    try:
        while True:
            item, error = buffer.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        closed.set()
        producer.join()  # a thread killed inside XLA at interpreter exit aborts the process

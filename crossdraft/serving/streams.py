"""Streaming handlers whose work runs in a worker thread (`decoupled`).

Never: knows what the items are.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable

_END = object()


def decoupled(produce: Callable[[threading.Event], Iterable], maxsize: int = 64, name: str = "producer"):
    """Yield what `produce(stop)` yields, computed in a worker thread.

    A synchronous gRPC streaming handler blocks in each `yield` until the message has been handed to
    the transport, which takes one or more thread hand-offs (0.5-3 ms on a busy 2-core machine). With
    the round loop in a worker thread, that wait overlaps the next round instead of delaying it: the
    verifier is back waiting for the next proposal as soon as a verdict is computed, the drafter back
    drafting as soon as a delta is queued. The queue is bounded (`maxsize`): a consumer that does not
    read makes the producer wait in `put`, not grow memory. An exception in the producer is raised
    here, in the handler's thread, so the error interceptor maps it to a status. When the consumer
    stops early (the client went away, the handler is closed), `stop` is set; the producer should
    check it between rounds, and its blocked `put` gives up."""
    q: "queue.Queue" = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in produce(stop):
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer's thread
            put((_END, e))

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item, err = q.get()
            if item is _END:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        worker.join(timeout=30.0)

"""Embeddings off the event loop, micro-batched across concurrent requests.

An embedding is CPU work (MiniLM: milliseconds per text) that would stall every other
request if it ran on the event loop. :class:`EmbedBatcher` runs the embedder on one worker
thread. Requests queue their text and await a future; the worker takes the first waiting
text, gathers more until it holds ``max_batch`` texts or ``max_wait_s`` has passed since
that first one, embeds them in one call, and resolves each future on its own loop. Under
load a batch fills at once (one ONNX run for up to 32 texts); alone, a request waits at
most ``max_wait_s``. ``enabled=False`` embeds each text on its own (the baseline).

One worker thread also means the embedder is never called concurrently, so it needs no
locking of its own. The embedder must be deterministic row by row (the
:class:`~intercascade_core.core.protocols.Embedder` contract): a text's row does not depend
on its batch neighbours, so batching changes no decision.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.protocols import Embedder
from ..errors import InvalidArgumentError, ServiceClosedError

__all__ = ["BatchStats", "EmbedBatcher"]


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Totals since start: texts embedded, embedder calls and seconds inside them."""

    texts: int
    batches: int
    seconds: float


@dataclass(slots=True, eq=False)
class _Item:
    text: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[npt.NDArray[np.float32]]


class EmbedBatcher:
    """Embed texts on a worker thread in micro-batches (module docstring)."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        enabled: bool = True,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidArgumentError("max_batch", f"must be an int >= 1, got {max_batch!r}")
        if (
            isinstance(max_wait_s, bool)
            or not isinstance(max_wait_s, int | float)
            or not 0.0 <= max_wait_s <= 1.0
        ):
            raise InvalidArgumentError("max_wait_s", f"must be in [0, 1] seconds, got {max_wait_s!r}")
        self.embedder = embedder
        self.max_batch = max_batch if enabled else 1
        self.max_wait_s = float(max_wait_s) if enabled else 0.0
        self.enabled = enabled
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._texts = 0
        self._batches = 0
        self._seconds = 0.0
        self._thread = threading.Thread(target=self._work, name="embed-batcher", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> BatchStats:
        with self._lock:
            return BatchStats(self._texts, self._batches, self._seconds)

    async def embed(self, text: str) -> npt.NDArray[np.float32]:
        """The unit row of ``text`` (shape ``(dim,)``), computed on the worker thread."""
        if not isinstance(text, str):
            raise InvalidArgumentError("text", f"expected str, got {type(text).__name__}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[npt.NDArray[np.float32]] = loop.create_future()
        with self._lock:
            if self._closed:
                raise ServiceClosedError("the embedding batcher is closed")
            self._queue.put(_Item(text, loop, future))
        return await future

    def close(self, timeout: float = 30.0) -> None:
        """Embed what is queued, then stop the worker (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)

    # -- the worker ------------------------------------------------------------------------
    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            until = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                left = until - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True  # finish this batch, then stop
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        live = [it for it in batch if not it.future.cancelled()]
        if not live:
            return
        t0 = time.perf_counter()
        try:
            rows = np.asarray(self.embedder.embed([it.text for it in live]), dtype=np.float32)
            if rows.shape[0] != len(live):
                raise InvalidArgumentError(
                    "embedder", f"returned {rows.shape[0]} rows for {len(live)} texts"
                )
        except BaseException as exc:  # handed to each waiting request, never lost here
            for it in live:
                _post(it, _fail, exc)
            return
        finally:
            elapsed = time.perf_counter() - t0
            with self._lock:
                self._batches += 1
                self._texts += len(live)
                self._seconds += elapsed
        for it, row in zip(live, rows, strict=True):
            _post(it, _resolve, row)


def _post(item: _Item, fn: Callable[[asyncio.Future[Any], Any], None], value: object) -> None:
    """Run ``fn(future, value)`` on the item's loop; a loop already closed has nobody
    left waiting."""
    try:
        item.loop.call_soon_threadsafe(fn, item.future, value)
    except RuntimeError:
        pass


def _resolve(future: asyncio.Future[Any], row: object) -> None:
    if not future.done():
        future.set_result(row)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)

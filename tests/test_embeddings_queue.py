"""Embedding requests queue with a bound, and a caller that leaves or runs out of time is dropped from its batch."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError

from backends.batching import MicroBatcher
from backends.embeddings import SentenceTransformerSettings
from backends.errors import DeadlineExceeded, Overloaded

MODEL = {"type": "sentence_transformers", "model": {"path": "/models/minilm"}}


class Work:
    """A batched function that records each batch and holds the first until released (a slow forward pass)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, texts: list[str]) -> list[int]:
        self.batches.append(list(texts))
        self.started.set()
        self.release.wait(timeout=10)
        return [len(text) for text in texts]


@pytest.fixture()
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=True)


async def until_started(work: Work) -> None:
    assert await asyncio.to_thread(work.started.wait, 5)


def test_a_full_queue_refuses_at_once_with_retry_after(executor: ThreadPoolExecutor) -> None:
    work = Work()
    batcher: MicroBatcher[str, int] = MicroBatcher(work, executor, window_s=0.0, max_batch=2, max_queue=3)

    async def main() -> None:
        running = asyncio.ensure_future(batcher.submit(["a", "b"]))  # the batch being encoded
        await until_started(work)
        queued = asyncio.ensure_future(batcher.submit(["c", "d", "e"]))  # fills the queue
        await asyncio.sleep(0)
        assert batcher.queued == 3
        with pytest.raises(Overloaded) as caught:
            await batcher.submit(["f"])
        assert caught.value.status == 503
        assert caught.value.headers() == {"retry-after": "1"}
        work.release.set()
        assert await running == [1, 1]
        assert await queued == [1, 1, 1]

    asyncio.run(main())
    assert work.batches == [["a", "b"], ["c", "d", "e"]]  # f was never queued


def test_a_cancelled_waiter_is_dropped_from_the_batch(executor: ThreadPoolExecutor) -> None:
    work = Work()
    batcher: MicroBatcher[str, int] = MicroBatcher(work, executor, window_s=0.0, max_batch=8, max_queue=100)

    async def main() -> None:
        first = asyncio.ensure_future(batcher.submit(["first"]))
        await until_started(work)
        gone = asyncio.ensure_future(batcher.submit(["gone", "away"]))
        kept = asyncio.ensure_future(batcher.submit(["kept"]))
        await asyncio.sleep(0)
        gone.cancel()  # the client disconnected while its texts waited
        await asyncio.sleep(0)
        assert batcher.queued == 1
        work.release.set()
        assert await first == [5]
        assert await kept == [4]
        assert gone.cancelled()

    asyncio.run(main())
    assert work.batches == [["first"], ["kept"]]


def test_a_deadline_ends_the_wait_and_drops_the_texts(executor: ThreadPoolExecutor) -> None:
    work = Work()
    batcher: MicroBatcher[str, int] = MicroBatcher(work, executor, window_s=0.0, max_batch=8, max_queue=100)

    async def main() -> None:
        first = asyncio.ensure_future(batcher.submit(["first"]))
        await until_started(work)
        loop = asyncio.get_running_loop()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(["late"], deadline=loop.time() + 0.05)
        assert batcher.queued == 0
        work.release.set()
        await first

    asyncio.run(main())
    assert work.batches == [["first"]]


def test_callers_arriving_together_still_share_one_call(executor: ThreadPoolExecutor) -> None:
    work = Work()
    work.release.set()
    batcher: MicroBatcher[str, int] = MicroBatcher(work, executor, window_s=0.01, max_batch=64, max_queue=100)

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(batcher.submit([str(index)]) for index in range(5))))

    assert asyncio.run(main()) == [[1]] * 5
    assert batcher.calls == 1


def test_settings_bound_the_queue_and_the_wait() -> None:
    settings = SentenceTransformerSettings.model_validate(MODEL)
    assert (settings.max_queue, settings.timeout_s) == (8192, 30.0)
    with pytest.raises(ValidationError) as caught:
        SentenceTransformerSettings.model_validate({**MODEL, "max_inputs": 100, "max_queue": 50})
    assert "max_queue (50) must be at least max_inputs (100)" in str(caught.value)

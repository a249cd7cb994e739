"""The online difficulty learner stays bounded: a window per tier, one refit at a time, failures logged."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from router.learned import DifficultyLearner

DIMS = 16
EASY, HARD = np.eye(DIMS)[0], np.eye(DIMS)[1]


def near(centre: np.ndarray[Any, Any], rng: np.random.Generator) -> np.ndarray[Any, Any]:
    vector = centre + rng.normal(0, 0.05, DIMS)
    return np.asarray(vector / np.linalg.norm(vector), dtype=np.float32)


class CountingPool(ThreadPoolExecutor):
    """The loop's thread pool, counting the jobs it is given and how many ran at once."""

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.lock = threading.Lock()
        self.submitted = self.running = self.most_at_once = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def counted() -> Any:
            with self.lock:
                self.running += 1
                self.most_at_once = max(self.most_at_once, self.running)
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.running -= 1

        with self.lock:
            self.submitted += 1
        return super().submit(counted)


async def settle(pool: CountingPool) -> None:
    """Until the pool has been idle for two loop turns 10 ms apart (a finished refit may start another)."""
    idle_turns = 0
    while idle_turns < 2:
        before = pool.submitted
        await asyncio.sleep(0.01)
        idle_turns = idle_turns + 1 if pool.running == 0 and pool.submitted == before else 0


def make(**overrides: Any) -> DifficultyLearner:
    settings: dict[str, Any] = {
        "k": 5,
        "threshold": 0.5,
        "max_top_tier_share": None,
        "min_examples": 4,
        "refit_every": 10,
        **overrides,
    }
    return DifficultyLearner(**settings)


def record_both(learner: DifficultyLearner, count: int, rng: np.random.Generator) -> None:
    """`count` outcomes of tier 'small': it fails what is near HARD and passes what is near EASY."""
    for index in range(count):
        hard = index % 2 == 0
        learner.record("small", near(HARD if hard else EASY, rng), failed=hard)


def test_the_default_window_keeps_the_latest_2048_outcomes_of_a_tier() -> None:
    rng = np.random.default_rng(0)
    learner = make(refit_every=10**9)

    async def scenario() -> None:
        learner.seed("small", np.stack([near(HARD, rng), near(EASY, rng)] * 5), [True, False] * 5)
        record_both(learner, 3000, rng)  # refit_every is never reached: nothing runs off the loop

    asyncio.run(scenario())
    status = learner.status()["small"]
    assert status["examples"] == 2048
    assert status["seen"] == 3010


def test_predict_scans_at_most_the_window_however_long_the_tier_has_run() -> None:
    rng = np.random.default_rng(1)
    learner = make(window=64, refit_every=10)

    async def scenario() -> None:
        for _ in range(20):
            record_both(learner, 50, rng)
            await learner.drain()

    asyncio.run(scenario())
    status = learner.status()["small"]
    assert (status["examples"], status["fitted_on"], status["seen"]) == (64, 64, 1000)
    assert learner.predict("small", near(HARD, rng)) == 1.0


def test_a_window_forgets_what_the_tier_used_to_fail() -> None:
    """The tier got better (a new model behind the name): after a window of passes, it is no longer skipped."""
    rng = np.random.default_rng(2)
    learner = make(window=64, refit_every=1)

    async def scenario() -> None:
        record_both(learner, 64, rng)
        await learner.drain()
        assert learner.skip("small", learner.predict("small", near(HARD, rng)))
        for _ in range(64):
            learner.record("small", near(HARD, rng), failed=False)
        await learner.drain()

    asyncio.run(scenario())
    assert not learner.skip("small", learner.predict("small", near(HARD, rng)))


def test_one_refit_at_a_time_and_the_last_one_sees_every_outcome() -> None:
    """300 outcomes arrive while the first refit runs: they make one more refit, not 296 overlapping ones."""
    rng = np.random.default_rng(3)
    learner = make(refit_every=1)
    pool = CountingPool()

    async def scenario() -> None:
        asyncio.get_running_loop().set_default_executor(pool)
        record_both(learner, 300, rng)  # no await in between: the first refit is still in flight
        await settle(pool)

    asyncio.run(scenario())
    assert (pool.submitted, pool.most_at_once) == (2, 1)
    status = learner.status()["small"]
    assert (status["fitted_on"], status["refitting"], status["refits"]) == (300, False, 2)


def test_an_older_refit_never_replaces_a_newer_fit() -> None:
    """A refit started on old outcomes finishes after `seed` fitted newer ones: the newer fit stays."""
    rng = np.random.default_rng(4)
    learner = make(refit_every=1)

    async def scenario() -> None:
        record_both(learner, 4, rng)  # the 4th outcome starts a refit on these 4 (HARD: 2 of 2 failed)
        assert learner.status()["small"]["refitting"] is True
        learner.seed("small", np.stack([near(HARD, rng) for _ in range(200)]), [False] * 199 + [True])
        await learner.drain()

    asyncio.run(scenario())
    assert learner.status()["small"]["fitted_on"] == 204
    score = learner.predict("small", near(HARD, rng))
    assert score is not None and score < 0.3


def test_a_failed_refit_is_logged_with_its_tier(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(5)
    learner = make(k=3, refit_every=1)
    pool = CountingPool()

    async def scenario() -> None:
        asyncio.get_running_loop().set_default_executor(pool)
        record_both(learner, 8, rng)
        await settle(pool)
        learner.record("small", np.ones(DIMS + 1, dtype=np.float32), failed=True)  # a vector of another width
        await settle(pool)
        assert learner.predict("small", near(HARD, rng)) == 1.0  # the last good fit still answers

    with caplog.at_level(logging.ERROR, logger="router.learned"):
        asyncio.run(scenario())
    failures = [record for record in caplog.records if record.name == "router.learned"]
    assert len(failures) == 1 and "'small'" in failures[0].getMessage()
    assert failures[0].exc_info is not None and failures[0].exc_info[0] is ValueError


def test_learning_goes_on_after_a_failed_refit(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(6)
    learner = make(k=3, window=8, refit_every=1)

    async def scenario() -> None:
        record_both(learner, 8, rng)
        await learner.drain()
        learner.record("small", np.ones(DIMS + 1, dtype=np.float32), failed=True)
        await learner.drain()
        record_both(learner, 8, rng)  # the odd vector leaves the window
        await learner.drain()

    with caplog.at_level(logging.CRITICAL, logger="router.learned"):  # the failures are the test above's
        asyncio.run(scenario())
    status = learner.status()["small"]
    assert (status["fitted_on"], status["refitting"]) == (8, False)
    assert learner.predict("small", near(EASY, rng)) == 0.0

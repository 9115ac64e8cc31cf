"""orchestrator.deploy.batcher.ModelBatcher, without Ray: who waits, what is combined, what fails."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from orchestrator.deploy.batcher import ModelBatcher


def make(max_rows: int = 4, delay_ms: float = 1000.0, fail: bool = False):
    calls: list[list] = []

    def run(items: list) -> list:
        calls.append(list(items))
        if fail:
            raise RuntimeError("the model broke")
        return [("answer", item) for item in items]

    return ModelBatcher(run, max_rows, delay_ms, on_a_thread()), calls


def on_a_thread():
    """Where a replica runs models: here, one thread of its own."""
    pool = ThreadPoolExecutor(1)

    async def call(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    return call


async def request(batcher: ModelBatcher, item, rows: int = 1, reading_s: float = 0.0):
    with batcher.arriving():
        await asyncio.sleep(reading_s)  # the body being read
        return await batcher.submit(item, rows)


def test_a_lone_request_does_not_wait_for_the_queue_delay():
    async def main():
        batcher, calls = make(delay_ms=60_000)  # a delay no test could sit out
        answer = await asyncio.wait_for(request(batcher, "a"), 30)
        return answer, calls

    answer, calls = asyncio.run(main())
    assert answer == ("answer", "a") and calls == [["a"]]


def test_requests_arriving_together_are_combined_up_to_the_largest_tuned_size():
    async def main():
        batcher, calls = make(max_rows=4)
        answers = await asyncio.gather(*(request(batcher, i, reading_s=0.01 * (i % 2)) for i in range(6)))
        return answers, calls, batcher

    answers, calls, batcher = asyncio.run(main())
    assert answers == [("answer", i) for i in range(6)]
    assert sorted(x for call in calls for x in call) == list(range(6))
    assert all(len(call) <= 4 for call in calls) and len(calls) < 6
    assert (batcher.batches, batcher.rows) == (len(calls), 6)


def test_a_request_larger_than_the_largest_size_runs_alone():
    async def main():
        batcher, calls = make(max_rows=4)
        await asyncio.gather(request(batcher, "big", rows=9), request(batcher, "small", rows=1))
        return calls

    calls = asyncio.run(main())
    assert ["big"] in calls and all(len(c) == 1 for c in calls)


def test_a_failed_batch_fails_each_of_its_requests_and_the_queue_goes_on():
    async def main():
        batcher, _ = make(fail=True)
        results = await asyncio.gather(request(batcher, 1), request(batcher, 2), return_exceptions=True)
        batcher.run = lambda items: [("answer", i) for i in items]
        return results, await request(batcher, 3)

    results, later = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "the model broke" in str(r) for r in results)
    assert later == ("answer", 3)


def test_answers_that_are_exceptions_go_to_their_own_request_only():
    async def main():
        batcher = ModelBatcher(lambda items: [ValueError(f"bad {i}") if i == 2 else i for i in items], 4, 50,
                               on_a_thread())
        return await asyncio.gather(*(request(batcher, i) for i in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert results[0] == 0 and results[1] == 1 and isinstance(results[2], ValueError)


@pytest.mark.parametrize("rows, delay", [(0, 1.0), (4, -5.0)])
def test_settings_are_kept_sane(rows, delay):
    batcher, _ = make(max_rows=rows, delay_ms=delay)
    assert batcher.max_rows >= 1 and batcher.delay_s >= 0


def test_the_runner_runs_a_lone_request_on_the_loop_and_others_on_its_one_thread():
    import threading

    from orchestrator.deploy.runner import BatchingSettings, Runner

    runner = Runner({}, "cpu", BatchingSettings(), threads=1)
    where: list[str] = []

    def work(i):
        where.append(threading.current_thread().name)
        return i

    async def main():
        with runner.arriving("m", "v1"):  # a version: no batcher, just the count
            alone = await runner.call(work, 0)
        with runner.arriving("m", "v1"), runner.arriving("m", "v1"):  # two requests on the replica
            together = await asyncio.gather(runner.call(work, 1), runner.call(work, 2))
        return alone, together

    alone, together = asyncio.run(main())
    assert alone == 0 and together == [1, 2]
    assert where[0] == "MainThread" and all(name.startswith("aitune-infer") for name in where[1:])

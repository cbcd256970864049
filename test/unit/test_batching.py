"""Batcher: items submitted together travel together, each caller gets its own outcome."""

from __future__ import annotations

import asyncio

import pytest

from async_component.dataplane.batching import Batcher, GroupedBatcher


class Recorder:
    """A send function that records its batches and answers item * 10 (or the item when it is an exception)."""

    def __init__(self, fail: BaseException | None = None, delay: float = 0.0) -> None:
        self.batches: list[list] = []
        self.fail = fail
        self.delay = delay

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return [item if isinstance(item, Exception) else item * 10 for item in items]


async def test_items_submitted_in_one_pass_go_in_one_batch_with_their_own_results():
    send = Recorder()
    batcher = Batcher(send)
    results = await asyncio.gather(*(batcher.submit(n) for n in range(50)))
    assert results == [n * 10 for n in range(50)]
    assert send.batches == [list(range(50))]


async def test_items_submitted_while_a_batch_is_in_flight_form_the_next_one():
    send = Recorder(delay=0.01)
    batcher = Batcher(send)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.001)  # the first batch is in flight
    rest = await asyncio.gather(*(batcher.submit(n) for n in range(1, 20)))
    assert await first == 0 and rest == [n * 10 for n in range(1, 20)]
    assert send.batches == [[0], list(range(1, 20))]


async def test_max_batch_splits_a_burst():
    send = Recorder()
    batcher = Batcher(send, max_batch=10)
    await asyncio.gather(*(batcher.submit(n) for n in range(25)))
    assert [len(b) for b in send.batches] == [10, 10, 5]


async def test_max_bytes_splits_a_burst_of_large_items_and_a_larger_one_goes_alone():
    send = Recorder()
    batcher = Batcher(send, max_bytes=100)
    await asyncio.gather(*(batcher.submit(n, n) for n in (40, 40, 40, 250, 10, 60, 30, 5)))
    assert send.batches == [[40, 40], [40], [250], [10, 60, 30], [5]]
    await asyncio.gather(*(batcher.submit(n, n) for n in (50, 50)))  # what was counted went with its batches
    assert send.batches[-1] == [50, 50]


async def test_an_item_error_fails_only_its_caller():
    batcher = Batcher(Recorder())
    results = await asyncio.gather(batcher.submit(1), batcher.submit(KeyError("x")), batcher.submit(3),
                                   return_exceptions=True)
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], KeyError)


async def test_a_batch_error_fails_every_caller_with_its_own_exception_then_the_next_batch_works():
    send = Recorder(fail=ConnectionError("refused"))
    batcher = Batcher(send)
    results = await asyncio.gather(*(batcher.submit(n) for n in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) and "refused" in str(r) for r in results)
    assert len({id(r) for r in results}) == 3
    send.fail = None
    assert await batcher.submit(4) == 40


async def test_a_wrong_number_of_results_fails_the_batch():
    async def short(items):
        return items[:-1]

    batcher = Batcher(short)
    with pytest.raises(RuntimeError, match="got 1 results"):
        await asyncio.gather(batcher.submit(1), batcher.submit(2))


async def test_a_caller_that_goes_away_does_not_disturb_the_others():
    send = Recorder(delay=0.01)
    batcher = Batcher(send)
    gone = asyncio.ensure_future(batcher.submit(1))
    stays = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.001)
    gone.cancel()
    assert await stays == 20
    await batcher.close()
    assert send.batches == [[1, 2]]


async def test_grouped_a_slow_groups_batch_holds_up_only_its_own_items():
    """On a cluster each master has its batches: one whose batch hangs never holds up the next batch of another."""
    release = asyncio.Event()
    batches = []

    async def send(items: list) -> list:
        batches.append(list(items))
        if any(item.startswith("hung") for item in items):
            await release.wait()
        return [item.upper() for item in items]

    batcher = GroupedBatcher(send, lambda item: item.split("-")[0] if "-" in item else None)
    stuck = batcher.submit("hung-1")
    await asyncio.sleep(0.01)  # its batch is out
    later = [batcher.submit("hung-2"), batcher.submit("alive-1"), batcher.submit("other")]
    assert await asyncio.wait_for(asyncio.gather(later[1], later[2]), 1) == ["ALIVE-1", "OTHER"]
    assert not stuck.done() and not later[0].done()  # the hung group's next batch waits behind its first
    release.set()
    assert [await stuck, await later[0]] == ["HUNG-1", "HUNG-2"]
    assert batches == [["hung-1"], ["alive-1"], ["other"], ["hung-2"]]
    await batcher.close()


async def test_grouped_without_groups_is_one_batcher():
    send = Recorder()
    batcher = GroupedBatcher(send, None)
    assert await asyncio.gather(*(batcher.submit(n) for n in range(5))) == [0, 10, 20, 30, 40]
    assert send.batches == [[0, 1, 2, 3, 4]]

"""The consumer's bound on event bytes held: first come, first served; one alone always; a cancelled waiter leaves."""

from __future__ import annotations

import asyncio

import pytest

from async_component.dataplane.bytebudget import ByteBudget


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_past_the_limit_takers_wait_and_are_admitted_in_arrival_order():
    budget = ByteBudget(100)
    assert await budget.take(60) is False
    order = []

    async def take(name: str, size: int) -> None:
        await budget.take(size)
        order.append(name)

    assert budget.must_wait(80) and not budget.must_wait(40)
    large = asyncio.create_task(take("large", 80))
    await _settle()
    assert budget.must_wait(10)  # it would fit, but the large one waits before it
    small = asyncio.create_task(take("small", 10))  # would fit now, but the large one came first
    await _settle()
    assert order == [] and budget.waiting == 2 and budget.held == 60
    budget.give(60)
    await _settle()
    assert order == ["large", "small"] and budget.held == 90 and budget.waiting == 0
    await asyncio.gather(large, small)


async def test_one_larger_than_the_limit_is_taken_alone():
    budget = ByteBudget(100)
    assert await budget.take(500) is False
    waiter = asyncio.create_task(budget.take(1))
    await _settle()
    assert not waiter.done()
    budget.give(500)
    assert await waiter is True and budget.held == 1


async def test_a_cancelled_waiter_lets_the_next_ones_in_and_holds_nothing():
    budget = ByteBudget(100)
    await budget.take(90)
    first = asyncio.create_task(budget.take(50))
    second = asyncio.create_task(budget.take(5))
    await _settle()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second is True and budget.held == 95 and budget.waiting == 0
    budget.give(90)
    budget.give(5)
    assert budget.held == 0

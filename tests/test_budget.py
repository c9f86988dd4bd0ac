"""The ingest byte budget shared by receivers and the batcher."""

import trio
import trio.testing

from service.pipeline.budget import ByteBudget


def test_try_acquire_takes_only_what_fits() -> None:
    """try_acquire takes bytes that fit and refuses the rest without changing anything; a
    request larger than the whole budget fits only when nothing else is held."""
    b = ByteBudget(100)
    assert b.try_acquire(60) is True
    assert b.try_acquire(50) is False
    assert b.used == 60
    assert b.try_acquire(40) is True
    assert b.used == 100
    b.release(100)
    assert b.try_acquire(500) is True
    assert b.used == 500


async def test_acquire_waits_for_release(autojump_clock: trio.testing.MockClock) -> None:
    """acquire waits until enough is released, and cancelling a waiter leaves the budget as is."""
    b = ByteBudget(100)
    b.try_acquire(80)
    got: list[float] = []

    async def waiter() -> None:
        await b.acquire(50)
        got.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        with trio.move_on_after(1.0):
            await b.acquire(90)  # cancelled while waiting: takes nothing
        assert b.used == 80
        await trio.sleep(1.0)
        b.release(30)
    assert got == [2.0]
    assert b.used == 100

"""``_confirmed_or_proven``: the first of the broker's confirm and the result's arrival."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiormq.exceptions import ChannelInvalidStateError, DeliveryError
from pamqp.commands import Basic

from aioqueue.brokers.amqp.broker import _confirmed_or_proven


class Proof(asyncio.Future[None]):
    """A future that counts the done callbacks still registered on it (public API only)."""

    def __init__(self) -> None:
        super().__init__()
        self.callbacks = 0

    def add_done_callback(self, fn: Any, *, context: Any = None) -> None:
        self.callbacks += 1
        super().add_done_callback(fn, context=context)

    def remove_done_callback(self, fn: Any) -> int:
        removed = super().remove_done_callback(fn)
        self.callbacks -= removed
        return removed

    @property
    def hanging(self) -> int:
        """Callbacks still registered (a done future has run and dropped them all)."""
        return 0 if self.done() else self.callbacks


def futures() -> tuple[asyncio.Future[Any], Proof]:
    return asyncio.get_running_loop().create_future(), Proof()


async def test_the_confirm_alone_is_enough() -> None:
    confirmation, proof = futures()
    waiting = asyncio.create_task(_confirmed_or_proven(confirmation, proof))
    await asyncio.sleep(0)
    confirmation.set_result("ack")
    await waiting
    assert proof.hanging == 0  # nothing left hanging on the proof


@pytest.mark.parametrize(("failure", "level"), [
    (DeliveryError(None, Basic.Nack(delivery_tag=1)), logging.WARNING),  # a nack: said
    (ChannelInvalidStateError("closed"), logging.DEBUG),  # app.close() first: routine
])
async def test_the_proof_alone_is_enough_and_the_confirm_is_let_go(
    failure: Exception, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    confirmation, proof = futures()
    waiting = asyncio.create_task(_confirmed_or_proven(confirmation, proof))
    await asyncio.sleep(0)
    proof.set_result(None)
    await waiting
    assert not confirmation.done()
    with caplog.at_level(logging.DEBUG, logger="aioqueue.brokers.amqp"):
        confirmation.set_exception(failure)  # retrieved and logged, not raised
        await asyncio.sleep(0)  # the done callbacks run in the next loop pass
    assert [r.levelno for r in caplog.records] == [level]


async def test_a_failed_confirm_that_is_there_counts() -> None:
    confirmation, proof = futures()
    confirmation.set_exception(RuntimeError("nack"))
    proof.set_result(None)
    with pytest.raises(RuntimeError, match="nack"):
        await _confirmed_or_proven(confirmation, proof)


async def test_cancelling_the_wait_cancels_the_confirm() -> None:
    confirmation, proof = futures()
    waiting = asyncio.create_task(_confirmed_or_proven(confirmation, proof))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert confirmation.cancelled()  # a message not written yet then stays out
    assert proof.hanging == 0

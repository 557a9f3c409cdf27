"""Send a suite's requests to the engine all at once, in order, with progress.

The engine bounds what is in flight (`engine.max_concurrency` for vLLM, the forward-pass batch
for hf), so a suite never waits at a barrier of its own: with several suites of a checkpoint
sharing the engine (issue 15), the server's batch stays full while one of them is busy
elsewhere. Requests are handed over in parts only so that progress can be reported as parts
finish; every part is submitted at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

R = TypeVar("R")
T = TypeVar("T")


async def in_flight(items: Sequence[R], send: Callable[[list[R]], Awaitable[list[T]]],
                    progress: Callable[[int, int], None] | None = None, part: int = 32) -> list[T]:
    """`send` applied to every part of `items` concurrently; the results in the order of `items`.
    One part failing cancels the others and raises its error."""
    total = len(items)
    done = 0

    async def one(chunk: list[R]) -> list[T]:
        nonlocal done
        out = await send(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, total)
        return out

    tasks = [asyncio.ensure_future(one(list(items[i : i + part]))) for i in range(0, total, part)]
    try:
        parts = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return [x for chunk in parts for x in chunk]

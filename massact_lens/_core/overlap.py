"""Statistics beside the forward pass: one worker thread on a spare CPU core.

A hook that computes statistics inside the forward pass adds their whole cost to
the wall time. When the model runs on the CPU with fewer torch threads than the
cores this process may use, :class:`Beside` runs them on one worker thread
instead, while the forward pass goes on to the next block (torch's kernels and
numpy's selection release the GIL, so the two use separate cores). At most
``depth`` calls are pending: a hook waits when the worker is behind, so memory
stays that of ``depth`` calls' arguments (for :func:`massact_lens.scan`, a group of
hidden states of at most ``GROUP_BYTES``), whatever the corpus. Calls run one at a
time, in the order submitted.

On a GPU nothing is gained by a thread: kernels are queued asynchronously already
and the statistics stay on the device until one transfer per batch. Set
``MASSACT_LENS_STATS_THREAD=0`` to compute every statistic inside its hook,
``=1`` to use the worker whenever the activation is on the CPU.

>>> beside = Beside(enabled=True)
>>> future = beside.submit(sum, [1, 2, 3])
>>> future.result(), beside.close()
(6, None)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

__all__ = ["Beside", "spare_core"]

T = TypeVar("T")


def spare_core(device: torch.device | None) -> bool:
    """True when statistics on ``device`` can run on a core the forward pass leaves free.

    ``MASSACT_LENS_STATS_THREAD`` = 0 / 1 overrides (1: whenever ``device`` is the CPU).
    """
    if device is not None and device.type != "cpu":
        return False
    setting = os.environ.get("MASSACT_LENS_STATS_THREAD")
    if setting in ("0", "1"):
        return setting == "1"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


class Beside:
    """Run calls on one worker thread, at most ``depth`` pending (or inline when not
    ``enabled``). :meth:`submit` returns a :class:`~concurrent.futures.Future` whose
    ``result()`` gives the call's result, raising what the call raised."""

    def __init__(self, enabled: bool, depth: int = 1) -> None:
        self.enabled = enabled
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="massact-stats") if enabled else None
        self._slots = threading.BoundedSemaphore(depth)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        if self._pool is None:
            done: Future[T] = Future()
            done.set_result(fn(*args))  # an error is raised here, inside the caller's hook
            return done
        self._slots.acquire()
        try:
            return self._pool.submit(self._run, fn, args)
        except BaseException:
            self._slots.release()
            raise

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            with torch.inference_mode():  # inference mode is per thread
                return fn(*args)
        finally:
            self._slots.release()

    def close(self) -> None:
        """Wait for the running call, drop the queued ones, stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

"""Worker processes that make samples in parallel for a command (the majority baseline of `vismmoe eval`, the
tokenizer corpus of training).

Interrupting is the parent's job: it stops the pool when it leaves `with fork_pool(n) as pool:`, interrupted or
not. Ctrl-C reaches a terminal's whole process group, so a worker that took it printed its own traceback before
the command's one line; a forked worker kept the command's SIGTERM handler, so stopping the pool (SIGTERM to each
worker) printed another. So a worker leaves its parent's process group (a signal to the group reaches the parent
alone: a worker killed by one could die holding the pool's queue lock, and the parent's clean-up would wait on that
lock for ever), ignores SIGINT, and dies quietly on SIGTERM. SIGINT and SIGTERM that come while the pool is being
built are acted on once it is built, so an interrupt never leaves workers that nothing stops. Knows nothing about
the samples.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

_STOPS = (signal.SIGINT, signal.SIGTERM)


def _worker_start(mask) -> None:
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)    # a SIGTERM that came while it started acts now


class _Held:
    """SIGINT and SIGTERM held until `release()`: blocked in this thread (and so in the processes and threads it
    starts meanwhile, which unblock them once set up), and only noted by Python's handlers in the main thread
    (another thread of the process may take the signal)."""

    def __init__(self):
        self.came: list[int] = []
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, lambda signum, frame: self.came.append(signum)) for s in _STOPS}

    def release(self) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        old, self.old = self.old, {}
        for s, handler in old.items():
            signal.signal(s, handler)
        came, self.came = self.came, []
        for s in dict.fromkeys(came):
            signal.raise_signal(s)              # its own handler now: KeyboardInterrupt, the command's SIGTERM


@contextlib.contextmanager
def fork_pool(processes: int):
    """`with fork_pool(n) as pool:` a multiprocessing pool of n forked workers that leave SIGINT and SIGTERM to
    the parent (see the module docstring); terminated on leaving the block, as `with Pool(n)` is."""
    import multiprocessing as mp
    pool = None
    held = _Held()
    try:
        pool = mp.get_context("fork").Pool(processes, initializer=_worker_start, initargs=(held.mask,))
        held.release()
        yield pool
    finally:
        held.release()
        if pool is not None:
            pool.terminate()

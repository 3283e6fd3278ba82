"""Give freed memory back to the system, now and then (glibc only).

Under load with request bodies, a worker's RSS grew by 40-50 % over its first minutes
and then stayed there (docs/reliability.rst, D4): not live Python objects (tracemalloc
stayed flat) but memory glibc keeps in its per-thread arenas after it was freed.
``malloc_trim(0)`` returns it; a worker calls it every ``interval`` seconds from a daemon
thread. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time


def trim_periodically(interval: float = 10.0) -> threading.Thread | None:
    """Start the trimming thread (after fork, in each worker); None where there is no glibc."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]

    def run() -> None:
        while True:  # for the life of the worker process (a daemon thread)
            time.sleep(interval)
            trim(0)
    thread = threading.Thread(target=run, name="kproxy-malloc-trim", daemon=True)
    thread.start()
    return thread

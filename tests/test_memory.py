"""Workers give freed memory back to the system (kproxy/memory.py; docs/reliability.rst D4;
the effect on RSS is measured by ``python bench/soak.py``)."""

import platform

import pytest

from kproxy.memory import trim_periodically


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trimming_runs_in_a_daemon_thread():
    thread = trim_periodically(60)
    assert thread is not None and thread.daemon and thread.is_alive()

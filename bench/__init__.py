"""kproxy's benchmarks (never part of the tests; tests/test_soak.py imports ``bench.soak``).
Each module is also a script, ``python bench/NAME.py``, which puts the checkout first on
``sys.path`` so that ``bench``, ``kproxy`` and ``kproxy_tools`` come from it."""

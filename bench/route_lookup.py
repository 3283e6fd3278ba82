"""Route lookup cost with 1, 100 and 5,000 routes (a benchmark, not a test).

    python bench/route_lookup.py

Prints microseconds per lookup (median of rounds) and the ratio to the 1-route table, for
the map walk itself (``Router._lookup``: Werkzeug's state-machine matcher walks path
segments, so the cost should not grow with the number of routes) and for ``match``, which
answers a question it was asked before from its bounded memory of matches.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kproxy.routing import Router  # noqa: E402

LOOKUPS = 20_000
ROUNDS = 7


def build(n: int) -> tuple[Router, list[tuple[str, str]]]:
    """A table of ``n`` routes: the probed route plus ``n - 1`` others on 50 hosts, so
    every table is asked the same question."""
    router = Router()
    router.add("probe.example.org", "/api/v1/probe/resource", "prefix", ["GET"], "probe")
    for i in range(n - 1):
        router.add(f"svc{i % 50}.example.org", f"/api/v{i % 7}/team{i}/resource",
                   "prefix" if i % 3 else "exact", None if i % 2 else ["GET"], i)
    probes = [("probe.example.org", "/api/v1/probe/resource/item/42"),
              ("probe.example.org:8080", "/api/v1/probe/resource")]
    assert router.match(*probes[0], "GET") == "probe"
    return router, probes


def per_lookup(lookup, probes: list[tuple[str, str]]) -> float:
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for i in range(LOOKUPS):
            host, path = probes[i % len(probes)]
            lookup(host, path, "GET")
        rounds.append((time.perf_counter() - start) / LOOKUPS)
    return statistics.median(rounds)


def main() -> None:
    base = cached_base = None
    print(f"{'routes':>7} {'us/lookup':>10} {'vs 1 route':>11} {'remembered us':>14}")
    for n in (1, 100, 5000):
        router, probes = build(n)
        seconds = per_lookup(router._lookup, probes)
        cached = per_lookup(router.match, probes)
        base, cached_base = base or seconds, cached_base or cached
        print(f"{n:>7} {seconds * 1e6:>10.2f} {seconds / base:>10.2f}x {cached * 1e6:>14.2f}")


if __name__ == "__main__":
    main()

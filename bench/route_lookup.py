"""Route lookup cost with 1, 100 and 5,000 routes (a benchmark, not a test).

    python bench/route_lookup.py

Prints microseconds per lookup (the fastest of rounds in which the tables take turns)
and the ratio to the 1-route table, for
the map walk itself (``Router._lookup``: Werkzeug's state-machine matcher walks path
segments, so the cost should not grow with the number of routes) and for ``match``, which
answers a question it was asked before from its bounded memory of matches.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kproxy.routing import Router  # noqa: E402

LOOKUPS = 5_000
ROUNDS = 15


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
    start = time.perf_counter()
    for i in range(LOOKUPS):
        host, path = probes[i % len(probes)]
        lookup(host, path, "GET")
    return (time.perf_counter() - start) / LOOKUPS


def main() -> None:
    tables = {n: build(n) for n in (1, 100, 5000)}
    walks: dict[int, list[float]] = {n: [] for n in tables}
    remembered: dict[int, list[float]] = {n: [] for n in tables}
    per_lookup(tables[1][0]._lookup, tables[1][1])  # warm-up
    for _ in range(ROUNDS):  # the tables take turns, so that a busy moment hits each alike
        for n, (router, probes) in tables.items():
            walks[n].append(per_lookup(router._lookup, probes))
            remembered[n].append(per_lookup(router.match, probes))
    # the fastest round of each: what the code costs, without what other work added
    base = min(walks[1])
    print(f"{'routes':>7} {'us/lookup':>10} {'vs 1 route':>11} {'remembered us':>14}")
    for n in tables:
        seconds = min(walks[n])
        print(f"{n:>7} {seconds * 1e6:>10.2f} {seconds / base:>10.2f}x {min(remembered[n]) * 1e6:>14.2f}")


if __name__ == "__main__":
    main()

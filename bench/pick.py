"""What picking a node costs per request, before and after the balancing of issue #16
(topology tiers, slow start, health state), in one run.

    python bench/pick.py [--nodes 10] [--picks 200000] [--before REV]

"Before" is kproxy/upstream.py as it was at ``REV`` (default: the commit before the
balancing work), read from git and loaded beside today's, so both run in the same
process on the same nodes. Printed: nanoseconds per pick (best of 5) and the ratio to
before, for the defaults (what every service pays) and with every step at work (zones
preferred, a node slow-starting, one unhealthy). The target: the defaults within 10%.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kproxy.node import Node, Placement  # noqa: E402
from kproxy.upstream import Upstream  # noqa: E402

BEFORE = "121336d"  # structure work done, balancing not yet begun


def upstream_before(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:kproxy/upstream.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("kproxy._upstream_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "kproxy"  # its relative imports (.node) resolve to today's package
    exec(compile(source, f"{rev}:kproxy/upstream.py", "exec"), module.__dict__)
    return module.Upstream


def per_pick(upstream, picks: int) -> float:
    """Nanoseconds per pick, best of 5 runs."""
    pick = upstream.pick
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter_ns()
        for _ in range(picks):
            pick()
        best = min(best, (time.perf_counter_ns() - started) / picks)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--picks", type=int, default=200_000)
    parser.add_argument("--before", default=BEFORE)
    args = parser.parse_args(argv)
    plain = tuple(Node(f"10.0.0.{i}", 8080) for i in range(args.nodes))
    zoned = tuple(Node(n.host, n.port, placement=Placement(zone="a" if i % 2 else "b", distribution="PreferClose"))
                  for i, n in enumerate(plain))

    before = per_pick(upstream_before(args.before)("svc", lambda: plain), args.picks)
    defaults = per_pick(Upstream("svc", lambda: plain), args.picks)
    busy = Upstream("svc", lambda: zoned, zone="a", slow_start=3600)
    busy.pick()
    busy._ramp_from[zoned[1]] = busy._clock()  # one node slow-starting for the whole run
    busy.set_unhealthy({(zoned[3].host, zoned[3].port)})
    every_step = per_pick(busy, args.picks)

    print(f"pick over {args.nodes} nodes, ns per pick (best of 5 x {args.picks:,}):")
    print(f"  before ({args.before}):                      {before:8.0f}")
    print(f"  today, defaults:                          {defaults:8.0f}   {defaults / before:.2f} x before")
    print(f"  today, zones + slow start + health at work: {every_step:6.0f}   {every_step / before:.2f} x before")
    verdict = "PASS" if defaults <= 1.10 * before else "FAIL"
    print(f"{verdict}: defaults within 10% of before ({defaults / before:.2f} x)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

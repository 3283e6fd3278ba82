"""The ``kproxy`` command: serve, check, routes, endpoints, demo."""

from __future__ import annotations

import argparse
import sys

from . import config as configmod


def _listen(value: str) -> tuple[str, int]:
    try:
        return configmod._listen(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kproxy", description="A Kubernetes-aware API gateway.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway (gunicorn gthread, settings from [kproxy])")
    serve.add_argument("-c", "--config", required=True, metavar="FILE")
    serve.add_argument("--listen", type=_listen, metavar="HOST:PORT", help="overrides [kproxy] listen")
    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", required=True, metavar="FILE")
    routes = commands.add_parser("routes", help="print the route table")
    routes.add_argument("-c", "--config", required=True, metavar="FILE")
    endpoints = commands.add_parser("endpoints", help="list every registry once and print what each "
                                    "service resolves to (checks RBAC and selectors before deploying)")
    endpoints.add_argument("-c", "--config", required=True, metavar="FILE")
    endpoints.add_argument("--timeout", type=float, default=15.0, metavar="SECONDS",
                           help="how long to wait for the first list [15]")
    demo = commands.add_parser("demo", help="run the Kubernetes discovery walkthrough locally "
                               "(kube-apiserver, httpbin, gateway); Ctrl-C stops it")
    demo.add_argument("--listen", type=_listen, metavar="HOST:PORT", help="gateway address [127.0.0.1:9080]")
    mode = demo.add_mutually_exclusive_group()
    mode.add_argument("--keep", action="store_true", help="leave the demo running in the background")
    mode.add_argument("--stop", action="store_true", help="stop the running demo")
    mode.add_argument("--scale", type=int, metavar="N", help="give the running demo's Service N httpbin nodes")
    args = parser.parse_args(argv)

    if args.command == "demo":
        try:  # tooling, not the gateway: a package of its own that the image does not ship
            from kproxy_tools.demo import command as demo_command
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("kproxy_tools"):
                raise
            print("kproxy demo: its orchestration (the kproxy_tools package) is not installed here; run it "
                  "from a source checkout of kproxy, or install kproxy from one with `pip install .`",
                  file=sys.stderr)
            return 1
        return demo_command(args.listen, keep=args.keep, stop=args.stop, scale=args.scale)
    if args.command == "check":
        return _check(args.config)
    try:
        config = configmod.load(args.config)
    except configmod.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    if args.command == "routes":
        _print_routes(config)
        return 0
    if args.command == "endpoints":
        return _print_endpoints(config, args.timeout)
    if args.command == "serve":
        from .server import serve as run
        run(args.config, args.listen)
        return 0
    return 2


def _check(path: str) -> int:
    try:
        config = configmod.load(path)
    except configmod.ConfigError as e:
        for problem in e.problems:
            print(problem)
        return 1
    for warning in config.warnings:
        print(warning)
    print(f"{path}: ok ({len(config.services)} services, {len(config.apis)} apis, "
          f"{len(config.registries)} registries)")
    return 0


def _print_routes(config: configmod.Config) -> None:
    rows = [("HOST", "PATH", "MATCH", "METHODS", "API", "SERVICE", "UPSTREAM")]
    for api in sorted(config.apis.values(), key=lambda a: (config.services[a.service].host,
                                                            config.services[a.service].path_prefix + a.path)):
        service = config.services[api.service]
        if service.nodes is not None:
            upstream = " ".join(n.address + (f" weight={n.weight}" if n.weight != 1 else "") for n in service.nodes)
        else:
            upstream = f"{service.registry}:{service.namespace}/{service.service_name}:{service.port}"
        rows.append((service.host or "*", service.path_prefix + api.path, api.match,
                     "*" if api.methods is None else " ".join(sorted(api.methods)),
                     api.name + (" (strip_prefix)" if api.strip_prefix else ""), service.name, upstream))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def _print_endpoints(config: configmod.Config, timeout: float) -> int:
    import json
    import logging
    import time

    from .discovery import create_registry
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    registries = {name: create_registry(rc) for name, rc in config.registries.items() if rc.enabled}
    for registry in registries.values():
        registry.start()
    deadline = time.monotonic() + timeout
    while not all(r.ready for r in registries.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    failed = False
    try:
        for name, rc in config.registries.items():
            registry = registries.get(name)
            if registry is None:
                print(f"[registry:{name}] disabled: its services answer 503")
                continue
            dump = registry.dump()
            state = "listed" if registry.ready else f"NOT LISTED within {timeout:g} s"
            print(f"[registry:{name}] {state}; state {dump.get('state')}")
            for key in ("last_error", "warnings"):
                if dump.get(key):
                    print(f"  {key}: {json.dumps(dump[key])}")
            failed |= not registry.ready
        for service in config.services.values():
            if service.registry is None:
                continue
            where = f"{service.namespace}/{service.service_name} port {service.port}"
            registry = registries.get(service.registry)
            nodes = registry.nodes(service.namespace, service.service_name, service.port) if registry else None
            if nodes is None:
                shown = "unknown service (503)" if registry else "registry disabled (503)"
            elif not nodes:
                shown = "no ready endpoints (503)"
            else:
                shown = " ".join(n.address for n in nodes)
            print(f"[service:{service.name}] {where} -> {shown}")
    finally:
        for registry in registries.values():
            registry.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``kproxy`` command: serve, check, routes, endpoints, demo."""

from __future__ import annotations

import argparse
import sys

from . import config as configmod
from .node import split_host_port


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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())

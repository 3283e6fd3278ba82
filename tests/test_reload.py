"""Reload under ``kproxy serve`` and gunicorn (kproxy/server.py): every worker loads the bytes
the master validated, a setting only a restart applies is named in the log, and no problem
the master logs quotes a token."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, EchoApp, GatewayProcess, free_port, session, wait_until
from .test_config import JWT, SECRET_SHAPES, secret_parts

STATIC = """
[kproxy]
workers = 2
threads = {threads}
read_timeout = {read_timeout}
client_header_timeout = {header_timeout}

[service:echo]
host = echo.test
nodes = {node}

[api:echo]
service = echo
path = /
"""

# Run in the master before any worker forks: a worker's reload waits for the gate file, so
# the test can rewrite the config between the master's check and the workers' load.
GATE = """
import os, sys, time
from kproxy import server as _server
_reload = _server._reload_gateway

def _gated(*args):
    for _ in range(1000):  # at most 10 s
        if os.path.exists({gate!r}):
            break
        time.sleep(0.01)
    _reload(*args)

_server._reload_gateway = _gated
"""


def ini(node, threads=4, read_timeout=60, header_timeout=10) -> str:
    return STATIC.format(node=node.address, threads=threads, read_timeout=read_timeout,
                         header_timeout=header_timeout)


def digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:12]


class GatedGateway(GatewayProcess):
    """kproxy as the contract starts it, with the gate above patched in first."""

    def __init__(self, kind: str, config_path: Path, port: int, gate: Path):
        super().__init__(kind, config_path, port)
        self.gate = gate
        self.patch = GATE.format(gate=str(gate))

    def command(self) -> list[str]:
        bind = f"127.0.0.1:{self.port}"
        if self.kind == "serve":
            argv = ["serve", "-c", str(self.config_path), "--listen", bind]
            return [sys.executable, "-c", self.patch + f"from kproxy.cli import main\nsys.exit(main({argv!r}))\n"]
        conf = self.log_dir / "gated.conf.py"
        conf.write_text(f"exec(compile(open({str(ROOT / 'conf' / 'gunicorn.conf.py')!r}).read(), "
                        f"'gunicorn.conf.py', 'exec'))\n" + self.patch)
        return [sys.executable, "-m", "gunicorn", "-c", str(conf), "-b", bind, "kproxy.wsgi:application"]


def stderr(gw) -> str:
    return (gw.log_dir / f"{gw.kind}.stderr").read_text(errors="replace")


def worker_loads(gw) -> dict[int, str]:
    """The config each worker last loaded on a reload, by pid."""
    return {int(pid): name for pid, name in re.findall(r"reload: worker (\d+) runs \S+ \((sha256:\w+)\)", stderr(gw))}


def nodes_answering(gw, n=24) -> set[str]:
    # a fresh connection each, so any worker may answer
    answers = [session().get(gw.url + "/x", headers={"Host": "echo.test", "Connection": "close"}, timeout=5)
               for _ in range(n)]
    assert {a.status_code for a in answers} == {200}
    return {a.json()["node"] for a in answers}


@pytest.fixture(scope="module")
def nodes(upstream):
    return upstream(EchoApp("a")), upstream(EchoApp("b")), upstream(EchoApp("c"))


@pytest.mark.parametrize("rewrite", ["valid", "invalid"])
@pytest.mark.parametrize("kind", ["serve", "gunicorn"])
def test_workers_load_the_bytes_the_master_validated_not_the_file_as_it_is_later(tmp_path, nodes, kind, rewrite):
    config = tmp_path / "kproxy.ini"
    config.write_text(ini(nodes[0]))
    gate = tmp_path / "gate"
    gw = GatedGateway(kind, config, free_port(), gate).start()
    try:
        assert nodes_answering(gw) == {"a"}
        workers = set(gw.pids()) - {gw.process.pid}
        assert len(workers) == 2

        validated = ini(nodes[1])
        config.write_text(validated)
        gw.signal(signal.SIGHUP)
        wait_until(lambda: f"({digest(validated)}) is valid" in stderr(gw), timeout=15)
        # edited again after the master's check, before any worker loaded
        later = ini(nodes[2]) if rewrite == "valid" else f"[registry:r]\ntoken =\n{JWT}\n"
        config.write_text(later)
        gate.touch()
        loads = wait_until(lambda: len(l := worker_loads(gw)) == 2 and l, timeout=15)

        assert loads == {pid: digest(validated) for pid in workers}
        assert nodes_answering(gw) == {"b"}
        assert "reload refused" not in stderr(gw)  # the later file was never read
    finally:
        gw.stop()
    assert JWT not in gw.logs()


@pytest.mark.parametrize("kind", ["serve", "gunicorn"])
def test_a_reload_names_each_changed_setting_that_needs_a_restart(gateway_process, nodes, kind):
    gw = gateway_process(kind, ini(nodes[0]))
    path = gw.config_path

    def hup(text: str) -> list[str]:
        mark = len(stderr(gw))
        path.write_text(text)
        gw.signal(signal.SIGHUP)
        wait_until(lambda: f"({digest(text)}) is valid" in stderr(gw)[mark:], timeout=15)
        return re.findall(r"reload: \[kproxy\] .*", stderr(gw)[mark:])

    notes = hup(ini(nodes[1], threads=16, read_timeout=5, header_timeout=20))
    assert notes == ["reload: [kproxy] threads changed; it takes effect after a restart",
                     "reload: [kproxy] client_header_timeout changed; it takes effect after a restart"]
    wait_until(lambda: nodes_answering(gw) == {"b"}, timeout=15)  # the rest was applied
    # still not applied: said again; back to the values the processes run: nothing to say
    assert hup(ini(nodes[1], threads=16)) == [notes[0]]
    assert hup(ini(nodes[0])) == []


@pytest.mark.parametrize("kind", ["serve", "gunicorn"])
def test_a_refused_reload_logs_where_each_problem_is_and_never_the_token(gateway_process, nodes, kind):
    gw = gateway_process(kind, ini(nodes[0]))
    tokens = set()
    for shape, (token, text, expected) in SECRET_SHAPES.items():
        mark = len(stderr(gw))
        gw.config_path.write_text(text)
        gw.signal(signal.SIGHUP)
        log = wait_until(lambda: "is invalid; the running config stays" in (s := stderr(gw)[mark:]) and s,
                         timeout=15)
        assert re.search(r"reload refused: " + re.escape(f"{gw.config_path}: ") + expected, log), (shape, log)
        tokens.add(token)
    assert nodes_answering(gw) == {"a"}  # every worker kept the running config
    gw.stop()
    logs = gw.logs() + stderr(gw)
    for token in tokens:
        for part in secret_parts(token):
            assert part not in logs, part


@pytest.mark.parametrize("kind", ["serve", "gunicorn"])
def test_every_worker_reports_the_last_reload_and_its_result_even_when_refused(gateway_process, nodes, kind):
    gw = gateway_process(kind, ini(nodes[0]))

    def last_reloads() -> list:
        # a fresh connection each: both workers answer in a few tries
        answers = [session().get(gw.url + "/-/status", headers={"Connection": "close"}, timeout=5).json()
                   for _ in range(8)]
        return [a["process"]["last_reload"] for a in answers]
    assert last_reloads() == [None] * 8
    gw.config_path.write_text("[kproxy]\nthreads = many\n")
    gw.signal(signal.SIGHUP)
    wait_until(lambda: all(r and r["result"].startswith("refused") for r in last_reloads()), timeout=15)
    gw.config_path.write_text(ini(nodes[1]))
    gw.signal(signal.SIGHUP)
    wait_until(lambda: all(r and r["result"] == "ok" for r in last_reloads()), timeout=15)
    assert {r["config_file"] for r in last_reloads()} == {str(gw.config_path)}


@pytest.mark.parametrize("kind", ["serve", "gunicorn"])
def test_a_config_refused_at_start_quotes_no_token(tmp_path, kind):
    config = tmp_path / "kproxy.ini"
    config.write_text(f"[registry:r]\ntype = kubernetes\napi_server = https://10.0.0.1:6443\ntoken =\n{JWT}\n")
    gw = GatewayProcess(kind, config, free_port())
    result = subprocess.run(gw.command(), cwd=ROOT, env=gw.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"{config}: [registry:r]: line 5: not key = value" in result.stderr
    for part in secret_parts(JWT):
        assert part not in result.stdout + result.stderr

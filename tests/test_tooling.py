"""The ``kproxy`` package is the gateway only: the test environment (Debian packages,
a kube-apiserver built from source) and the demo's orchestration live in ``kproxy_tools``,
which ``pip install .`` installs beside it and the container image leaves out. And
``.ci/floors.py``, with which CI installs every declared lower bound pinned exactly."""

from __future__ import annotations

import ast
import configparser
import re
import subprocess
import sys

import setuptools

from .conftest import ROOT

KPROXY = ROOT / "kproxy"

# what installing system packages or building binaries looks like in Python source
TOOLING = re.compile(r"apt-get|apt-cache|dpkg|\bgo build\b|golang|GOPATH|make WHAT=", re.IGNORECASE)


def sources():
    files = sorted(KPROXY.rglob("*.py"))
    assert len(files) > 10, files  # the walk found the package
    return files


def test_the_kproxy_package_installs_no_system_package_and_builds_no_binary():
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in sources()
             for n, line in enumerate(path.read_text().splitlines(), 1) if TOOLING.search(line)]
    assert not found, "\n".join(found)


def test_kproxy_imports_the_tools_only_inside_a_function():
    # a module-level import would make the gateway need the tooling to start
    found = []
    for path in sources():
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "kproxy_tools"]
    assert not found, found


def test_pip_install_puts_the_tools_beside_kproxy_and_the_image_does_not():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    exclude = cfg["options.packages.find"]["exclude"].split()
    packages = setuptools.find_packages(str(ROOT), exclude=exclude)
    assert "kproxy" in packages and "kproxy_tools" in packages, packages
    assert not [p for p in packages if p.split(".")[0] in ("tests", "bench")], packages
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    copied = [line for line in dockerfile.splitlines() if line.startswith("COPY")]
    assert any(" kproxy " in line for line in copied), copied
    assert not any("kproxy_tools" in line for line in copied), copied


def test_demo_without_the_tools_says_where_to_get_them():
    hide = "import sys; sys.modules['kproxy_tools'] = None; from kproxy.cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", hide, "demo", "--stop"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "kproxy_tools package) is not installed" in result.stderr
    assert "Traceback" not in result.stderr


def floors(setup_cfg) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "floors.py"), str(setup_cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_ci_pins_every_declared_lower_bound_exactly():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = [line for line in cfg["options"]["install_requires"].splitlines()
                if line.strip() and not line.strip().startswith("#")]
    result = floors(ROOT / "setup.cfg")
    assert result.returncode == 0, result.stderr
    pins = result.stdout.split()
    assert len(pins) == len(declared) and all("==" in pin for pin in pins), (declared, pins)
    assert "gunicorn==27" in pins and "kubernetes==37" in pins, pins


def test_a_requirement_without_a_lower_bound_has_no_floor_to_test(tmp_path):
    path = tmp_path / "setup.cfg"
    path.write_text("[options]\ninstall_requires =\n    werkzeug>=3.0\n    requests<3\n")
    result = floors(path)
    assert result.returncode != 0
    assert "requests<3" in result.stderr and "lower bound" in result.stderr

"""Print setup.cfg's install_requires with each lower bound pinned exactly (``>=X`` becomes
``==X``), one a line, for ``pip install -c``. A requirement without a lower bound is an
error: its floor could not be tested.

    python3 .ci/floors.py [setup.cfg] > floors.txt
"""

from __future__ import annotations

import configparser
import re
import sys

# name, then its specifiers: "urllib3>=2.3,<3"
REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$")


def floors(setup_cfg: str) -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    pins = []
    for line in parser["options"]["install_requires"].splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = REQUIREMENT.match(line)
        if not match:
            raise SystemExit(f"{setup_cfg}: install_requires: cannot read {line!r}")
        name, specifiers = match.groups()
        lower = [s.strip()[2:].strip() for s in specifiers.split(",") if s.strip().startswith(">=")]
        if len(lower) != 1:
            raise SystemExit(f"{setup_cfg}: install_requires: {line!r} needs exactly one >= lower bound")
        pins.append(f"{name}=={lower[0]}")
    return pins


if __name__ == "__main__":
    print("\n".join(floors(sys.argv[1] if len(sys.argv) > 1 else "setup.cfg")))

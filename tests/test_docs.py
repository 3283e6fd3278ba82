"""The README's configuration reference is generated from the settings that validate a
file (kproxy/config.py), and must not drift from them."""

from pathlib import Path

from kproxy.config import reference

README = Path(__file__).resolve().parent.parent / "README.rst"


def test_readme_config_reference_is_current():
    text = README.read_text()
    start = text.index(".. BEGIN CONFIG REFERENCE\n") + len(".. BEGIN CONFIG REFERENCE\n")
    end = text.index(".. END CONFIG REFERENCE")
    assert text[start:end].strip() == reference().strip(), \
        "regenerate the README section with: python -m kproxy.config"

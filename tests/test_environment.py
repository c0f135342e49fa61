"""The environment is the pinned one: every package of constraints.txt is installed at exactly
its pinned version (scripts/setup.sh installs under it; scripts/lock.sh refreshes it)."""

from __future__ import annotations

import importlib.metadata
import re

from conftest import REPO_ROOT


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


def test_every_pinned_package_is_installed_at_its_pin():
    wanted = pins()
    assert {"jax", "jaxlib", "equinox", "orbax-checkpoint", "transformers", "torch", "lm-eval"} <= set(wanted)
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in importlib.metadata.distributions()}
    wrong = {name: (version, installed.get(name)) for name, version in wanted.items() if installed.get(name) != version}
    assert not wrong, f"installed versions differ from constraints.txt (pinned, installed): {wrong}"

"""The README's command reference and every `--help` agree, flag for flag."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

COMMANDS = ["train", "launch", "slurm", "merge", "generate", "plan", "plot", "preprocess", "push", "tiny"]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")


def _readme_commands() -> dict[str, set[str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Commands", 1)[1].split("```", 2)[1]
    flags: dict[str, set[str]] = {}
    cmd = None
    for line in block.splitlines():
        line = line.split("#", 1)[0]
        m = re.match(r"distlora (\w+)", line)
        if m:
            cmd = m.group(1)
        if cmd:
            flags.setdefault(cmd, set()).update(FLAG.findall(line))
    return flags


@pytest.mark.parametrize("cmd", COMMANDS)
def test_readme_and_help_name_the_same_flags(cmd):
    res = subprocess.run([sys.executable, "-m", "distlora.cli", cmd, "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    helped = set(FLAG.findall(res.stdout)) - {"--help"}
    documented = _readme_commands().get(cmd)
    assert documented is not None, f"README's command reference has no `distlora {cmd}`"
    assert documented == helped, f"README only: {sorted(documented - helped)}; --help only: {sorted(helped - documented)}"


def test_version_is_documented_and_answers():
    res = subprocess.run([sys.executable, "-m", "distlora.cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    from distlora import __version__

    assert res.returncode == 0 and res.stdout.strip() == f"distlora {__version__}"
    assert "distlora --version" in (ROOT / "README.md").read_text()

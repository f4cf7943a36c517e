"""The README's two set-up commands: CI runs them verbatim, and the main job works."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no set-up code block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_two_commands_that_ci_runs():
    commands = readme_commands()
    assert len(commands) == 2
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands[0] in ci_lines, "the install-and-run command in .ci/run differs from the README"
    assert commands[1].split(" -q")[0] in " ".join(ci_lines), "the test command in .ci/run differs from the README"
    assert "pytest" in commands[1]


def test_readme_main_job_runs():
    install, _ = readme_commands()
    main_job = install.split("&&", 1)[1].strip()
    assert main_job.startswith("diffquant ")
    args = main_job.split()[1:]
    done = subprocess.run([sys.executable, "-m", "diffquant", *args], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reload bitwise" in done.stdout and "False" not in done.stdout

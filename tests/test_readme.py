"""The README's two set-up commands: CI runs them verbatim, and the main job works."""

from __future__ import annotations

import os
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


def test_readme_main_job_runs(tmp_path):
    """The README's main job, as written, at toy size (CI runs it at full size as README command 1)."""
    install, _ = readme_commands()
    main_job = install.split("&&", 1)[1].strip()
    assert main_job.startswith("diffquant ")
    toy = ["--samples", "10", "--steps", "2", "--recipes", "w8a8", "--out", str(tmp_path / "demo"), "--quiet"]
    env = {**os.environ, "DIFFQUANT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "diffquant", *main_job.split()[1:], *toy], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| `fp` |" in done.stdout and "| `w8a8` |" in done.stdout
    assert "frozen (packed kernels) vs FP" in done.stdout and "w8a8: smaller" in done.stdout
    assert (tmp_path / "demo" / "fmnist-dit-w8a8.json").is_file()

"""The README's first command works on a fresh machine: no checkpoint, no store, nothing downloaded."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _first_command() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Set up", 1)[1]
    return re.search(r"```bash\n(.*?)\n```", setup, re.S).group(1).strip()


def test_the_first_set_up_command_runs_the_demo_with_nothing_downloaded(tmp_path):
    """It once was `pip install . && malhae convert ./polyglot-ko-1.3b … && malhae chat …`, which fails on a machine
    that has no checkpoint: everything after `pip install .` is run here, in an empty MALHAE_HOME and folder."""
    steps = [shlex.split(step) for step in _first_command().split("&&")]
    assert steps[0][:2] == ["pip", "install"]
    for step in steps[1:]:
        assert step[0] == "malhae", step
        done = subprocess.run([sys.executable, "-m", "malhae", *step[1:]], cwd=tmp_path, input="안녕하세요\n/exit\n",
                              capture_output=True, text=True, timeout=120,
                              env={"MALHAE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin",
                                   "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, (step, done.stderr)
        assert "demo model" in done.stderr  # it says what it runs

"""Ctrl-C while malhae is still starting (importing Typer, Rich, numpy): the same one line and exit 130 as later,
never an import traceback (issue 32, item 5: what the first pass left)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ctrl_c_during_start_up_is_one_line_and_130():
    outcomes = []
    for delay in (0.03, 0.06, 0.09, 0.12, 0.15, 0.2, 0.25, 0.3):
        proc = subprocess.Popen([sys.executable, "-m", "malhae", "models"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        err = err.decode()
        outcomes.append((delay, proc.returncode))
        assert "Traceback" not in err, (delay, err)
        # -SIGINT: the signal came before Python set up its handler (nothing printed); 0: after `models` finished
        assert proc.returncode in (130, -signal.SIGINT, 0), (delay, proc.returncode, err)
        if proc.returncode == 130:
            assert err.strip().splitlines()[-1] == "malhae: error: interrupted (중단됨)", err
    assert any(code == 130 for _, code in outcomes), outcomes  # some signals landed while malhae was starting

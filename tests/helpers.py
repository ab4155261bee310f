"""Helpers shared by tests."""

import os
import subprocess
import sys


def run_thresher(*args: str) -> subprocess.CompletedProcess:
    """The real `thresher` command line, in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "thresher", *args], capture_output=True, text=True, timeout=900, env=os.environ.copy()
    )

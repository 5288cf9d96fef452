"""Every example runs, at a tiny size, as a user would run it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_offload_optimizer_example(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "offload_optimizer.py"), "--steps", "3",
                          "--nvme", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "step    2" in out.stdout and "state on nvme" in out.stdout

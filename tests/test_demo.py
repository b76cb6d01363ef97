"""`fewstep demo` (issue 18, items 7 and 12): Ctrl-C stops it with a checkpoint, running it again continues
from there; its output is one line per checkpoint, no library noise."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.mark.slow
def test_ctrl_c_stops_the_demo_and_a_rerun_continues(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "fewstep", "demo", "--output_dir", str(out), "--max_train_steps", "60",
           "--num_images", "10"]
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: [chunks.append(c) for c in iter(lambda: os.read(proc.stderr.fileno(),
                                                                                         4096), b"")], daemon=True)
    reader.start()
    # Ctrl-C once training has made a few steps (the progress bar shows them)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [int(n) for n in re.findall(r"(\d+)/60 \[", b"".join(chunks).decode(errors="replace"))]
        if done and max(done) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=180)
    reader.join(timeout=10)
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 130, err[-3000:]
    assert f"run `fewstep demo --output_dir {out}` again to continue" in err
    assert "--pretrained_teacher_model" not in err and "Traceback" not in err
    saved = sorted(out.glob("student/checkpoint-*"))
    assert len(saved) == 1 and not (out / "report").exists()  # stopped before any evaluation
    stopped_at = int(saved[0].name.split("-")[1])
    assert 0 < stopped_at < 60

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {saved[0]} at step {stopped_at}" in r.stderr
    assert (out / "report" / "report.md").is_file() and "best training-free sampler" in r.stdout
    # One line per checkpoint, no accelerate INFO lines, no diffusers scheduler-config warnings
    assert "accelerate" not in r.stderr and "are not expected and will be ignored" not in r.stderr
    assert r.stderr.count("checkpoint saved:") == len([s for s in (50, 60) if s > stopped_at])

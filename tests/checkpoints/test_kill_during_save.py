"""A process killed with SIGKILL in the middle of a save leaves every committed checkpoint loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ckpt_helpers import MiniLoop, tiny_config
from glassbox.checkpoints.checkpointer import Checkpointer
from glassbox.checkpoints.config import CheckpointConfig
from glassbox.checkpoints.layout import list_checkpoints
from glassbox.checkpoints.loading import find_resume_checkpoint, load_checkpoint
from glassbox.checkpoints.manifest import verify

# Saves a ~3 MB model (weights + Adam moments ~ 9 MB per checkpoint) over and over, so a save is in flight
# most of the time; the test kills it while a step_NNNNNN.tmp directory exists.
CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {helpers!r})
    from ckpt_helpers import MiniLoop, tiny_config
    from glassbox.checkpoints.checkpointer import Checkpointer
    from glassbox.checkpoints.config import CheckpointConfig

    run = Path({run!r})
    loop = MiniLoop(run, tiny_config(tie=True, vocab_size=2048, hidden_size=128, intermediate_size=512))
    ckpt = Checkpointer(CheckpointConfig(every=1), run, log=lambda m: None)
    while True:
        loop.step()
        ckpt.save(loop.state)
""")


def test_sigkill_mid_save_leaves_previous_checkpoints_loadable(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    code = CHILD.format(helpers=str(Path(__file__).parent), run=str(run))
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 120
        caught = False
        while time.monotonic() < deadline and child.poll() is None:
            if len(list_checkpoints(root)) >= 2 and list(root.glob("step_*.tmp")):
                os.kill(child.pid, signal.SIGKILL)
                caught = True
                break
            time.sleep(0.002)
        assert caught, "the saving process never reached a second save in flight"
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert list(root.glob("step_*.tmp")), "killed outside a save: the test did not exercise a partial write"
    committed = list_checkpoints(root)
    for _, path in committed:
        verify(path)
    newest = committed[-1][1]
    assert (root / "latest").read_text().strip() == newest.name
    assert find_resume_checkpoint(run, "auto", log=lambda m: None) == newest

    resumed = MiniLoop(run, tiny_config(tie=True, vocab_size=2048, hidden_size=128, intermediate_size=512), seed=1)
    load_checkpoint(newest, resumed.state)
    assert resumed.state.step == committed[-1][0]
    resumed.step()
    Checkpointer(CheckpointConfig(), run, log=lambda m: None).save(resumed.state)
    assert not list(root.glob("step_*.tmp"))         # the next save clears what the killed one left

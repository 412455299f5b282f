"""A save that cannot be written (the disk is full, a file too large): one clear error, nothing half-written."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from glassbox.checkpoints.layout import list_checkpoints

# A real failed write: the child lowers its file-size limit (RLIMIT_FSIZE) below a checkpoint shard's size after
# the first save, so the kernel refuses the second save's writes (EFBIG, as ENOSPC would on a full disk).
CHILD = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    sys.path.insert(0, {helpers!r})
    from ckpt_helpers import MiniLoop
    from glassbox.checkpoints.config import CheckpointConfig
    from glassbox.train.checkpointing import CheckpointCallback

    run = Path({run!r})
    loop = MiniLoop(run)
    callback = CheckpointCallback(CheckpointConfig(every=1, on_save_error={mode!r}), run, log=print)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    for step in range(1, 4):
        loop.step()
        if step == 2:
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        if step == 3:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        callback.on_step_end(loop.state)
    print("finished at step", loop.state.step)
""")


def _run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    helpers = str(Path(__file__).parent)
    code = CHILD.format(helpers=helpers, run=str(tmp_path), mode=mode)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_failed_save_stops_with_one_clear_error_and_leaves_no_partial_directory(tmp_path):
    done = _run(tmp_path, "stop")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "CheckpointWriteError: checkpoint of step 2: writing" in last and "File too large" in last, done.stderr
    assert "MiB free there, the previous checkpoint took" in last
    root = tmp_path / "checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [1] and not list(root.glob("*.tmp"))


def test_with_continue_training_goes_on_and_the_next_save_commits(tmp_path):
    done = _run(tmp_path, "continue")
    assert done.returncode == 0, done.stderr
    assert "checkpoint of step 2: writing" in done.stdout and "Training continues" in done.stdout
    assert "finished at step 3" in done.stdout
    root = tmp_path / "checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [1, 3] and not list(root.glob("*.tmp"))

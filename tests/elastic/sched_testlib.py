"""A toy model trace small enough to check the simulator by hand."""

from __future__ import annotations

from pathlib import Path


def write_toy_trace(root: Path, name: str = "toy") -> Path:
    """One GPU: 1.0 s per step at local batch 10; two GPUs on one node: 1.0 s per step (0.2 s of it sync); two
    epochs of 100 progress units each, noise-free gradients (grad_var 0, so a bigger batch gains nothing)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "placements.csv").write_text(
        "placement,local_bsz,step_time,sync_time\n"
        "1,10,1.0,0.0\n1,20,2.0,0.0\n2,10,1.0,0.2\n2,20,2.0,0.2\n11,10,1.5,0.7\n11,20,2.5,0.7\n")
    (d / "scalability.csv").write_text(
        "num_nodes,num_replicas,local_bsz,step_time,sync_time\n"
        "1,1,10,1.0,0.0\n2,2,10,1.5,0.7\n2,4,10,2.0,1.0\n1,4,10,1.2,0.3\n2,4,20,3.0,1.0\n1,1,20,2.0,0.0\n")
    for batch in (10, 20, 40):
        (d / f"validation-{batch}.csv").write_text(
            "progress,iteration,metric,grad_sqr,grad_var\n100,100,0.5,1.0,0.0\n200,200,0.6,1.0,0.0\n")
    return d

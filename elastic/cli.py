"""`glassbox elastic run`: Pollux-adaptive training under torchrun, restarted at another world size when that pays.

The launcher runs `torchrun --nproc-per-node K -m glassbox.elastic.worker` and waits. The run ends one of three
ways: it finished (done); it stopped itself after a final checkpoint asking for another size in
RUN_DIR/elastic/request.json (the agent's goodput model says more or fewer workers pay, with `--elastic-set
resize=true`, between --min-nproc and --max-nproc; or a planned `--resize-at STEP:K`, which stands in for
workers that come or go at a known step); or torchrun failed (a worker was lost), and it restarts with one
worker fewer, down to --min-nproc, at most --max-restarts times. Every restart resumes from the latest
checkpoint (`checkpoint.resume=auto`); the data order is a cursor in a world-free sample order, so the run
continues on the next sample whatever the size. Each restart is an event in RUN_DIR/manifest.json
("elastic_events"). One machine (torchrun --standalone); several nodes would run the same loop per node
behind a c10d rendezvous, which this launcher does not manage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from glassbox.errors import GlassboxError


def register(sub: argparse._SubParsersAction) -> None:
    from glassbox.elastic.worker import add_elastic_args
    from glassbox.train.cli import add_train_args

    p = sub.add_parser("elastic", help="Pollux: goodput-adaptive batch size and elastic world size")
    area = p.add_subparsers(dest="elastic_command", metavar="COMMAND")
    run = area.add_parser("run", help="train with the Pollux agent under torchrun, resizing when it pays")
    add_train_args(run)
    add_elastic_args(run)
    run.add_argument("--nproc", type=int, default=1, help="workers to start with")
    run.add_argument("--min-nproc", type=int, default=1, help="never fewer workers than this")
    run.add_argument("--max-nproc", type=int, default=0, help="never more workers than this (0: --nproc)")
    run.add_argument("--resize-at", action="append", default=[], metavar="STEP:NPROC",
                     help="a planned resize: after STEP, continue with NPROC workers (repeatable)")
    run.add_argument("--max-restarts", type=int, default=3, help="restarts after lost workers before giving up")
    run.set_defaults(handler=run_elastic)
    p.set_defaults(handler=lambda args: p.print_help() or 0)


def parse_resizes(items: list[str]) -> list[tuple[int, int]]:
    plan = []
    for text in items:
        try:
            step, nproc = (int(x) for x in text.split(":"))
        except ValueError:
            raise GlassboxError(f"--resize-at {text!r}: expected STEP:NPROC, e.g. 20:2") from None
        if step < 1 or nproc < 1:
            raise GlassboxError(f"--resize-at {text!r}: step and nproc must be >= 1")
        plan.append((step, nproc))
    return sorted(plan)


def worker_command(args: argparse.Namespace, nproc: int, resume: str | None, stop: tuple[int, int] | None
                   ) -> list[str]:
    from glassbox.train.cli import resolve_config_path, resolved_overrides

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "glassbox.elastic.worker", "--config", str(resolve_config_path(args.config))]
    for override in resolved_overrides(args):
        cmd += ["--set", override]
    if resume:
        cmd += ["--set", f"checkpoint.resume={resume}"]
    if args.elastic_config:
        cmd += ["--elastic", args.elastic_config]
    for override in args.elastic_overrides:
        cmd += ["--elastic-set", override]
    if stop:
        cmd += ["--stop-at", str(stop[0]), "--then-nproc", str(stop[1])]
    return cmd


def latest_step(run_dir: Path) -> int:
    """The step of the newest committed checkpoint that verifies (0 before the first)."""
    from glassbox.checkpoints.loading import find_resume_checkpoint

    path = find_resume_checkpoint(run_dir, "auto", lambda _msg: None)
    return 0 if path is None else int(path.name.rsplit("_", 1)[-1])


def run_elastic(args: argparse.Namespace) -> int:
    from glassbox.train.cli import config_from_args
    from glassbox.train.manifest import append_event

    max_nproc = args.max_nproc or args.nproc
    if not 1 <= args.min_nproc <= args.nproc <= max_nproc:
        raise GlassboxError(f"need 1 <= --min-nproc ({args.min_nproc}) <= --nproc ({args.nproc}) <= --max-nproc "
                            f"({max_nproc})")
    resizes = parse_resizes(args.resize_at)
    cfg = config_from_args(args)        # checked here once, so a bad config fails before torchrun starts
    run_dir = Path(cfg.run_dir)
    request_path = run_dir / "elastic" / "request.json"
    env = dict(os.environ)
    if max_nproc > args.min_nproc:
        env["GLASSBOX_ELASTIC_NPROC"] = f"{args.min_nproc}:{max_nproc}"
    nproc, resume, failures = args.nproc, args.resume, 0
    while True:
        done = latest_step(run_dir) if resume else 0
        stop = next(((s, k) for s, k in resizes if s > done), None)
        request_path.unlink(missing_ok=True)
        started = time.time()
        rc = subprocess.call(worker_command(args, nproc, resume, stop), env=env)
        request = json.loads(request_path.read_text()) if request_path.is_file() else None
        if rc == 0 and request is None:
            return 0
        if rc == 0:
            new = max(args.min_nproc, min(max_nproc, int(request["nproc"])))
            reason = request.get("reason", "goodput")
        else:
            failures += 1
            if failures > args.max_restarts:
                raise GlassboxError(f"elastic run: torchrun failed (exit {rc}) {failures} times; giving up")
            new, reason = max(args.min_nproc, nproc - 1), f"workers lost (torchrun exit {rc})"
        step = latest_step(run_dir)
        event = {"step": step, "from_nproc": nproc, "to_nproc": new, "reason": reason,
                 "run_s": round(time.time() - started, 3),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        append_event(run_dir, "elastic_events", event)
        print(f"[elastic] step {step}: {reason}; restarting with {new} worker(s) (was {nproc})", flush=True)
        nproc, resume = new, "auto"

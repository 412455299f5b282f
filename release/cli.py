"""`glassbox release build|push|verify|analyze` and `glassbox reproduce`.

Exit codes: 0 success; 1 a check that ran and failed (verify found a problem, reproduce was not bit-exact);
2 bad input (printed as one line by glassbox.cli).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("release", help="build, push, verify and analyze Hub-ready releases of a run")
    rsub = p.add_subparsers(dest="release_command", metavar="ACTION", required=True)

    b = rsub.add_parser("build", help="a run directory -> a release directory (model + dataset repos, manifest)")
    b.add_argument("--run", required=True, type=Path, help="finished run directory")
    b.add_argument("--out", required=True, type=Path, help="release directory to create")
    b.add_argument("--repo-id", default="", help="model repo ORG/NAME named in the cards (default glassbox/RUN_NAME)")
    b.add_argument("--dataset-repo-id", default="", help="dataset repo (default REPO_ID-data)")
    b.add_argument("--license", default="apache-2.0", help="Hub license id (default apache-2.0)")
    b.add_argument("--language", default="en", help="comma-separated language codes (default en)")
    b.add_argument("--val-samples", type=int, default=16, help="validation samples per checkpoint loss (default 16)")
    b.add_argument("--force", action="store_true", help="replace an existing release directory")
    b.set_defaults(handler=_build)

    pu = rsub.add_parser("push", help="upload a release to the Hugging Face Hub (token: HF_TOKEN or login cache)")
    pu.add_argument("--release", required=True, type=Path, help="release directory")
    pu.add_argument("--repo-id", required=True, help="model repo ORG/NAME (must match the build's)")
    pu.add_argument("--private", action="store_true", help="create private repos")
    pu.add_argument("--dry-run", action="store_true", help="print the plan (repos, branches, files, sizes) only")
    pu.set_defaults(handler=_push)

    v = rsub.add_parser("verify", help="check hashes, load every branch in transformers, compare probe logits")
    v.add_argument("release", type=Path, help="release directory")
    v.add_argument("--atol", type=float, default=1e-4, help="allowed probe logit difference (default 1e-4)")
    v.set_defaults(handler=_verify)

    a = rsub.add_parser("analyze", help="per-checkpoint perplexity, memorization and weight norms, added to release")
    a.add_argument("release", type=Path, help="release directory")
    a.add_argument("--num-prompts", type=int, default=32, help="memorization prompts (default 32)")
    a.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    a.add_argument("--continuation-len", type=int, default=32, help="greedy continuation tokens (default 32)")
    a.add_argument("--seed", type=int, default=0, help="seed choosing the prompts (default 0)")
    a.set_defaults(handler=_analyze)

    r = sub.add_parser("reproduce", help="replay the steps before checkpoint N and compare with it (bit-exact?)")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="run directory")
    src.add_argument("--release", type=Path, help="release directory (uses its training_state/ and dataset)")
    r.add_argument("--step", type=int, required=True, help="checkpoint step to reproduce")
    r.set_defaults(handler=_reproduce)


def _build(args: argparse.Namespace) -> int:
    from glassbox.release.build import BuildOptions, build_release

    opts = BuildOptions(repo_id=args.repo_id, dataset_repo_id=args.dataset_repo_id, license=args.license,
                        language=[s.strip() for s in args.language.split(",") if s.strip()],
                        val_samples=args.val_samples, force=args.force)
    index = build_release(args.run, args.out, opts)
    final = index["branches"][-1]
    print(f"release built at {args.out}: {len(index['branches'])} branches, main = {index['main_branch']} "
          f"(validation loss {final['val_loss']:.4f}), repos {index['repo_id']} + {index['dataset_repo_id']}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from glassbox.release.push import push

    print(push(args.release, args.repo_id, private=args.private, dry_run=args.dry_run))
    if not args.dry_run:
        print(f"pushed to https://huggingface.co/{args.repo_id}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from glassbox.release.verify import format_report, verify_release

    report = verify_release(args.release, atol=args.atol)
    print(format_report(report))
    return 0 if report.ok else 1


def _analyze(args: argparse.Namespace) -> int:
    from glassbox.release.analyze import AnalyzeOptions, analyze_release

    summary = analyze_release(args.release, AnalyzeOptions(args.num_prompts, args.prompt_len, args.continuation_len,
                                                           args.seed))
    for row in summary["rows"]:
        print(f"{row['branch']}: perplexity {row['perplexity']:.3f}, memorization {row['memorization']:.3f}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from glassbox.release.reproduce import format_result, from_release, from_run, reproduce

    source = from_run(args.run) if args.run else from_release(args.release)
    result = reproduce(source, args.step)
    print(format_result(result))
    return 0 if result.bit_exact else 1

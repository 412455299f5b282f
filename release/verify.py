"""`glassbox release verify`: is this release exactly what was built, and does every checkpoint still work?

Three checks, all offline: every file's sha256 against the manifest (naming each file that differs, is missing,
or was added); every branch and `main` load in transformers; each checkpoint's logits on the fixed probe match
the values recorded at build time within `atol`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from glassbox.errors import GlassboxError
from glassbox.release.layout import ReleaseLayout
from glassbox.release.manifest import check_manifest

DEFAULT_ATOL = 1e-4


@dataclass
class VerifyReport:
    files_checked: int = 0
    branches_loaded: int = 0
    max_logit_diff: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_release(release_dir: Path, atol: float = DEFAULT_ATOL) -> VerifyReport:
    from tqdm import tqdm

    from glassbox.release.probe import compare_summaries, load_transformers_model, probe_summary

    layout = ReleaseLayout(release_dir)
    index = layout.read_index()
    report = VerifyReport()
    files = check_manifest(layout.root, layout.read_json(layout.manifest), layout.manifest.name)
    report.files_checked = files.checked
    report.problems += files.problems()
    targets = [(b["branch"], layout.branch(b["branch"]), b) for b in index["branches"]]
    final = next(b for b in index["branches"] if b["branch"] == index["main_branch"])
    targets.append(("main", layout.model, final))
    for name, path, recorded in tqdm(targets, desc="verify", unit="branch"):
        try:
            model = load_transformers_model(path)
        except GlassboxError as e:
            report.problems.append(f"branch {name} does not load: {e}")
            continue
        report.branches_loaded += 1
        diff = compare_summaries(recorded["probe"], probe_summary(model, index["probe_ids"]))
        if diff is None:
            report.problems.append(f"branch {name}: probe logits have a different shape than recorded")
        elif diff > atol:
            report.problems.append(f"branch {name}: probe logits differ from the recorded values by {diff:.3g} "
                                   f"(> atol {atol:g})")
        else:
            report.max_logit_diff = max(report.max_logit_diff, diff)
    return report


def format_report(report: VerifyReport) -> str:
    head = (f"{report.files_checked} files hashed, {report.branches_loaded} branches loaded in transformers, "
            f"max probe logit difference {report.max_logit_diff:.3g}")
    if report.ok:
        return f"release OK: {head}"
    lines = [f"release FAILED ({len(report.problems)} problems): {head}"]
    return "\n".join(lines + [f"  {p}" for p in report.problems])

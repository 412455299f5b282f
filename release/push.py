"""Publish a release to the Hugging Face Hub: the plan (what goes where) and its execution with huggingface_hub.

The plan is computed from the release directory alone, so `--dry-run` shows exactly what a push would do:
create the model and dataset repos, upload the dataset, then for each checkpoint create its branch and upload its
export, then upload `main` and, under `release/` on main, the release index and manifest. Uploads use
`HfApi.upload_folder`, which commits large folders in batches and resumes an interrupted upload when re-run
(already committed files are skipped, uploaded data deduplicated).
Each upload mirrors its folder (`delete_patterns="*"`): a branch created from `main` does not keep main's files.

The token comes from `HF_TOKEN` or the login cache (`huggingface_hub.get_token`) and goes only into the `HfApi`
object; it is never printed or logged. A Hub call that fails (no network, offline mode, a refused token, a missing
repo) stops the push with one line: the operation, the repo, and what to try; re-running resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glassbox.errors import GlassboxError
from glassbox.release.layout import ReleaseLayout
from glassbox.release.manifest import list_files

RELEASE_PREFIX = "release"


@dataclass
class PushAction:
    kind: str                     # "create_repo" | "create_branch" | "upload_folder" | "upload_file"
    repo_id: str
    repo_type: str                # "model" | "dataset"
    revision: str = "main"
    folder: Path | None = None    # upload_folder: the folder; upload_file: the release root
    files: list[tuple[str, int]] = field(default_factory=list)   # (path in repo, bytes) for uploads

    @property
    def size(self) -> int:
        return sum(s for _, s in self.files)


def _folder_files(folder: Path) -> list[tuple[str, int]]:
    return [(rel, (folder / rel).stat().st_size) for rel in list_files(folder)]


def check_repo_id(repo_id: str, option: str, default_from: str = "") -> None:
    """Refuse a repo id the Hub would refuse (huggingface_hub's own rules: characters, `--`/`..`, 96 characters
    at most) or one without a namespace, naming `option` (and, for a derived default, where it came from)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    where = f"{option} {repo_id!r}" + (f" (the default, from {default_from})" if default_from else "")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise GlassboxError(f"{where}: {e}") from None
    if repo_id.count("/") != 1:
        raise GlassboxError(f"{where}: expected ORG/NAME")


def push_plan(release_dir: Path, repo_id: str) -> list[PushAction]:
    """Every Hub operation a push performs, in order; refuses a repo id other than the one the cards name."""
    check_repo_id(repo_id, "--repo-id")
    layout = ReleaseLayout(release_dir)
    index = layout.read_index()
    if repo_id != index["repo_id"]:
        raise GlassboxError(
            f"--repo-id {repo_id} differs from {index['repo_id']}, which {layout.index} and the model card name; "
            f"rebuild with `glassbox release build --repo-id {repo_id}`"
        )
    dataset_id = index["dataset_repo_id"]
    plan = [
        PushAction("create_repo", repo_id, "model"),
        PushAction("create_repo", dataset_id, "dataset"),
        PushAction("upload_folder", dataset_id, "dataset", folder=layout.dataset, files=_folder_files(layout.dataset)),
    ]
    for branch in index["branches"]:
        folder = layout.branch(branch["branch"])
        plan.append(PushAction("create_branch", repo_id, "model", revision=branch["branch"]))
        plan.append(PushAction("upload_folder", repo_id, "model", revision=branch["branch"], folder=folder,
                               files=_folder_files(folder)))
    plan.append(PushAction("upload_folder", repo_id, "model", folder=layout.model, files=_folder_files(layout.model)))
    # The release index and manifest go last, under release/ on main, so a Hub download can be verified too.
    root_files = [(f"{RELEASE_PREFIX}/{p.name}", p.stat().st_size) for p in (layout.index, layout.manifest)]
    plan.append(PushAction("upload_file", repo_id, "model", folder=layout.root, files=root_files))
    return plan


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_plan(plan: list[PushAction], private: bool, list_files_limit: int = 20) -> str:
    repos = [a for a in plan if a.kind == "create_repo"]
    uploads = [a for a in plan if a.kind.startswith("upload")]
    lines = [f"push plan: {len(repos)} repos, {sum(a.kind == 'create_branch' for a in plan)} branches, "
             f"{sum(len(a.files) for a in uploads)} files, {_size(sum(a.size for a in uploads))}"
             f" ({'private' if private else 'public'})"]
    for i, a in enumerate(plan, 1):
        where = f"{a.repo_type} {a.repo_id}"
        if a.kind == "create_repo":
            lines.append(f"{i:3d}. create repo   {where}")
        elif a.kind == "create_branch":
            lines.append(f"{i:3d}. create branch {where}@{a.revision}")
        elif a.kind == "upload_file":
            lines.append(f"{i:3d}. upload files  {where}@{a.revision}: " + ", ".join(
                f"{rel} ({_size(size)})" for rel, size in a.files))
        else:
            lines.append(f"{i:3d}. upload        {where}@{a.revision} <- {a.folder} "
                         f"({len(a.files)} files, {_size(a.size)})")
            for rel, size in a.files[:list_files_limit]:
                lines.append(f"       {rel} ({_size(size)})")
            if len(a.files) > list_files_limit:
                lines.append(f"       ... and {len(a.files) - list_files_limit} more")
    return "\n".join(lines)


def resolve_token() -> str:
    """HF_TOKEN or the login cache; the value is returned to the caller only, never shown."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise GlassboxError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (use --dry-run to see the plan)"
        )
    return token


def _perform(a: PushAction, api: Any, private: bool) -> None:
    if a.kind == "create_repo":
        api.create_repo(a.repo_id, repo_type=a.repo_type, private=private, exist_ok=True)
    elif a.kind == "create_branch":
        api.create_branch(a.repo_id, branch=a.revision, repo_type=a.repo_type, exist_ok=True)
    elif a.kind == "upload_file":
        for rel, _ in a.files:
            api.upload_file(path_or_fileobj=str(a.folder / Path(rel).name), path_in_repo=rel, repo_id=a.repo_id,
                            repo_type=a.repo_type, revision=a.revision, commit_message=f"glassbox release: {rel}")
    else:
        api.upload_folder(repo_id=a.repo_id, folder_path=str(a.folder), repo_type=a.repo_type,
                          revision=a.revision, delete_patterns="*",
                          commit_message=f"glassbox release: {a.repo_type} {a.revision}")


def _describe(a: PushAction) -> str:
    where = f"{a.repo_type} {a.repo_id}"
    if a.kind == "create_repo":
        return f"create repo {where}"
    if a.kind == "create_branch":
        return f"create branch {where}@{a.revision}"
    return f"upload to {where}@{a.revision}"


def _hub_failure(e: Exception, a: PushAction, endpoint: str) -> str:
    """What went wrong with a Hub call and what to try, in one line."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE): unset HF_HUB_OFFLINE to push (--dry-run shows the plan offline)"
    if not isinstance(e, HfHubHTTPError):
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return (f"cannot reach {endpoint} ({type(e).__name__}{': ' + first if first else ''}): check the network "
                f"(and HF_ENDPOINT, proxies), or see the plan offline with --dry-run")
    status = e.response.status_code
    namespace = a.repo_id.split("/")[0]
    hints = {
        401: "the Hub rejected the token (HTTP 401): check HF_TOKEN or run `hf auth login`",
        403: f"the token may not write to {a.repo_id} (HTTP 403): use a token with write access to {namespace}",
        404: f"{a.repo_id} not found (HTTP 404): check the repo id and that the token can see it",
    }
    server = (e.server_message or "").strip().splitlines()
    return f"{endpoint}: " + hints.get(status, f"the Hub answered HTTP {status}" + (f": {server[0]}" if server else ""))


def execute(plan: list[PushAction], api: Any, private: bool) -> None:
    """Run the plan against `api` (a `huggingface_hub.HfApi` holding the token).

    A Hub call that fails is one GlassboxError: the operation, its repo, why, and what to try. HfHubHTTPError
    derives from the HTTP client's base error (`huggingface_hub.errors.HTTPError`, httpx2's in huggingface_hub 2),
    as connection errors and timeouts do; offline mode raises OfflineModeIsEnabled."""
    from huggingface_hub.errors import HTTPError, OfflineModeIsEnabled
    from tqdm import tqdm

    with tqdm(total=len(plan), desc="push", unit="op") as bar:    # closed (its line ended) before an error
        for i, a in enumerate(plan, 1):
            try:
                _perform(a, api, private)
            except (HTTPError, OfflineModeIsEnabled) as e:
                why = _hub_failure(e, a, api.endpoint)
                if api.token:
                    why = why.replace(api.token, "***")
                raise GlassboxError(f"release push: {_describe(a)} (operation {i} of {len(plan)}) failed: {why}; "
                                    f"re-running the push resumes it") from None
            bar.update()


def push(release_dir: Path, repo_id: str, private: bool = False, dry_run: bool = False, api: Any = None) -> str:
    """Print-ready plan; without `dry_run`, also perform it (with `api`, or an HfApi built from the token)."""
    plan = push_plan(release_dir, repo_id)
    text = format_plan(plan, private)
    if dry_run:
        return text
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=resolve_token(), library_name="glassbox")
    execute(plan, api, private)
    return text

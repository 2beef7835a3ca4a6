"""Moving folders to and from the Hub (``huggingface_hub``'s own calls; no card logic here)."""

from __future__ import annotations

import os


def upload_folder_to_hub(folder: str, repo_id: str, *, private=None, token=None, revision=None, subfolder=None,
                         commit_message: str = "Upload with peft-basis", create_pr: bool = False,
                         commit_description: str | None = None):
    """Create the repo (and branch) if needed and upload ``folder``; returns the ``CommitInfo``."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, path_in_repo=subfolder, revision=revision,
                             commit_message=commit_message, commit_description=commit_description,
                             create_pr=create_pr)


def download_folder(repo_id: str, *, revision=None, subfolder=None, token=None, cache_dir=None,
                    local_files_only: bool = False, allow_patterns=None) -> str:
    """``snapshot_download`` of (a subfolder of) a repo; returns the local folder holding the files."""
    from huggingface_hub import snapshot_download

    patterns = allow_patterns
    if subfolder:
        patterns = [f"{subfolder.strip('/')}/{p}" for p in (allow_patterns or ["*"])]
    path = snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                             local_files_only=local_files_only, allow_patterns=patterns)
    return os.path.join(path, subfolder) if subfolder else path

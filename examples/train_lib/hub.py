"""Publishing `final/` to the Hugging Face Hub: checked before training, pushed last, never at the cost of results.

    check_push_target(repo_id)          at start-up: a valid repo name and a token (no network unless asked);
    push_final(output_dir, repo_id)     after report.json, the final evaluation and the model card are written:
                                        uploads final/, records the outcome under "push" in report.json, and on
                                        failure says how to upload the same folder again. It never raises.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

from huggingface_hub import HfApi, constants, create_repo, get_token, upload_folder
from huggingface_hub.utils import HFValidationError, validate_repo_id


class PushTargetError(ValueError):
    """`--push_to_hub` cannot succeed; raised at start-up so that no training time is spent first."""


def check_push_target(repo_id: str, check_remote: bool = False) -> None:
    """Fail now, not after training, if `repo_id` is not a valid name, the Hub is off, or there is no token.

    `check_remote` also asks the Hub whose the token is (one network call) and whether it may write to the namespace.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushTargetError(f"--push_to_hub {repo_id!r} is not a valid repo id: {error}") from error
    if constants.HF_HUB_OFFLINE:
        raise PushTargetError(f"--push_to_hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded. Unset it, "
                              "or drop --push_to_hub and upload final/ after training (`hf upload`).")
    token = get_token()
    if token is None:
        raise PushTargetError(f"--push_to_hub {repo_id}: no Hugging Face token. Run `hf auth login` or set HF_TOKEN "
                              "(a token with write access), then start again; or drop --push_to_hub and upload "
                              "final/ after training.")
    if check_remote:
        check_token_can_write(repo_id, token)


def check_token_can_write(repo_id: str, token: str) -> None:
    try:
        user = HfApi().whoami(token=token)
    except Exception as error:  # an expired token, no network: either way the push would fail
        raise PushTargetError(f"--push_to_hub {repo_id}: the Hub did not accept the token ({error})") from error
    role = user.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise PushTargetError(f"--push_to_hub {repo_id}: the token of {user['name']} is read-only; create one with "
                              "write access at https://huggingface.co/settings/tokens")
    namespace = repo_id.split("/")[0] if "/" in repo_id else user["name"]
    allowed = {user["name"], *(org["name"] for org in user.get("orgs", []))}
    if namespace not in allowed:
        raise PushTargetError(f"--push_to_hub {repo_id}: {user['name']} is not {namespace!r} nor one of its "
                              f"organisations ({sorted(allowed)})")


def upload_commands(repo_id: str, folder: str) -> dict[str, str]:
    """Commands that upload `folder` to `repo_id` by hand: the `hf` CLI, and the same in Python."""
    folder = os.path.abspath(folder)
    python = (f"from huggingface_hub import create_repo, upload_folder; create_repo({repo_id!r}, exist_ok=True); "
              f"upload_folder(repo_id={repo_id!r}, folder_path={folder!r})")
    return {"cli": f"hf upload {shlex.quote(repo_id)} {shlex.quote(folder)} .",
            "python": f"python -c {shlex.quote(python)}"}


def push_final(output_dir: str, repo_id: str) -> dict:
    """Upload `output_dir/final` to `repo_id` and record the outcome in `output_dir/report.json` (main process only).

    Returns what was recorded: {"repo_id", "pushed", "url"} or, on failure, {"repo_id", "pushed": False, "error",
    "retry"}. Local files are left as they are either way.
    """
    final_dir = os.path.join(output_dir, "final")
    try:
        create_repo(repo_id, exist_ok=True)
        commit = upload_folder(repo_id=repo_id, folder_path=final_dir,
                               commit_message="Upload the final model of a llama3-siglip2 training run")
        outcome = {"repo_id": repo_id, "pushed": True, "url": getattr(commit, "commit_url", None) or str(commit)}
        print(f"pushed {final_dir} to https://huggingface.co/{repo_id}", flush=True)
    except Exception as error:  # noqa: BLE001 - results are on disk already; no upload error may lose them
        retry = upload_commands(repo_id, final_dir)
        outcome = {"repo_id": repo_id, "pushed": False, "error": f"{type(error).__name__}: {error}", "retry": retry}
        print(f"push to {repo_id} failed ({outcome['error']}).\n{final_dir} and report.json are intact; upload them "
              f"again with\n    {retry['cli']}\nor\n    {retry['python']}", file=sys.stderr, flush=True)
    record_in_report(output_dir, "push", outcome)
    return outcome


def record_in_report(output_dir: str, key: str, value) -> None:
    path = os.path.join(output_dir, "report.json")
    report = {}
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
    report[key] = value
    with open(path, "w") as f:
        json.dump(report, f, indent=1)

"""``--push-to-hub REPO``: upload ``final/`` (for LoRA the adapter, which is what it holds) to
a hub model repository once the run has completed.

The repository id is checked when the options are read, the token and ``HF_HUB_OFFLINE``
before training (:func:`check_push`), so a run is not spent on a push that cannot happen. The
upload itself comes after ``final/`` is complete and checked against its manifest, from the
main process. A failed upload loses nothing: the run stays completed, ``run.json`` records the
failure under ``hub``, and the error says how to push later. The token is huggingface_hub's
(``HF_TOKEN`` or ``hf auth login``), never logged.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import AlignError, ConfigError
from .checkpoint import write_json
from .manifest import verify


class PushFailed(AlignError):
    """The run completed, and final/ could not be uploaded."""


def check_push(repo: str | None, where: str = "--push-to-hub") -> None:
    """A push that cannot happen is refused before training: the hub switched off
    (``HF_HUB_OFFLINE``) or no token."""
    if repo is None:
        return
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"{where} {repo}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or "
            f"push the model later with `hf upload {repo} RUN/final`"
        )
    if get_token() is None:
        raise ConfigError(
            f"{where} {repo}: no Hugging Face token: log in with `hf auth login`, or set "
            "HF_TOKEN to a token with write access"
        )


def push_final(out: Path, repo: str, private: bool, run_info: dict[str, Any]) -> str:
    """Upload ``out/final`` to ``repo`` (created if missing) and record it in ``run.json``;
    return the commit's URL. Raises :class:`PushFailed` (recorded too) when it cannot."""
    from huggingface_hub import HfApi

    final = out / "final"
    later = f"the model is saved at {final}; push it later with `hf upload {repo} {final}`"
    problems = verify(final)
    if problems:  # changed since it was written: not what the run trained
        raise _failed(out, repo, run_info, f"{final} is damaged: {'; '.join(problems)}", later)
    steps = run_info.get("total_steps")
    message = f"align: {run_info.get('objective')} run {out.name}" + (
        f" ({steps} step{'s' if steps != 1 else ''})" if steps else ""
    )
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo, folder_path=final, commit_message=message, repo_type="model"
        )
    except Exception as exc:
        reason = " ".join(str(exc).split()) or "no message"
        why = f"{type(exc).__name__}: {reason} (hub: {api.endpoint})"
        raise _failed(out, repo, run_info, why, later) from None
    url = str(getattr(commit, "commit_url", commit))
    run_info["hub"] = {"repo": repo, "commit": url, "at": datetime.now().isoformat()}
    write_json(out / "run.json", run_info)
    return url


def _failed(out: Path, repo: str, run_info: dict[str, Any], why: str, later: str) -> PushFailed:
    run_info["hub"] = {"repo": repo, "error": why, "at": datetime.now().isoformat()}
    write_json(out / "run.json", run_info)
    return PushFailed(
        f"could not push final/ to the hub repository {repo}: {why}. The run completed: {later}"
    )

"""Locating a checkpoint: a local directory as given, or a hub repo id resolved through the local huggingface_hub
cache (downloading config, weight and tokenizer files unless offline). Knows nothing about the files' contents."""

from __future__ import annotations

import os
import re
from pathlib import Path

from diffllama.run_folder import run_folder_hint

# What a repo id resolution fetches: config, weights, tokenizer files and chat templates.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "tokenizer.model", "*.txt", "*.jinja"]
# A hub repo id: "name" or "namespace/name" (huggingface_hub's REPO_ID_REGEX, without the length limits).
_REPO_ID_RE = re.compile(r"(?:[\w\-.]+/)?[\w\-.]+")


def resolve_checkpoint_dir(path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                           local_files_only: bool = False) -> Path:
    """Return the local directory of a checkpoint given as a directory or as a hub repo id.

    An existing directory is returned as is (``~`` expanded). Anything else that reads as a filesystem path (a
    ``PathLike``, or a string starting with ``.``, ``/`` or ``~``, holding a backslash or more than one ``/``, or
    ``"a/b"`` where ``a`` is an existing local directory) is an error. A string of the form ``"name"`` or
    ``"org/name"`` is resolved with ``huggingface_hub.snapshot_download``, fetching only config, weight and
    tokenizer files (``HUB_ALLOW_PATTERNS``): first from the local cache alone (this works offline), then, unless
    ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, from the network. The result is the cache's snapshot
    folder, ``<HF_HUB_CACHE>/models--org--name/snapshots/<commit>``, laid out as transformers saves checkpoints.

    Args:
        path_or_repo_id: a local checkpoint directory, or a hub repo id.
        revision: a branch, tag or commit hash of the hub repo (default: the hub's default branch); ignored for a
            local directory.
        local_files_only: search only the local hub cache, as with ``HF_HUB_OFFLINE`` (transformers' keyword).

    Returns:
        The checkpoint directory.

    Raises:
        NotADirectoryError: the path exists but is a file.
        FileNotFoundError: for a training run folder (naming its final model or newest checkpoint); naming the
            argument, when it is a path that does not exist, or a repo id that is neither
            in the local hub cache nor downloadable (the message points at ``HF_HUB_OFFLINE`` and the cache).
    """
    text = os.fspath(path_or_repo_id)
    if not text:
        raise FileNotFoundError("empty checkpoint path or repo id")
    path = Path(text).expanduser()
    if path.is_dir():
        hint = run_folder_hint(path)
        if hint:  # a `diffllama train` run folder holds its models one level down
            raise FileNotFoundError(f"no config.json in {path}{hint}")
        return path
    if path.exists():
        raise NotADirectoryError(f"{text!r} is a file; expected a checkpoint directory (the folder holding it)")
    if not isinstance(path_or_repo_id, str) or _looks_like_path(text) or not _REPO_ID_RE.fullmatch(text):
        raise FileNotFoundError(f"checkpoint directory {text!r} does not exist")
    return _resolve_hub_repo(text, revision, local_files_only)


def _looks_like_path(text: str) -> bool:
    """Whether ``text`` reads as a filesystem path rather than a hub repo id ("name" or "org/name")."""
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1 or text.endswith("/"):
        return True
    if (os.altsep and os.altsep in text) or Path(text).is_absolute() or Path(text).drive:
        return True
    # "checkpoints/run1" where "checkpoints" exists here is a mistyped path, not a hub repo.
    return "/" in text and Path(text.split("/", 1)[0]).is_dir()


def _hub_offline() -> bool:
    """Offline mode as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants  # lazy: huggingface_hub takes ~0.3 s to import; only hub ids need it

    def truthy(name: str) -> bool:
        return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}

    return bool(constants.HF_HUB_OFFLINE) or truthy("HF_HUB_OFFLINE") or truthy("TRANSFORMERS_OFFLINE")


def _resolve_hub_repo(repo_id: str, revision: str | None, local_files_only: bool = False) -> Path:
    """The cached (else freshly downloaded) snapshot folder of a hub model repo; FileNotFoundError if neither."""
    from huggingface_hub import snapshot_download  # lazy: import time, as in _hub_offline

    kwargs = dict(repo_id=repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
    # Any failure of the hub (not cached, no network, unknown repo, invalid id) means "cannot resolve"; the
    # original error is chained for the details.
    try:
        return Path(snapshot_download(**kwargs, local_files_only=True))
    except Exception as error:  # noqa: BLE001
        last_error: Exception = error
    offline = _hub_offline() or local_files_only
    if not offline:
        try:
            return Path(snapshot_download(**kwargs))
        except Exception as error:  # noqa: BLE001
            last_error = error
    where = f"revision {revision!r} of " if revision else ""
    how = (
        "HF_HUB_OFFLINE or local_files_only is set, so only the local cache was searched; unset it to download"
        if offline
        else "it is not in the local hub cache and could not be downloaded"
    )
    detail = " ".join(str(last_error).split())  # one line: huggingface_hub's messages span several
    raise FileNotFoundError(
        f"{repo_id!r} is neither a local directory nor a cached or reachable hub repo id: {how} "
        f"({where}{repo_id}; cache: HF_HUB_CACHE / HF_HOME; last error: {type(last_error).__name__}: {detail})"
    ) from last_error

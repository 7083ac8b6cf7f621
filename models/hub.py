"""``model.checkpoint`` as a local directory or a model-hub repo id ``owner/name[@revision]``.

``resolve_checkpoint`` turns either into a local directory for ``CheckpointReader``. A repo is fetched
with ``huggingface_hub.snapshot_download`` into the hub cache (``<cache>/models--owner--name/``:
``refs/<branch or tag>`` holds a commit hash, ``snapshots/<commit>/`` the files as symlinks into
``blobs/``), limited to what the recipe reads: config, safetensors weights and index, tokenizer files.

Only the main rank talks to the hub, once; the other ranks find the same snapshot in the cache with
``local_files_only=True``. They poll for it instead of waiting in a collective, so that a rank whose
main rank never finishes (a failed or stalled download) stops with a message that names the repo
rather than a process-group timeout that names nothing. "Main" means one rank per cache: global rank 0
when every rank sees the same cache (one machine, or HF_HOME on a shared filesystem), else local rank 0.

A cached snapshot is used without the network (``HF_HUB_OFFLINE=1``, or the hub unreachable).
Every failure is a ``CheckpointError`` (the trainer reports those with exit code 2).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from models.hf_reader import CheckpointError, missing_directory_error

__all__ = ["ALLOW_PATTERNS", "DEFAULT_WAIT_S", "parse_repo_spec", "resolve_checkpoint"]

ALLOW_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
]
# Downloading a 4-bit 70B checkpoint (~40 GB) takes a long while on an ordinary link; a wait this long
# only ever ends a run whose main rank has already failed or stalled.
DEFAULT_WAIT_S = 3600.0
_POLL_S = 2.0

# owner/name[@revision]: one slash, hub name characters; a revision may hold slashes (refs/pr/1).
_SPEC = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
_DOWNLOAD_HINT = "`hf download {repo}{rev_flag}` (huggingface_hub >= 1.0; `huggingface-cli download` before)"
_LOGIN_HINT = "set HF_TOKEN or run `hf auth login` (`huggingface-cli login` before huggingface_hub 1.0)"


def parse_repo_spec(spec: str) -> tuple[str, str | None] | None:
    """(repo_id, revision or None) when ``spec`` reads as a hub repo id, else None."""
    m = _SPEC.fullmatch(spec.strip())
    if m is None:
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(m["repo"])
    except HFValidationError:
        return None
    return m["repo"], m["revision"]


def resolve_checkpoint(
    spec: str,
    *,
    is_main: bool,
    barrier: Callable[[], None] | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
    timeout_s: float = DEFAULT_WAIT_S,
) -> Path:
    """The local directory of checkpoint ``spec``: ``spec`` itself when it is a directory, else the
    hub snapshot of repo ``owner/name[@revision]``.

    Every rank calls this. The main rank downloads (or finds the cached snapshot) and then calls
    ``barrier``; the others poll the cache for up to ``timeout_s`` seconds, then call ``barrier`` and
    resolve again, so that they end on the snapshot the main rank resolved even when a stale one of a
    moving branch was cached before.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    parsed = parse_repo_spec(spec)
    if parsed is None or path.exists():
        raise missing_directory_error(path)
    repo, revision = parsed
    hub = _Hub(repo, revision, cache_dir, token)
    if is_main:
        snapshot = hub.resolve()
        if barrier is not None:
            barrier()
        return snapshot
    snapshot = hub.wait_for_cache(timeout_s)
    if barrier is not None:
        barrier()
        snapshot = hub.cached()
    return snapshot


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: the environment is read again here so
    # that setting it later in the process (a launcher, a test) still keeps the hub untouched.
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return bool(constants.HF_HUB_OFFLINE) or _is_true(env)


class _Hub:
    def __init__(self, repo: str, revision: str | None, cache_dir: str | None, token: str | None):
        from huggingface_hub import constants

        self.repo, self.revision, self.token = repo, revision, token
        self.cache_dir = cache_dir
        root = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
        self.storage = root / ("models--" + repo.replace("/", "--"))
        self.name = f"{repo}@{revision}" if revision else repo

    def _download(self, local_files_only: bool, check: bool = True) -> Path:
        import huggingface_hub

        path = Path(
            huggingface_hub.snapshot_download(
                self.repo,
                revision=self.revision,
                allow_patterns=ALLOW_PATTERNS,
                cache_dir=self.cache_dir,
                token=self.token,
                local_files_only=local_files_only,
            )
        )
        return self._checked(path) if check else path

    def _checked(self, snapshot: Path) -> Path:
        """A snapshot without config.json or safetensors weights is not a checkpoint this recipe reads."""
        missing = []
        if not (snapshot / "config.json").is_file():
            missing.append("config.json")
        if not any(snapshot.glob("*.safetensors")):
            missing.append("*.safetensors weights")
        if missing:
            raise CheckpointError(
                f"hub repo {self.name} has no {' and no '.join(missing)} (snapshot {snapshot}): the recipe reads "
                "transformers checkpoints in safetensors format (not pytorch_model.bin or GGUF)"
            )
        return snapshot

    @staticmethod
    def _looks_complete(snapshot: Path) -> bool:
        """Every file a reader opens is there (for caches without the tree listing that tells)."""
        if not (snapshot / "config.json").is_file():
            return False
        index = snapshot / "model.safetensors.index.json"
        if not index.is_file():
            return (snapshot / "model.safetensors").is_file()
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False  # half-written; the reader names a truly broken index later
        return all((snapshot / f).is_file() for f in shards)

    def cached(self) -> Path:
        """The cached snapshot, without the network; CheckpointError when there is none."""
        return self._from_cache("HF_HUB_OFFLINE=1" if _offline() else "local files only")

    def _from_cache(self, reason: str, error: Exception | None = None) -> Path:
        from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

        try:
            return self._download(local_files_only=True)
        except IncompleteSnapshotError as e:
            raise CheckpointError(
                f"the cached snapshot of {self.name} in {self.storage} is incomplete (an interrupted download?) "
                f"and the hub cannot be reached ({reason}): complete it with {self._download_hint()} ({e})"
            ) from (error or e)
        except LocalEntryNotFoundError as e:
            raise self._not_cached(reason) from (error or e)

    def resolve(self) -> Path:
        """The main rank: download, or the cached snapshot when the hub cannot be reached."""
        import httpx
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if _offline():
            return self.cached()
        try:
            return self._download(local_files_only=False)
        except RevisionNotFoundError as e:
            raise CheckpointError(
                f"hub repo {self.repo} has no revision {self.revision!r}: the part after @ names a branch, "
                "tag or commit hash"
            ) from e
        except GatedRepoError as e:
            raise CheckpointError(
                f"hub repo {self.repo} is gated: accept its terms on https://huggingface.co/{self.repo} with "
                f"your account, then {self._token_hint()}"
            ) from e
        except RepositoryNotFoundError as e:
            raise CheckpointError(
                f"hub repo {self.repo} does not exist, or it is private and {self._token_state()}: check the "
                f"id (owner/name); for a private repo, {self._token_hint()}"
            ) from e
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                raise CheckpointError(
                    f"the hub refused access to {self.repo} (HTTP {status}): {self._token_hint()}"
                ) from e
            return self._cached_after(e)  # hub errors (5xx) while listing or fetching files
        except HFValidationError as e:
            raise CheckpointError(f"model.checkpoint {self.name!r} is not a valid hub repo id: {e}") from e
        except (httpx.HTTPError, ConnectionError, TimeoutError, LocalEntryNotFoundError) as e:
            # No network. snapshot_download falls back to the cache by itself only when the first call
            # fails: a drop while listing or fetching files, or a pinned commit, surfaces here.
            return self._cached_after(e)

    def _cached_after(self, error: Exception) -> Path:
        cause = error.__cause__ or error  # snapshot_download wraps the connection error it met
        return self._from_cache(f"no network: {type(cause).__name__}: {cause}", error)

    def wait_for_cache(self, timeout_s: float) -> Path:
        """A non-main rank: poll the cache until the main rank's snapshot is complete there."""
        from huggingface_hub.errors import LocalEntryNotFoundError

        if _offline():
            return self.cached()  # the main rank cannot download either: nothing will arrive
        t0 = time.monotonic()
        seen = None
        while True:
            try:
                seen = self._download(local_files_only=True, check=False)
                if self._looks_complete(seen):
                    return self._checked(seen)
            except LocalEntryNotFoundError as e:  # not there yet, or still incomplete (IncompleteSnapshotError)
                seen = getattr(e, "snapshot_path", None) or seen
            waited = time.monotonic() - t0
            if waited >= timeout_s:
                rank = os.environ.get("RANK")
                who = f"rank {rank}" if rank is not None else "this rank"
                partial = f" (it holds a partial snapshot, {seen})" if seen is not None else ""
                secs = f"{waited:.0f}" if waited >= 10 else f"{waited:.1f}"
                raise CheckpointError(
                    f"{who} waited {secs} s for the main rank (rank 0) to download {self.name} into "
                    f"{self.storage}{partial}; check rank 0's output (a download error?) and its network. Ranks "
                    "on other machines need their own download (main = local rank 0) or a shared HF_HOME"
                )
            time.sleep(min(_POLL_S, max(timeout_s - waited, 0.0)))

    # -- messages ----------------------------------------------------------------------------------
    def _download_hint(self) -> str:
        rev_flag = f" --revision {self.revision}" if self.revision else ""
        return _DOWNLOAD_HINT.format(repo=self.repo, rev_flag=rev_flag)

    def _not_cached(self, reason: str) -> CheckpointError:
        return CheckpointError(
            f"hub repo {self.name} is not in the local cache ({self.storage}) and the hub cannot be reached "
            f"({reason}): download it on a machine with network with {self._download_hint()} and copy the "
            "cache (HF_HUB_CACHE / HF_HOME), or point model.checkpoint at a local directory"
        )

    def _token_state(self) -> str:
        from huggingface_hub import get_token

        if self.token or get_token():
            return "the token in use cannot read it"
        return "no token is set"

    def _token_hint(self) -> str:
        if self._token_state() == "no token is set":
            return _LOGIN_HINT
        return f"check that the token in use (HF_TOKEN or `hf auth login`) may read {self.repo}"

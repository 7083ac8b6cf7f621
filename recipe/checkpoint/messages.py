"""The user-facing text of failed checkpoint saves: which rank failed how, and what to do about it."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException

from recipe.checkpoint.layout import list_complete_checkpoints

__all__ = ["describe", "failures", "save_error_message"]

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NO_ACCESS = {errno.EACCES, errno.EPERM, errno.EROFS}
_NOT_A_DIR = {errno.ENOTDIR, errno.EEXIST}


def describe(e: BaseException) -> tuple[str, int | None]:
    """One line naming an error, and the errno of the OSError in it or behind it (None if there is none)."""
    code, x, seen = None, e, set()
    while x is not None and id(x) not in seen and code is None:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno:
            code = x.errno
        x = x.__cause__ or x.__context__
    text = str(e).strip().splitlines()
    text = text[0] if len(text) == 1 else " ".join(t.strip() for t in text)
    return f"{type(e).__name__}: {text[:400]}", code


def failures(e: BaseException, rank: int) -> dict[int, tuple[str, int | None]]:
    """rank -> (error line, errno). DCP gathers every rank's write errors into one CheckpointException
    raised on all ranks: each error is reported under the rank it happened on (and once)."""
    if isinstance(e, CheckpointException):
        out: dict[int, tuple[str, int | None]] = {}
        for r, (exc, _) in e.failures.items():
            out.update(failures(exc, r) if isinstance(exc, CheckpointException) else {r: describe(exc)})
        return out
    return {rank: describe(e)}


def _remove_tmp(tmp: Path | None) -> bool:
    """Remove a failed save's temp dir; True when it is gone."""
    if tmp is None:
        return True
    shutil.rmtree(tmp, ignore_errors=True)
    return not tmp.exists()


def _dir_mib(path: Path) -> float | None:
    try:
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20
    except OSError:
        return None


def save_error_message(
    step: int | None, fails: dict[int, tuple[str, int | None]], folder: Path, world: int, tmp: Path | None
) -> str:
    """Rank 0: the message of a failed save of ``step`` into ``folder`` (``step`` None: the probe before
    training). Removes the failed save's temp dir ``tmp`` and says whether that worked."""
    why = "; ".join((f"rank {r}: " if world > 1 else "") + d for r, (d, _) in sorted(fails.items()))
    codes = {c for _, c in fails.values() if c}
    try:
        done = list_complete_checkpoints(folder)
    except OSError:
        done = []
    where = "checkpoint.folder or job.dump_folder"
    if codes & _NO_SPACE:
        mib = _dir_mib(done[-1][1]) if done else None
        size = f" (the last checkpoint takes {mib:.1f} MiB)" if mib is not None else ""
        hint = (
            f"The filesystem is full or over quota: free space on it{size}, keep fewer checkpoints "
            f"(checkpoint.keep_latest_k), or point {where} at a filesystem with room."
        )
    elif codes & _NO_ACCESS:
        hint = (
            f"The folder is not writable (permissions or a read-only filesystem): fix its "
            f"permissions, or point {where} at a writable folder."
        )
    elif codes & _NOT_A_DIR:
        hint = f"A part of that path is a file, not a folder: move the file, or point {where} elsewhere."
    else:
        hint = f"Check that filesystem, or point {where} elsewhere."
    if step is None:
        return (
            f"checkpoint.enable is set, but the checkpoint folder {folder} cannot be written: "
            f"{why}. {hint} Nothing was trained yet."
        )
    if done:
        last = (
            f"The last complete checkpoint is {done[-1][1].name}: restarting the job resumes from step {done[-1][0]}."
        )
    else:
        last = "There is no complete checkpoint yet: restarting the job starts from step 0."
    gone = ""
    if tmp is not None:
        gone = (
            f" The partial save {tmp.name} was removed."
            if _remove_tmp(tmp)
            else f" The partial save {tmp} could not be removed; a resume ignores it."
        )
    return f"could not save the checkpoint of step {step} to {folder}: {why}. {hint} {last}{gone}"

"""The registry's temporary folders: where a version's router is downloaded, and where a
registration copies the model it logs. Each is named after its machine and process
(`<prefix><host tag>-<pid>-<random>`), so folders that a stopped process left behind (~110-200 MB
each) can be told from those in use and removed, and never those of another machine or container
that shares the temporary folder (its pids mean other processes).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

DOWNLOAD_PREFIX = "mixllm-model-"
REGISTRATION_PREFIX = "mixllm-register-"
_OWNER = re.compile(r"h([0-9a-f]{8})-(\d+)-")  # what follows the prefix: host tag, pid


@functools.cache
def host_tag() -> str:
    """This machine (or container) in 8 hex digits: a hash of its host name."""
    return "h" + hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def owned_prefix(prefix: str) -> str:
    """The start of the names of the folders that this process makes."""
    return f"{prefix}{host_tag()}-{os.getpid()}-"


def download_folder() -> Path:
    """A fresh temporary folder for one version's download, named after this process (see
    remove_orphaned_folders). A process that exits normally while a download is still in use (a
    service stopped while it loads in a background thread) removes it on the way out."""
    remove_orphaned_folders()
    _remove_own_downloads_at_exit()
    return Path(tempfile.mkdtemp(prefix=owned_prefix(DOWNLOAD_PREFIX)))


class FolderLease:
    """A downloaded folder that stays while something holds this object and is removed when nothing
    does (garbage collection, or the process's exit). An onnx or static router loaded from the
    registry reads its transformer from its download on demand (to save it, say, after continual
    learning): its encoder holds the lease, and copies of the encoder share it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._remove = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def __deepcopy__(self, memo: dict[int, object]) -> FolderLease:
        return self  # one folder, removed once: a deep copy of a router shares it

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return Path, (str(self.path),)  # a pickled copy (another process) names the folder, never removes it


@functools.cache  # one exit hook per process
def _remove_own_downloads_at_exit() -> None:
    atexit.register(_remove_own_downloads, os.getpid())


def _remove_own_downloads(pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child, whose parent may still use them
        remove_own_downloads()


def remove_own_downloads() -> None:
    """Remove every download this process made, in use or not: for a process that is about to end
    without Python's exit hooks (a BentoML worker stopped by SIGTERM ends so, and left its
    champion's and challenger's downloads, ~200 MB each, until the next start on the machine)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{owned_prefix(DOWNLOAD_PREFIX)}*"):
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def registration_folder() -> Iterator[Path]:
    """A temporary folder for one registration, named after this process, that also holds MLflow's
    own temporary save of the model: `mlflow.pyfunc.log_model` saves the whole model (~110 MB) under
    tempfile's folder and takes no other, so tempfile's folder is this one while the block runs.
    A registration killed mid-way (kill -9, the OOM killer) left both in /tmp, unnamed; now the
    next registration in any process removes them (remove_orphaned_folders).

    tempfile's folder is process-wide: a temporary file another thread makes during the block
    lands here and is removed with it. Registration is the last step of a training run, with no
    other work of the run beside it."""
    remove_orphaned_folders(prefix=REGISTRATION_PREFIX)
    folder = Path(tempfile.mkdtemp(prefix=owned_prefix(REGISTRATION_PREFIX)))
    before = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = before
        shutil.rmtree(folder, ignore_errors=True)


def remove_orphaned_folders(parent: Path | None = None, prefix: str = DOWNLOAD_PREFIX) -> list[Path]:
    """Remove this machine's folders named `prefix`* (downloads by default, or registration folders)
    of processes that are gone. `load_router` deletes its download once the router is in memory, but a process
    stopped while it loads (kill -9, the OOM killer, a service stopped during start-up or a hot
    reload) cannot: each such stop left ~110 MB in the temporary folder. A folder is removed only
    when it was made on this machine (its host tag) and the pid in its name no longer runs: a
    container sharing the folder has its own pids, and a live download of its service must not go.
    Folders named `prefix`<pid>-* (before host tags) are judged by the pid alone, as before; folders
    without a pid are left to the user, as their owner cannot be told."""
    removed = []
    for folder in Path(parent or tempfile.gettempdir()).glob(f"{prefix}*-*"):
        rest = folder.name[len(prefix):]
        if _OWNER.match(rest) is not None:
            stopped = left_by_stopped_process(rest)
        else:  # named before host tags: the pid alone
            pid_text = rest.split("-", 1)[0]
            stopped = pid_text.isdigit() and not _process_runs(int(pid_text))
        if not folder.is_dir() or not stopped:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        logger.info("removed %d temporary folder(s) (%s*) left by stopped processes", len(removed), prefix)
    return removed


def left_by_stopped_process(owner: str) -> bool:
    """Whether `owner` (a name's part that starts `<host tag>-<pid>-`, from owned_prefix("")) names a
    process of this machine that no longer runs: what it left half-written can go."""
    match = _OWNER.match(owner)
    return match is not None and "h" + match.group(1) == host_tag() and not _process_runs(int(match.group(2)))


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

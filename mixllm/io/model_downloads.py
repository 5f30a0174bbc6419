"""Where the registry downloads a version's router: one temporary folder per download, named after
the process, so downloads that a stopped process left behind can be told from those in use and removed.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DOWNLOAD_PREFIX = "mixllm-model-"


def download_folder() -> Path:
    """A fresh temporary folder for one version's download, named after this process (see
    remove_orphaned_downloads). A process that exits normally while a download is still in use (a
    service stopped while it loads in a background thread) removes it on the way out."""
    remove_orphaned_downloads()
    _remove_own_downloads_at_exit()
    return Path(tempfile.mkdtemp(prefix=f"{DOWNLOAD_PREFIX}{os.getpid()}-"))


@functools.cache  # one exit hook per process
def _remove_own_downloads_at_exit() -> None:
    atexit.register(_remove_own_downloads, os.getpid())


def _remove_own_downloads(pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child, whose parent may still use them
        for folder in Path(tempfile.gettempdir()).glob(f"{DOWNLOAD_PREFIX}{pid}-*"):
            shutil.rmtree(folder, ignore_errors=True)


def remove_orphaned_downloads(parent: Path | None = None) -> list[Path]:
    """Remove the downloads of processes that are gone. `load_router` deletes its download once the
    router is in memory, but a process stopped while it loads (kill -9, the OOM killer, a service
    stopped during start-up or a hot reload) cannot: each such stop left ~110 MB in the temporary
    folder. A folder is removed only when the pid in its name no longer runs; folders without one
    (made before pids were recorded) are left to the user, as their owner cannot be told."""
    removed = []
    for folder in Path(parent or tempfile.gettempdir()).glob(f"{DOWNLOAD_PREFIX}*-*"):
        pid_text = folder.name[len(DOWNLOAD_PREFIX):].split("-", 1)[0]
        if not folder.is_dir() or not pid_text.isdigit() or _process_runs(int(pid_text)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        logger.info("removed %d model download(s) left by stopped processes", len(removed))
    return removed


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

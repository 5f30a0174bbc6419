"""The service's local copy of the version it serves, so a restart can serve at once.

Asking the MLflow registry which version an alias names costs ~2 s at a service's start (importing
MLflow, opening its store), on a start of ~7 s. A service that has served a version keeps its router
folder here with a note of where it came from (tracking URI, registered model, alias, version, and
the version's MLflow run). The next start loads that copy without importing MLflow, answers with
it, and asks the registry in the background (model_lifecycle.py): if the alias moved while the
service was down, or names a same-numbered version of a rebuilt registry (another run), the
registry's version is swapped in as on any alias move. A copy from another registry, model or
alias is never used, and one that cannot be read or cannot route is reported and passed over: the
start then waits for the registry, as it does with no copy.

Several services may share a project (replicas): a copy is staged under a name no other process
uses and renamed into place only once its version serves, and the note is replaced atomically, so a
reader sees the old copy or the new one, never half of one; a copy deleted under a reader fails its
load, and that start waits for the registry. Commits take a lock file beside the folder, one at a
time: overlapping commits (an alias move reaches every replica within one poll) used to delete each
other's copies and fail with "Directory not empty". The last commit wins; if a slower replica
commits an older version last, the next start serves it and swaps in the alias's version from the
registry, as after any alias move.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: no lock, so replicas there must not commit at once (one service per copy)
    fcntl = None

logger = logging.getLogger("bentoml.mixllm")  # bentoml serve shows "bentoml.*" loggers

NOTE = "served.json"
STAGING_PREFIX = ".staging-"
# A staging folder this old was left by a process that died mid-copy (a copy takes seconds).
STALE_STAGING_S = 3600.0


class ServedCopy:
    """One folder per registered model and alias (under `folder`): a note and the router folder of
    the version it names. The note also holds the version's identity (its MLflow run), so a
    registry rebuilt at the same address, whose version numbers start again at 1, is not mistaken
    for the one the copy came from."""

    def __init__(self, folder: Path, tracking_uri: str, model_name: str, alias: str):
        self.folder = Path(folder) / re.sub(r"[^A-Za-z0-9._@-]", "_", f"{model_name}@{alias}")
        self.source = {"tracking_uri": tracking_uri, "registered_model_name": model_name, "alias": alias}

    def _version_folder(self, version: int) -> Path:
        return self.folder / f"version-{int(version)}"

    def note(self) -> dict[str, Any] | None:
        """The note, if it is this registry's, model's and alias's and names a version."""
        try:
            note = json.loads((self.folder / NOTE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("the served copy's note %s cannot be read (%s); starting from the registry",
                           self.folder / NOTE, exc)
            return None
        if not isinstance(note, dict) or {key: note.get(key) for key in self.source} != self.source:
            return None
        version = note.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version <= 0:
            return None
        return note

    def version(self) -> int | None:
        note = self.note()
        return None if note is None else note["version"]

    def identity(self) -> str | None:
        """The copied version's MLflow run (what the registry is asked to confirm)."""
        note = self.note()
        return None if note is None else note.get("identity")

    def load(self) -> tuple[Any, int] | None:
        """The copied router and its version, or None (no copy of this source, or an unreadable one)."""
        version = self.version()
        if version is None:
            return None
        from mixllm.core.router import MixLLMRouter

        try:
            return MixLLMRouter.load(self._version_folder(version), progress=False), version
        except Exception as exc:  # noqa: BLE001 - a damaged copy must not stop a start the registry can serve
            logger.warning("the served copy of version %d in %s cannot be loaded (%s: %s); starting from the "
                           "registry", version, self._version_folder(version), type(exc).__name__, exc)
            return None

    def stage(self, router_folder: Path) -> Path:
        """A copy of a downloaded version's router folder under a name no other process uses; it
        becomes the served copy by `commit`, once the version serves."""
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.folder))
        try:
            shutil.copytree(router_folder, staging / "router")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One commit at a time among the processes and threads that share this copy (the lock file
        sits beside the folder, so the folder holds only the note and the copy)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder.parent / f"{self.folder.name}.lock", "ab") as handle:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
            yield

    def commit(self, staging: Path, version: int, identity: str | None) -> None:
        """Make a staged copy the served copy: the note names it, older copies go."""
        with self._exclusive():
            self._commit(staging, version, identity)

    def _commit(self, staging: Path, version: int, identity: str | None) -> None:
        target = self._version_folder(version)
        note = self.note()
        if note is not None and (note["version"], note.get("identity")) == (version, identity) and target.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
            return
        shutil.rmtree(target, ignore_errors=True)  # a same-numbered version of another registry, or half a copy
        try:
            (staging / "router").rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        content = {**self.source, "version": int(version), "identity": identity,
                   "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        handle, name = tempfile.mkstemp(prefix=STAGING_PREFIX, dir=self.folder)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(content, out, indent=2)
        Path(name).replace(self.folder / NOTE)
        for old in self.folder.glob("version-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
        for leftover in self.folder.glob(f"{STAGING_PREFIX}*"):
            try:
                if time.time() - leftover.stat().st_mtime > STALE_STAGING_S:
                    if leftover.is_dir():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink()
            except OSError:
                pass

    @staticmethod
    def discard(staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

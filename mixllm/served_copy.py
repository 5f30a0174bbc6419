"""The service's local copy of the version it serves, so a restart can serve at once.

Asking the MLflow registry which version an alias names costs ~2 s at a service's start (importing
MLflow, opening its store), on a start of ~7 s. A service that has served a version before keeps
its router folder here with a note of where it came from (tracking URI, registered model, alias,
version). The next start loads that copy without importing MLflow, answers with it, and asks the
registry in the background; if the alias moved while the service was down, the registry's version
is swapped in as on any alias move. A copy from another registry, model or alias is never used, and
a copy that cannot be read is reported and passed over: the start then waits for the registry, as
it does with no copy.

Several services may share a project (replicas): each writes a version's folder under a name of its
own and renames it into place, and the note is replaced atomically, so a reader sees either the old
copy or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger("bentoml.mixllm")  # bentoml serve shows "bentoml.*" loggers

NOTE = "served.json"


class ServedCopy:
    """`folder` holds one note and the router folder of the version it names."""

    def __init__(self, folder: Path, tracking_uri: str, model_name: str, alias: str):
        self.folder = Path(folder)
        self.source = {"tracking_uri": tracking_uri, "registered_model_name": model_name, "alias": alias}

    def _version_folder(self, version: int) -> Path:
        return self.folder / f"version-{int(version)}"

    def version(self) -> int | None:
        """The version the note names, if the note is this registry's, model's and alias's."""
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
        return version if isinstance(version, int) and not isinstance(version, bool) and version > 0 else None

    def load(self) -> tuple[Any, int] | None:
        """The copied router and its version, or None (no copy of this source, or an unreadable one)."""
        version = self.version()
        if version is None:
            return None
        from mixllm.router import MixLLMRouter

        try:
            return MixLLMRouter.load(self._version_folder(version), progress=False), version
        except Exception as exc:  # noqa: BLE001 - a damaged copy must not stop a start the registry can serve
            logger.warning("the served copy of version %d in %s cannot be loaded (%s: %s); starting from the "
                           "registry", version, self._version_folder(version), type(exc).__name__, exc)
            return None

    def save(self, router_folder: Path, version: int) -> None:
        """Copy a downloaded version's router folder in and point the note at it; older copies go."""
        if self.version() == version and self._version_folder(version).is_dir():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self._version_folder(version)
        if not target.is_dir():
            staging = self.folder / f".version-{version}.{os.getpid()}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(router_folder, staging)
            try:
                staging.rename(target)
            except OSError:  # a replica renamed the same version in first: its copy is the same files
                shutil.rmtree(staging, ignore_errors=True)
        note = {**self.source, "version": int(version),
                "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        staging_note = self.folder / f".{NOTE}.{os.getpid()}.tmp"
        staging_note.write_text(json.dumps(note, indent=2), encoding="utf-8")
        staging_note.replace(self.folder / NOTE)
        for old in self.folder.glob("version-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)

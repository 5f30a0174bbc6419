"""The service's local copy of the version it serves (mixllm/service/served_copy.py) and how a start uses it
(mixllm/service/model_lifecycle.py), in process with a registry whose answers the test controls. Serving
from a copy with the real registry and service is tested in test_service.py."""

import json
import logging
import threading
import time
from types import SimpleNamespace

import pytest

from mixllm.service import api_models
from mixllm.service.model_lifecycle import LoadedModel, ModelLifecycle
from mixllm.service.served_copy import NOTE, ServedCopy

SOURCE = ("sqlite:////projects/a/mlflow.db", "mixllm-router", "champion")


def _router_folder(tmp_path, name, text):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "router.json").write_text(text)
    return folder


def _keep(copy, tmp_path, version, identity, text=None):
    staged = copy.stage(_router_folder(tmp_path, f"download-{version}-{identity}", text or f"v{version}"))
    copy.commit(staged, version, identity)


def test_the_note_names_the_version_copied_and_older_copies_go(tmp_path):
    copy = ServedCopy(tmp_path / "serving", *SOURCE)
    assert copy.version() is None, "no copy yet"
    _keep(copy, tmp_path, 1, "run-1", "one")
    assert (copy.version(), copy.identity()) == (1, "run-1")
    assert (copy.folder / "version-1" / "router.json").read_text() == "one"
    _keep(copy, tmp_path, 3, "run-3", "three")
    assert (copy.version(), copy.identity()) == (3, "run-3")
    assert sorted(p.name for p in copy.folder.iterdir()) == [NOTE, "version-3"], \
        "one copy is kept, and no staging folder is left behind"
    # A registry rebuilt at the same address numbers from 1 again: its version 3 replaces the copy.
    _keep(copy, tmp_path, 3, "another-run", "another three")
    assert copy.identity() == "another-run"
    assert (copy.folder / "version-3" / "router.json").read_text() == "another three"


def test_a_copy_of_another_registry_model_or_alias_is_never_used(tmp_path):
    _keep(ServedCopy(tmp_path / "serving", *SOURCE), tmp_path, 1, "run-1")
    uri, name, alias = SOURCE
    for other in ((uri.replace("/a/", "/b/"), name, alias), (uri, "another-router", alias), (uri, name, "challenger")):
        assert ServedCopy(tmp_path / "serving", *other).version() is None, other
    # Aliases and models keep copies side by side: replicas serving different aliases keep both.
    _keep(ServedCopy(tmp_path / "serving", uri, name, "challenger"), tmp_path, 2, "run-2")
    assert ServedCopy(tmp_path / "serving", *SOURCE).version() == 1


def test_an_unreadable_note_or_copy_means_waiting_for_the_registry(tmp_path, caplog):
    copy = ServedCopy(tmp_path / "serving", *SOURCE)
    _keep(copy, tmp_path, 2, "run-2", "not a router")
    with caplog.at_level(logging.WARNING, logger="bentoml.mixllm"):
        assert copy.load() is None, "a copy that does not load is passed over"
    assert "the served copy of version 2" in caplog.text and "starting from the registry" in caplog.text

    caplog.clear()
    (copy.folder / NOTE).write_text("{half a note")
    with caplog.at_level(logging.WARNING, logger="bentoml.mixllm"):
        assert copy.version() is None
    assert "cannot be read" in caplog.text

    for version in (0, -1, "2", True, None):
        note = {"tracking_uri": SOURCE[0], "registered_model_name": SOURCE[1], "alias": SOURCE[2], "version": version}
        (copy.folder / NOTE).write_text(json.dumps(note))
        assert copy.version() is None, version


# --------------------------------------------------------------- how a start uses the copy


class FakeRouter:
    def __init__(self, origin, routes=True):
        self.origin, self.routes = origin, routes
        self.enabled_llms_ = self.llms_ = ("small", "large")

    def apply_enabled_flags(self, llms):
        return []

    def route(self, queries):
        if not self.routes:
            raise ValueError("no enabled LLM is left to route to")


class FakeCopy(ServedCopy):
    """A real note and real folders; the router it loads is a stand-in (routes=False: one that
    loads but cannot route, e.g. after params.yaml disabled its LLMs)."""

    routes = True

    def load(self):
        version = self.version()
        return None if version is None else (FakeRouter(f"copy v{version}", self.routes), version)


class ControlledRegistry:
    """The alias and each version's run, as the test sets them; `answers` is cleared to make the
    registry wait (MLflow still importing), and failures make it raise."""

    def __init__(self, tmp_path, alias_version, runs):
        self.tmp_path, self.alias, self.runs = tmp_path, alias_version, runs
        self.answers, self.failures, self.loads = threading.Event(), 0, []
        self.answers.set()

    def alias_version(self, alias):
        assert self.answers.wait(30)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the tracking server is not up yet")
        return self.alias

    def version_identity(self, version):
        return self.runs.get(version)

    def load_router(self, version, keep=None):
        folder = self.tmp_path / "downloads" / f"v{version}-{len(self.loads)}"
        folder.mkdir(parents=True)
        (folder / "router.json").write_text(f"v{version}")
        if keep is not None:
            keep(folder, version)
        self.loads.append(version)
        return FakeRouter(f"registry v{version}"), version


class Lifecycle(ModelLifecycle):
    def __init__(self, registry, served_copy, poll_interval_s=0.0):
        self.config = SimpleNamespace(
            service=SimpleNamespace(model_alias="champion", poll_interval_s=poll_interval_s),
            mlflow=SimpleNamespace(registered_model_name="mixllm-router"), llms=[])
        self.registry, self.served_copy = registry, served_copy
        self.metrics = SimpleNamespace(model_version=SimpleNamespace(set=lambda number: None))
        self.model, self.loading_reason = None, "loading"
        self._reload_lock, self._stop = threading.Lock(), threading.Event()

    def _load_shadow(self):
        pass


@pytest.fixture
def routable():
    """The service's global candidate list, which swapping a model in sets; restored afterwards."""
    saved = api_models.ROUTABLE.enabled, api_models.ROUTABLE.known
    yield
    api_models.ROUTABLE.enabled, api_models.ROUTABLE.known = saved


def _start(service, version=None):
    thread = threading.Thread(target=service._load_then_poll, args=(version,), daemon=True)
    thread.start()
    return thread


def _wait_for(condition, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not condition():
        time.sleep(0.01)
    return condition()


def test_a_start_serves_the_copy_before_the_registry_answers_then_what_the_alias_names(tmp_path, routable):
    copy = FakeCopy(tmp_path / "serving", *SOURCE)
    _keep(copy, tmp_path, 3, "run-3")
    registry = ControlledRegistry(tmp_path, alias_version=5, runs={3: "run-3", 5: "run-5"})
    registry.answers.clear()  # the registry has not answered yet
    service = Lifecycle(registry, copy)
    thread = _start(service)
    assert _wait_for(lambda: service.model is not None)
    assert (service.model.version, service.model.source, service.model.router.origin) == (3, "local copy", "copy v3")
    registry.answers.set()
    assert _wait_for(lambda: service.model.source == "registry")
    assert (service.model.version, service.model.router.origin) == (5, "registry v5"), "the alias moved meanwhile"
    assert (copy.version(), copy.identity()) == (5, "run-5"), "the copy follows what serves"
    thread.join(5)
    assert not thread.is_alive(), "with polling off, the start stops asking once the registry has answered"


def test_a_same_numbered_version_of_a_rebuilt_registry_replaces_the_copy(tmp_path, routable, caplog):
    copy = FakeCopy(tmp_path / "serving", *SOURCE)
    _keep(copy, tmp_path, 1, "run-of-the-old-registry")
    registry = ControlledRegistry(tmp_path, alias_version=1, runs={1: "run-of-the-new-registry"})
    service = Lifecycle(registry, copy)
    with caplog.at_level(logging.WARNING, logger="bentoml.mixllm"):
        _start(service).join(20)
    assert (service.model.version, service.model.source, service.model.router.origin) == (1, "registry", "registry v1")
    assert "came from another MLflow run than the registry's version 1" in caplog.text
    assert copy.identity() == "run-of-the-new-registry"


def test_the_registry_confirming_the_copy_loads_nothing(tmp_path, routable):
    copy = FakeCopy(tmp_path / "serving", *SOURCE)
    _keep(copy, tmp_path, 4, "run-4")
    registry = ControlledRegistry(tmp_path, alias_version=4, runs={4: "run-4"})
    service = Lifecycle(registry, copy)
    _start(service).join(20)
    assert (service.model.version, service.model.source, service.model.router.origin) == (4, "registry", "copy v4")
    assert registry.loads == [], "nothing downloaded"


def test_a_copy_that_cannot_route_gives_way_to_the_registry_at_once(tmp_path, routable, caplog):
    copy = FakeCopy(tmp_path / "serving", *SOURCE)
    copy.routes = False
    _keep(copy, tmp_path, 2, "run-2")
    registry = ControlledRegistry(tmp_path, alias_version=2, runs={2: "run-2"})
    service = Lifecycle(registry, copy)
    with caplog.at_level(logging.WARNING, logger="bentoml.mixllm"):
        _start(service).join(20)
    assert (service.model.version, service.model.source, service.model.router.origin) == (2, "registry", "registry v2")
    assert "does not route" in caplog.text


def test_with_polling_off_a_start_from_the_copy_asks_until_the_registry_answers(tmp_path, routable):
    copy = FakeCopy(tmp_path / "serving", *SOURCE)
    _keep(copy, tmp_path, 1, "run-1")
    registry = ControlledRegistry(tmp_path, alias_version=2, runs={1: "run-1", 2: "run-2"})
    registry.failures = 2  # the start's question and the first retry fail
    service = Lifecycle(registry, copy, poll_interval_s=0.0)
    thread = _start(service)
    assert _wait_for(lambda: service.model is not None and service.model.source == "registry", timeout_s=30)
    assert service.model.version == 2
    thread.join(5)
    assert not thread.is_alive()


def test_a_missing_alias_is_reported_once_per_outage_while_the_copy_serves(tmp_path, routable, caplog):
    copy = FakeCopy(tmp_path / "serving", *SOURCE)
    _keep(copy, tmp_path, 3, "run-3")
    registry = ControlledRegistry(tmp_path, alias_version=None, runs={3: "run-3"})
    service = Lifecycle(registry, copy, poll_interval_s=0.01)
    polls = []
    asked = registry.alias_version
    registry.alias_version = lambda alias: polls.append(alias) or asked(alias)
    with caplog.at_level(logging.ERROR, logger="bentoml.mixllm"):
        thread = _start(service)
        assert _wait_for(lambda: len(polls) >= 20)
        registry.alias = 3  # promoted: the registry confirms the copy
        assert _wait_for(lambda: service.model.source == "registry")
        service.model = LoadedModel(service.model.router, 3, "local copy")  # a restart serving the copy again
        registry.alias = None
        seen = len(polls)
        assert _wait_for(lambda: len(polls) >= seen + 20)
        service._stop.set()
        thread.join(5)
    reports = [r for r in caplog.records if "has no 'champion' version" in r.getMessage()]
    assert len(reports) == 2, f"one report per outage, not one per poll ({len(reports)} in {len(polls)} polls)"


def test_replicas_committing_at_once_leave_the_copy_the_note_names(tmp_path):
    """Replicas of one project share the served copy. Each commits the version it serves when it
    loads one, so commits can overlap (an alias move reaches every replica within one poll). Whatever
    the overlap, the note must name a copy that is there: overlapping commits used to delete each
    other's folders and leave a note naming none."""
    copies = [ServedCopy(tmp_path / "serving", *SOURCE) for _ in range(6)]
    # Replica r commits versions r+1, r+2, ... (mod 5): at any moment the replicas commit different ones.
    versions = [[(r + i) % 5 + 1 for i in range(5)] for r in range(len(copies))]
    staged = [[copy.stage(_router_folder(tmp_path, f"download-{r}-{v}", f"v{v}")) for v in versions[r]]
              for r, copy in enumerate(copies)]
    start, failures = threading.Barrier(len(copies)), []

    def replica(r):
        start.wait()
        try:
            for v, staging in zip(versions[r], staged[r]):
                copies[r].commit(staging, v, f"run-{v}")
        except Exception as exc:  # noqa: BLE001 - the test reports what a replica met
            failures.append(repr(exc))

    threads = [threading.Thread(target=replica, args=(r,)) for r in range(len(copies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    version = copies[0].version()
    assert version is not None
    assert (copies[0].folder / f"version-{version}" / "router.json").read_text() == f"v{version}"
    assert sorted(p.name for p in copies[0].folder.iterdir()) == [NOTE, f"version-{version}"]

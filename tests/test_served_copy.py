"""The service's local copy of the version it serves (mixllm/served_copy.py): which copy a restart may
use, and what it does with one it cannot. Serving from it, and the registry's answer afterwards,
are tested against the real service in test_service.py."""

import json
import logging

from mixllm.served_copy import NOTE, ServedCopy

SOURCE = ("sqlite:////projects/a/mlflow.db", "mixllm-router", "champion")


def _router_folder(tmp_path, name, text):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "router.json").write_text(text)
    return folder


def test_the_note_names_the_version_copied_and_older_copies_go(tmp_path):
    copy = ServedCopy(tmp_path / "serving", *SOURCE)
    assert copy.version() is None, "no copy yet"
    copy.save(_router_folder(tmp_path, "v1", "one"), 1)
    assert copy.version() == 1
    assert (tmp_path / "serving" / "version-1" / "router.json").read_text() == "one"
    copy.save(_router_folder(tmp_path, "v3", "three"), 3)
    assert copy.version() == 3
    assert sorted(p.name for p in (tmp_path / "serving").iterdir()) == [NOTE, "version-3"], \
        "one copy is kept, and no staging folder is left behind"


def test_a_copy_of_another_registry_model_or_alias_is_never_used(tmp_path):
    ServedCopy(tmp_path / "serving", *SOURCE).save(_router_folder(tmp_path, "v1", "one"), 1)
    uri, name, alias = SOURCE
    for other in ((uri.replace("/a/", "/b/"), name, alias), (uri, "another-router", alias), (uri, name, "challenger")):
        assert ServedCopy(tmp_path / "serving", *other).version() is None, other
        assert ServedCopy(tmp_path / "serving", *other).load() is None, other


def test_an_unreadable_note_or_copy_means_waiting_for_the_registry(tmp_path, caplog):
    folder = tmp_path / "serving"
    copy = ServedCopy(folder, *SOURCE)
    copy.save(_router_folder(tmp_path, "v2", "not a router"), 2)
    with caplog.at_level(logging.WARNING, logger="bentoml.mixllm"):
        assert copy.load() is None, "a copy that does not load is passed over"
    assert "the served copy of version 2" in caplog.text and "starting from the registry" in caplog.text

    caplog.clear()
    (folder / NOTE).write_text("{half a note")
    with caplog.at_level(logging.WARNING, logger="bentoml.mixllm"):
        assert copy.version() is None
    assert "cannot be read" in caplog.text

    for version in (0, -1, "2", True, None):
        note = {"tracking_uri": SOURCE[0], "registered_model_name": SOURCE[1], "alias": SOURCE[2], "version": version}
        (folder / NOTE).write_text(json.dumps(note))
        assert copy.version() is None, version

"""The plugin contract: discovery through entry points, allow-lists, isolation of broken plugins."""

import importlib.metadata
import inspect
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tapio_core import ObserverSpec, SinkSpec, hookimpl, hookspecs
from tapio_core.plugins import PluginError, load_plugins, parse_plugin_list

HOOK_NAMES = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("tapio_"))


class FakeEntryPoint:
    def __init__(self, name, loader, dist=None):
        self.name, self.value, self._loader, self.dist = name, f"fake:{name}", loader, dist

    def load(self):
        return self._loader()


def fake_entry_points(monkeypatch, *points):
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: list(points) if group == "tapio" else [])


def observer_plugin(name):
    module = types.ModuleType(f"fake_{name}")

    @hookimpl
    def tapio_register_observers(register):
        register(ObserverSpec(name=name, bpf_source=Path("x.bpf.c"), record_dtype=np.dtype("<u8"), tracepoints=()))

    module.tapio_register_observers = tapio_register_observers
    return module


def test_allow_list_loads_only_named_plugins(monkeypatch):
    fake_entry_points(monkeypatch, FakeEntryPoint("a", lambda: observer_plugin("a")),
                      FakeEntryPoint("b", lambda: observer_plugin("b")))
    assert set(load_plugins(allow={"a"}).observers) == {"a"}
    assert set(load_plugins(allow=None).observers) == {"a", "b"}


def test_allow_list_from_environment(monkeypatch):
    fake_entry_points(monkeypatch, FakeEntryPoint("a", lambda: observer_plugin("a")),
                      FakeEntryPoint("b", lambda: observer_plugin("b")))
    monkeypatch.setenv("TAPIO_LOAD_PLUGINS", "b")
    assert set(load_plugins().observers) == {"b"}


def test_plugin_tracing_sees_each_plugins_registration_call(monkeypatch, caplog):
    caplog.set_level("INFO", logger="tapio.plugins")
    fake_entry_points(monkeypatch, FakeEntryPoint("a", lambda: observer_plugin("a")),
                      FakeEntryPoint("b", lambda: observer_plugin("b")))
    monkeypatch.setenv("TAPIO_TRACE_PLUGINS", "1")
    assert set(load_plugins(allow=None).observers) == {"a", "b"}
    calls = [r.getMessage() for r in caplog.records
             if r.getMessage().split()[:2] == ["hook", "tapio_register_observers"]]
    assert len(calls) == 2, caplog.text  # one call per plugin, each seen by pluggy's tracing


def test_naming_a_plugin_that_is_not_installed_is_an_error(monkeypatch):
    fake_entry_points(monkeypatch, FakeEntryPoint("a", lambda: observer_plugin("a")))
    with pytest.raises(PluginError, match="not installed: nope"):
        load_plugins(allow={"a", "nope"})


def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_load(monkeypatch, caplog):
    def explode():
        raise ImportError("no module named shiny")

    fake_entry_points(monkeypatch, FakeEntryPoint("broken", explode), FakeEntryPoint("a", lambda: observer_plugin("a")))
    loaded = load_plugins(allow=None)
    assert set(loaded.observers) == {"a"}
    assert "no module named shiny" in loaded.failed["broken"]
    assert "broken" in caplog.text


def test_duplicate_observer_names_are_rejected_naming_both_plugins(monkeypatch):
    fake_entry_points(monkeypatch, FakeEntryPoint("one", lambda: observer_plugin("same")),
                      FakeEntryPoint("two", lambda: observer_plugin("same")))
    with pytest.raises(PluginError, match="'same' is declared by both plugin 'one' and plugin 'two'"):
        load_plugins(allow=None)


def test_duplicate_sink_names_are_rejected(monkeypatch):
    def sink_plugin():
        module = types.ModuleType("s")
        module.tapio_register_sinks = hookimpl(lambda register: register(SinkSpec(name="stdout")))
        return module

    fake_entry_points(monkeypatch, FakeEntryPoint("s1", sink_plugin), FakeEntryPoint("s2", sink_plugin))
    with pytest.raises(PluginError, match="sink 'stdout' is declared by both"):
        load_plugins(allow=None)


def test_misspelled_hook_is_caught(monkeypatch):
    def typo():
        module = types.ModuleType("typo")
        module.tapio_detect_anomalys = hookimpl(lambda observer, events: [])
        return module

    fake_entry_points(monkeypatch, FakeEntryPoint("typo", typo), FakeEntryPoint("a", lambda: observer_plugin("a")))
    loaded = load_plugins(allow=None)
    assert "unknown hook" in loaded.failed["typo"] and "tapio_detect_anomalys" in loaded.failed["typo"]
    assert set(loaded.observers) == {"a"}
    assert loaded.pm.get_plugin("typo") is None


def test_a_hook_with_an_argument_the_spec_lacks_leaves_only_that_plugin_out(monkeypatch):
    def wrong_arguments():
        module = observer_plugin("w")
        module.tapio_detect_anomalies = hookimpl(lambda observer, events, colour: [])
        return module

    fake_entry_points(monkeypatch, FakeEntryPoint("w", wrong_arguments),
                      FakeEntryPoint("a", lambda: observer_plugin("a")))
    loaded = load_plugins(allow=None)
    assert "colour" in loaded.failed["w"]
    assert set(loaded.observers) == {"a"}


def test_a_plugin_whose_registration_raises_declares_nothing_and_the_rest_load(monkeypatch):
    def half_broken():
        module = observer_plugin("h")  # registers an observer, then fails in its sinks hook

        def register_sinks(register):
            raise RuntimeError("config file missing")
        module.tapio_register_sinks = hookimpl(register_sinks)
        return module

    fake_entry_points(monkeypatch, FakeEntryPoint("h", half_broken), FakeEntryPoint("a", lambda: observer_plugin("a")))
    loaded = load_plugins(allow=None)
    assert loaded.failed["h"] == "RuntimeError: config file missing"
    assert set(loaded.observers) == {"a"} and "h" not in {i.name for i in loaded.info()}


def test_per_batch_hooks_reach_only_the_owning_plugin(monkeypatch):
    calls = []

    def detector(name):
        module = observer_plugin(name)
        module.tapio_detect_anomalies = hookimpl(lambda observer, events: calls.append(name) or [])
        return module

    fake_entry_points(monkeypatch, *(FakeEntryPoint(n, lambda n=n: detector(n)) for n in "abc"))
    loaded = load_plugins(allow=None)
    loaded.hook_for("tapio_detect_anomalies", "b")(observer=None, events=None)
    assert calls == ["b"]


def test_parse_plugin_list():
    assert parse_plugin_list(" network, stdout ,") == {"network", "stdout"}
    assert parse_plugin_list("") is None
    assert parse_plugin_list(None) is None


def test_installed_distributions_are_found_through_their_entry_points():
    loaded = load_plugins(allow=None)
    assert loaded.observers["network"][0] == "network"
    assert {"stdout", "file"} <= set(loaded.sinks)
    info = {i.name: i for i in loaded.info()}
    assert info["network"].distribution == "tapio-observer-network"
    assert "tapio_detect_anomalies" in info["network"].hooks


def test_every_hookspec_is_documented_and_tested():
    """Meta-test: each hook says when/with what/returns, and a test in tests/ names it."""
    here = Path(__file__)
    tests_text = "".join(p.read_text() for p in here.parent.glob("test_*.py") if p.name != here.name)
    readme = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()
    for name in HOOK_NAMES:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "Called" in doc, f"{name}'s docstring does not say when it is called"
        assert "Return" in doc, f"{name}'s docstring does not say what it returns"
        assert name in tests_text, f"no test mentions {name}"
        assert name in readme, f"docs/plugins.md does not document {name}"


def test_a_real_plugin_distribution_is_installed_and_found(tmp_path):
    """Build and pip-install a throwaway distribution; tapio finds it with no change to Tapio."""
    source = tmp_path / "src"
    (source / "tapio_sink_probe").mkdir(parents=True)
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "tapio-sink-probe"\nversion = "9.9"\n'
        '[project.entry-points.tapio]\nprobe = "tapio_sink_probe"\n'
    )
    (source / "tapio_sink_probe" / "__init__.py").write_text(
        "from tapio_core import SinkSpec, hookimpl\n"
        "@hookimpl\ndef tapio_register_sinks(register):\n    register(SinkSpec(name='probe'))\n"
    )
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target, source],
        check=True,
    )
    result = subprocess.run(
        [Path(sys.executable).with_name("tapio"), "plugins", "--json"],
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True,
    )
    import json

    probe = [p for p in json.loads(result.stdout) if p["name"] == "probe"]
    assert probe == [{"name": "probe", "distribution": "tapio-sink-probe", "version": "9.9",
                      "hooks": ["tapio_register_sinks"], "observers": [], "sinks": ["probe"], "enrichers": []}]

"""The registry: duplicate names refused, package scan and entry points, declared capabilities."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap

import pytest

from lowrank_geom.strategies import Strategy, base, discovered_strategies, get_strategy, register


def _strategy(name: str) -> type[Strategy]:
    return type("Fake", (Strategy,), {"name": name, "__module__": "fake_plugin"})


def test_a_taken_name_is_refused_with_both_classes_named(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    with pytest.raises(
        ValueError,
        match=r"'scaled_gd' is taken by lowrank_geom\.strategies\.scaled_gd\.ScaledGDStrategy; "
        r"fake_plugin\.Fake needs another name",
    ):
        register(_strategy("scaled_gd"))
    assert type(get_strategy("scaled_gd")).__module__ == "lowrank_geom.strategies.scaled_gd"


def test_the_same_class_registers_again_as_on_a_module_reload(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    first, again = _strategy("_test_reloaded"), _strategy("_test_reloaded")  # what a reload makes
    assert first is not again and register(first) is first and register(again) is again
    assert type(get_strategy("_test_reloaded")) is again


def test_every_module_of_a_package_is_imported_and_its_strategies_discovered(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_strategies"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mine.py").write_text(
        textwrap.dedent('''
        from lowrank_geom.strategies import Strategy, register

        @register
        class Mine(Strategy):
            """A strategy found by the package scan."""
            name = "_test_scanned"
    ''')
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_DISCOVERED", dict(base._DISCOVERED))
    package = importlib.import_module("fake_strategies")
    base.import_package_modules("fake_strategies", package.__path__)
    assert discovered_strategies()["_test_scanned"] == "fake_strategies.mine"
    monkeypatch.delitem(sys.modules, "fake_strategies.mine")
    monkeypatch.delitem(sys.modules, "fake_strategies")


def test_a_broken_entry_point_warns_and_the_rest_works(monkeypatch):
    eps = [
        importlib.metadata.EntryPoint("broken", "no_such_module_xyz", base.ENTRY_POINT_GROUP),
        importlib.metadata.EntryPoint("not_a_strategy", "os:getcwd", base.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: eps if group == base.ENTRY_POINT_GROUP else []
    )
    monkeypatch.setattr(base, "_entry_points_loaded", False)
    with pytest.warns(RuntimeWarning) as record:
        names = base.available_strategies()
    messages = " | ".join(str(w.message) for w in record)
    assert "entry point broken = no_such_module_xyz" in messages and "ModuleNotFoundError" in messages
    assert "entry point not_a_strategy = os:getcwd" in messages and "name a Strategy subclass" in messages
    assert "scaled_gd" in names


def test_row_sharding_is_declared_by_the_strategy():
    from lowrank_geom.distributed import row_shardable_strategies

    assert Strategy().row_sharding_requirements({}) is None  # the default: refuse row shards
    assert get_strategy("scaled_gd").row_sharding_requirements({}) == []
    assert get_strategy("scaled_adam").row_sharding_requirements({}) == []
    assert get_strategy("one_sided_adagrad").row_sharding_requirements({}) is None
    assert {"lora_rite", "scaled_adam", "scaled_gd"} <= set(row_shardable_strategies())
    with pytest.raises(TypeError, match="supports_row_sharding is no longer read; define row_sharding_requirements"):
        type("Old", (Strategy,), {"name": "_old", "supports_row_sharding": True})

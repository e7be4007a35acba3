"""The plugin system: hooks, registries, entry points, DD_LOAD_PLUGINS, `dd plugins`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_dist
from PIL import Image

from dd.api.backbones import Backbone
from dd.api.detectors import Detector
from dd.api.hookspecs import hookimpl
from dd.api.plugins import PluginHost, get_host, reset_host
from dd.errors import DDError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins" / "dd-example-plugin"


class _Det(Detector):
    name = "toy"

    @classmethod
    def load(cls, weights=None, *, device="cpu", dtype=torch.float32, **options):
        return cls()

    def logits(self, images):
        return images.mean(1, keepdim=True)


class _Backbone(Backbone):
    """A toy backbone."""

    name = "toy-backbone"

    @classmethod
    def from_pretrained(cls, model, **options):
        return cls()


def _module(name: str, **hooks) -> types.ModuleType:
    mod = types.ModuleType(name)
    for k, v in hooks.items():
        setattr(mod, k, hookimpl(v))
    return mod


def test_builtin_segformer_comes_through_the_entry_point():
    host = get_host()
    entry = host.detectors.entry("segformer")
    assert entry.plugin == "segformer"
    rec = host.records["segformer"]
    assert rec.builtin and rec.distribution == "dd-doctor"
    assert rec.module == "dd_plugins.segformer"
    assert "dd_register_detectors" in rec.hooks


def test_hook_dd_register_detectors():
    host = PluginHost(load_entrypoints=False)
    host.add(
        _module("p1", dd_register_detectors=lambda register: register(_Det, aliases=["toy-alias"])),
        name="p1",
    )
    host.fill()
    assert host.detectors.get("toy") is _Det
    assert host.detectors.get("toy-alias") is _Det
    assert host.detectors.entry("toy").plugin == "p1"
    assert host.info()[0]["registered"] == {"detectors": ["toy"]}


def test_hook_dd_register_backbones():
    host = PluginHost(load_entrypoints=False)
    host.add(_module("pb", dd_register_backbones=lambda register: register(_Backbone)), name="pb")
    host.fill()
    entry = host.backbones.entry("toy-backbone")
    assert entry.obj is _Backbone and entry.plugin == "pb"
    assert entry.description == "A toy backbone."


def test_hook_dd_register_commands(cli):
    def add(app):
        @app.command("toy-cmd")
        def toy_cmd(word: str = "hi") -> None:
            print(f"toy says {word}")

    host = PluginHost(load_entrypoints=False)
    host.add(_module("pc", dd_register_commands=add), name="pc")
    reset_host(host)
    res = cli("toy-cmd", "--word", "yo")
    assert res.exit_code == 0, res.output
    assert "toy says yo" in res.output
    assert host.records["pc"].registered["commands"] == ["toy-cmd"]


def test_name_clash_names_both_plugins():
    host = PluginHost(load_entrypoints=False)
    host.add(_module("first", dd_register_detectors=lambda register: register(_Det)), name="first")
    host.add(
        _module("second", dd_register_detectors=lambda register: register(_Det)), name="second"
    )
    with pytest.raises(
        DDError, match="'toy' is registered by plugin 'first' and again by plugin 'second'"
    ):
        host.fill()


def test_alias_clash_with_a_name():
    host = PluginHost(load_entrypoints=False)
    host.add(_module("a", dd_register_detectors=lambda register: register(_Det)), name="a")
    host.add(
        _module(
            "b",
            dd_register_detectors=lambda register: register(_Det, name="other", aliases=["toy"]),
        ),
        name="b",
    )
    with pytest.raises(DDError, match="name clash"):
        host.fill()


def test_registering_the_wrong_kind_is_refused():
    host = PluginHost(load_entrypoints=False)
    host.add(_module("bad", dd_register_detectors=lambda register: register(_Backbone)), name="bad")
    with pytest.raises(DDError, match="not a subclass of dd.api.detectors.Detector"):
        host.fill()
    host = PluginHost(load_entrypoints=False)
    host.add(
        _module("bad2", dd_register_detectors=lambda register: register(_Det, name="Bad Name")),
        name="bad2",
    )
    with pytest.raises(DDError, match="invalid name"):
        host.fill()


def test_command_clash_with_builtin(cli):
    def add(app):
        @app.command("detect")
        def detect() -> None:
            pass

    host = PluginHost(load_entrypoints=False)
    host.add(_module("evil", dd_register_commands=add), name="evil")
    reset_host(host)
    from dd.cli import build_app

    with pytest.raises(DDError, match="`dd detect` is defined by 'dd' and again by plugin 'evil'"):
        build_app()


def test_unknown_detector_lists_installed():
    with pytest.raises(DDError, match=r"unknown detector 'nope' \(installed: .*segformer"):
        get_host().detectors.get("nope")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site directory on sys.path where tests 'install' distributions."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def test_broken_plugin_warns_and_others_load(site, capsys):
    (site / "broken_plugin.py").write_text("raise ImportError('needs libfoo')\n")
    make_dist(site, "broken-plugin", "1.0", {"broken": "broken_plugin"})
    host = PluginHost()
    err = capsys.readouterr().err
    assert "dd plugin 'broken' (broken_plugin) failed to load: ImportError: needs libfoo" in err
    assert "broken" in host.failed
    host.fill()
    assert "segformer" in host.detectors


def test_dd_load_plugins_limits_third_party(site, monkeypatch):
    for n in ("one", "two"):
        (site / f"plug_{n}.py").write_text(
            "from dd.api.hookspecs import hookimpl\n"
            "@hookimpl\n"
            "def dd_register_commands(app):\n"
            f"    app.command('cmd-{n}')(lambda: None)\n"
        )
        make_dist(site, f"plug-{n}", "0.1", {n: f"plug_{n}"})
    monkeypatch.setenv("DD_LOAD_PLUGINS", "two")
    host = PluginHost()
    assert "two" in host.records and "one" not in host.records
    assert "segformer" in host.records  # built-ins always load
    monkeypatch.setenv("DD_LOAD_PLUGINS", "plug-one")  # distribution names work too
    assert "one" in PluginHost().records
    monkeypatch.setenv("DD_LOAD_PLUGINS", "")
    host = PluginHost()
    assert set(host.records) == {n for n, r in host.records.items() if r.builtin}


def _example_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    make_dist(site, "dd-example-plugin", "0.1.0", {"example": "dd_example_plugin"})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(EXAMPLE)])
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_example_plugin_installed_through_its_entry_point(tmp_path):
    """The example third-party package, installed via its entry point, in a real `dd`."""
    env = _example_env(tmp_path)
    dd = [sys.executable, "-m", "dd"]
    res = subprocess.run(
        [*dd, "plugins", "--json"], env=env, capture_output=True, text=True, check=True
    )
    info = {p["name"]: p for p in json.loads(res.stdout)["plugins"]}
    ex = info["example"]
    assert ex["version"] == "0.1.0" and ex["distribution"] == "dd-example-plugin"
    assert not ex["builtin"]
    assert ex["registered"] == {
        "backbones": ["auraflow"],
        "commands": ["clipping-info"],
        "detectors": ["clipping"],
    }
    assert ex["hooks"] == [
        "dd_register_backbones",
        "dd_register_commands",
        "dd_register_detectors",
    ]

    res = subprocess.run([*dd, "clipping-info"], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "low=0.02 high=0.98" in res.stdout

    # dd uses the detector it registered: a half-white image is flagged on the white half.
    arr = np.full((32, 48, 3), 128, np.uint8)
    arr[:, 24:] = 255
    Image.fromarray(arr).save(tmp_path / "half.png")
    out = tmp_path / "out"
    res = subprocess.run(
        [
            *dd,
            "detect",
            str(tmp_path / "half.png"),
            "--detector",
            "clipping",
            "--out",
            str(out),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)["images"][0]
    assert rec["max"] > 0.97 and rec["bbox"] == [24, 0, 48, 32]
    m = np.array(Image.open(out / rec["map"]))
    assert m[:, :23].max() < 5 and m[:, 25:].min() > 245

    # The table form names the plugin and its version.
    res = subprocess.run([*dd, "plugins"], env=env, capture_output=True, text=True, check=True)
    assert "example" in res.stdout and "0.1.0" in res.stdout


def test_plugins_table_and_json(cli):
    res = cli("plugins", "--json")
    assert res.exit_code == 0
    names = [p["name"] for p in json.loads(res.output)["plugins"]]
    assert "segformer" in names
    res = cli("plugins")
    assert res.exit_code == 0 and "segformer" in res.output and "built-in" in res.output

"""The root command line: help, version, env."""

from __future__ import annotations

import json

from dd import __version__


def test_help_lists_commands(cli):
    res = cli("--help")
    assert res.exit_code == 0
    for cmd in ("detect", "plugins", "env"):
        assert cmd in res.output


def test_version(cli):
    res = cli("--version")
    assert res.exit_code == 0 and __version__ in res.output


def test_env_json(cli):
    res = cli("env", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["versions"]["torch"] and info["versions"]["diffusers"]
    assert info["devices"][0]["device"] == "cpu"
    names = [k["name"] for k in info["kernels"]]
    assert any(n.startswith("reference") for n in names)
    assert all("available" in k for k in info["kernels"])
    res = cli("env")
    assert res.exit_code == 0 and "transformers" in res.output

"""The command-line contract, checked on every registered command (plugins' included).

Each leaf command is walked from the real root command as ``dd`` builds it, so a new
command is covered without anyone remembering to add it here:

* an unknown option -> click's short usage error (what is wrong, the usage line, "Try ...
  for help"), exit 2, no traceback;
* a value of the wrong type for a typed option -> the same, naming the option;
* a missing required argument or option -> the same, saying what is missing;
* a group without a subcommand prints its help (exit 0 or 2, as click does).
"""

from __future__ import annotations

import types

import pytest
import typer

from dd.api.hookspecs import hookimpl
from dd.api.plugins import PluginHost, reset_host
from dd.cli import build_app, main


def _plugin_commands(app: typer.Typer) -> None:
    """A third-party plugin's commands: one plain command and a group with a typed option."""

    @app.command("plug-cmd")
    def plug_cmd(target: str, count: int = 1) -> None:
        print(target * count)

    group = typer.Typer(name="plug-group", no_args_is_help=True)

    @group.command("sub")
    def sub(ratio: float = typer.Option(..., help="A required float.")) -> None:
        print(ratio)

    app.add_typer(group, name="plug-group")


def _host() -> PluginHost:
    """The installed plugins (built-ins through their entry points) plus one more."""
    host = PluginHost()
    plugin = types.ModuleType("plug")
    plugin.dd_register_commands = hookimpl(_plugin_commands)
    host.add(plugin, name="plug")
    return host


@pytest.fixture
def with_plugin():
    host = _host()
    reset_host(host)
    return host


def _walk(cmd, path=()):
    subs = getattr(cmd, "commands", None)
    if subs is None:
        yield path, cmd
        return
    yield path, cmd
    for name, sub in sorted(subs.items()):
        yield from _walk(sub, (*path, name))


def _tree():
    reset_host(_host())
    try:
        return list(_walk(typer.main.get_command(build_app())))
    finally:
        reset_host(None)


TREE = _tree()
LEAVES = [(p, c) for p, c in TREE if getattr(c, "commands", None) is None]
GROUPS = [(p, c) for p, c in TREE if getattr(c, "commands", None) is not None]


def test_the_walk_sees_every_command():
    names = {" ".join(p) for p, _ in LEAVES}
    for expected in ("detect", "treat", "label mine", "eval study serve", "refine train"):
        assert expected in names
    assert {"plug-cmd", "plug-group sub"} <= names


def _run(capsys, args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _usage_error(code, out, err, path, *words):
    assert code == 2, (path, code, out, err)
    assert "Traceback" not in err + out
    assert f"Usage: dd {' '.join(path)}".rstrip() in err, err
    assert "for help" in err, err
    for w in words:
        assert w in err, (w, err)


def _dummy_args(cmd):
    """Values for the required arguments (and required options) that parse."""
    args: list[str] = []
    for p in cmd.params:
        if p.param_type_name == "argument" and p.required:
            args.append("x")
    for p in cmd.params:
        if p.param_type_name == "option" and p.required:
            kind = p.bare_type() if hasattr(p, "bare_type") else "str"
            args += [p.opts[0], {"int": "1", "float": "0.5"}.get(kind, "x")]
    return args


def _typed_option(cmd):
    for p in cmd.params:
        if p.param_type_name != "option" or getattr(p, "is_flag", False):
            continue
        if getattr(p.type_descriptor, "is_choice", False):
            continue
        if p.bare_type() in ("int", "float"):
            return p
    return None


@pytest.mark.parametrize(("path", "cmd"), LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_usage_mistakes_are_short_errors(path, cmd, capsys, with_plugin):
    code, out, err = _run(capsys, [*path, "--no-such-option-xyz"])
    _usage_error(code, out, err, path, "No such option: --no-such-option-xyz")

    opt = _typed_option(cmd)
    if opt is not None:
        args = [a for a in _dummy_args(cmd)]
        code, out, err = _run(capsys, [*path, *args, opt.opts[0], "notanumber"])
        _usage_error(code, out, err, path, f"Invalid value for '{opt.opts[0]}")

    required = [p for p in cmd.params if p.required]
    if required:
        code, out, err = _run(capsys, list(path))
        _usage_error(code, out, err, path, "Missing")


@pytest.mark.parametrize(("path", "cmd"), GROUPS, ids=[" ".join(p) or "dd" for p, _ in GROUPS])
def test_groups_without_a_subcommand_print_help(path, cmd, capsys, with_plugin):
    code, out, err = _run(capsys, list(path))
    assert code in (0, 2)
    assert "Traceback" not in out + err
    assert "Commands:" in out + err and "Usage:" in out + err
    code, out, err = _run(capsys, [*path, "--help"])
    assert code == 0 and "Usage:" in out


@pytest.mark.parametrize("width", [80, 200])
def test_help_reads_well_at_any_width(width, capsys, with_plugin, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(width))
    for path, _ in LEAVES:
        code, out, err = _run(capsys, [*path, "--help"])
        assert code == 0, (path, err)
        assert "<bool>" not in out and "<str>" not in out and "<list" not in out, out
        assert "╭" not in out, out  # no Rich boxes
        assert max(len(line) for line in out.splitlines()) <= width, out


def test_brackets_in_help_survive(capsys):
    code, out, _ = _run(capsys, ["label", "mine", "--help"])
    assert code == 0
    assert "[keywords]" in out, out


def test_a_file_system_error_is_one_line(tmp_path, capsys, monkeypatch):
    """A file-system error the user can fix is one line, not a traceback."""
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "in" / "a.png")
    (tmp_path / "blocker").write_text("x")
    code, out, err = _run(
        capsys,
        ["detect", str(tmp_path / "in"), "--out", str(tmp_path / "blocker" / "sub")],
    )
    assert code == 1, err
    assert "cannot create the --out folder" in err
    # Any command: a permission error raised deep inside is one line too.
    import dd.cli.env as env_cli

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "/root/secret")

    monkeypatch.setattr(env_cli, "collect_env", denied, raising=False)
    code, out, err = _run(capsys, ["env"])
    assert code == 1, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("Error: "), err


def test_plugin_option_values_are_checked_before_the_plugin(capsys, tmp_path):
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "in" / "a.png")
    for opt, words in (
        ("seed=abc", "option seed='abc' of detector segformer must be an integer"),
        ("gradient_checkpointing=maybe", "must be true or false"),
    ):
        code, out, err = _run(capsys, ["detect", str(tmp_path / "in"), "-O", opt])
        assert code == 1, err
        assert words in err and "Traceback" not in err, err


def test_plugins_table_keeps_hook_names_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = _run(capsys, ["plugins"])
    assert code == 0
    assert "dd_register_backbones" in out and "dd_register_detectors" in out, out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_detector_options_are_spelled_alike_everywhere():
    """-O is --option and --detector-option on every command that takes detector options."""
    for path, cmd in LEAVES:
        for p in cmd.params:
            if "-O" in getattr(p, "opts", []):
                assert {"--option", "--detector-option"} <= set(p.opts), (path, p.opts)


@pytest.mark.parametrize("command", ["treat", "dreambooth"])
def test_every_setting_is_declared_once(command):
    """The config dataclass is the source of the command's options: each field (with its
    help) is one option, and the command has no option that is not a field (but --config)."""
    import dataclasses

    from dd.engines.dreambooth import DreamBoothConfig
    from dd.engines.treat import TreatConfig

    cls = {"treat": TreatConfig, "dreambooth": DreamBoothConfig}[command]
    cmd = dict(LEAVES)[(command,)]
    params = {p.name: p for p in cmd.params if p.param_type_name == "option"}
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
        assert params[f.name].help == f.metadata["help"]
    assert set(params) - {f.name for f in dataclasses.fields(cls)} == {"config"}


@pytest.mark.parametrize(
    "args",
    [
        ["treat", "--backbone", "flux", "--model", "nomodel", "--prompts", "missing.txt"]
        + ["--eval-prompts", "p.txt"],
        ["generate", "--backbone", "flux", "--model", "nomodel", "--prompts", "p.txt"],
    ],
)
def test_a_run_that_fails_on_its_inputs_leaves_no_output_folder(args, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, out, err = _run(capsys, [*args, "--out", "run"])
    finally:
        os.chdir(cwd)
    assert code == 1 and err.strip().splitlines()[-1].startswith("Error:"), err
    assert not (tmp_path / "run").exists()

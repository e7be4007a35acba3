"""Plugin option values are converted or refused against the loader's annotations."""

from __future__ import annotations

from typing import Any

import pytest

from dd.api.plugin_options import check_options
from dd.errors import DDError


def loader(
    weights=None,
    *,
    device="cpu",
    dtype=None,
    size: int = 512,
    scale: float = 1.0,
    flag: bool = False,
    name: str | None = None,
    either: int | str = 0,
    shape: list | None = None,
    anything: Any = None,
):
    pass


def strict(model, *, device="cpu", dtype=None, steps: int | None = None):
    pass


def open_ended(model, *, device="cpu", dtype=None, **options: Any):
    pass


def test_values_are_converted_to_the_declared_types():
    got = check_options(
        "detector",
        "toy",
        loader,
        {
            "size": 256,
            "scale": 2,
            "flag": "yes",
            "name": 7,
            "either": "x",
            "shape": [1, 2],
            "anything": {"a": 1},
        },
    )
    assert got == {
        "size": 256,
        "scale": 2.0,
        "flag": True,
        "name": "7",
        "either": "x",
        "shape": [1, 2],
        "anything": {"a": 1},
    }
    assert type(got["scale"]) is float
    assert check_options("detector", "toy", loader, {"either": 7}) == {"either": 7}
    assert check_options("detector", "toy", loader, {"name": None}) == {"name": None}


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("size", "abc", "option size='abc' of detector toy must be an integer"),
        ("size", 1.5, "must be an integer"),
        ("size", True, "must be an integer"),
        ("scale", "fast", "must be a number"),
        ("flag", "maybe", "must be true or false"),
        ("shape", "3x3", "must be a list"),
    ],
)
def test_values_that_do_not_fit_are_one_line_errors(key, value, words):
    with pytest.raises(DDError, match=words) as e:
        check_options("detector", "toy", loader, {key: value})
    assert "-O" in e.value.hint


def test_unknown_keys():
    with pytest.raises(DDError, match="unknown option 'stpes' for backbone toy") as e:
        check_options("backbone", "toy", strict, {"stpes": 3})
    assert e.value.hint == "its options: steps"
    # A loader with **options receives undeclared keys and checks them itself.
    assert check_options("backbone", "toy", open_ended, {"x": 1}) == {"x": 1}


def test_builtin_backbones_declare_their_option_types():
    from dd.api.plugins import get_host

    host = get_host()
    for name in ("flux", "sd3"):
        with pytest.raises(DDError, match="max_sequence_length='abc'.*integer or none"):
            check_options(
                "backbone",
                name,
                host.backbones.get(name).from_pretrained,
                {"max_sequence_length": "abc"},
            )
    for name in ("sd15", "sdxl"):
        got = check_options(
            "backbone", name, host.backbones.get(name).from_pretrained, {"negative_prompt": 5}
        )
        assert got == {"negative_prompt": "5"}

"""``--attention auto|sdpa|xformers|flash`` (issue 37): the choice goes through diffusers' own
mechanism (attention dispatch, or ``enable_xformers_memory_efficient_attention`` for the
older processors) and reaches the denoiser's attention processors; ``sdpa`` (and ``auto``)
samples exactly what the default does; a backend whose package is missing is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dd.api.plugins import get_host, load_backbone
from dd.errors import DDError, UsageError
from dd.testing.tiny import tiny_pipeline_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _generate(bb):
    with torch.no_grad():
        return bb.generate(["a red cat"], seeds=[0], height=64, width=64, steps=2,
                           guidance=1.0 if bb.name == "sd15" else None)  # fmt: skip


@pytest.mark.parametrize("name", ["flux", "sd15"])
def test_sdpa_and_auto_sample_what_the_default_does(name, tmp_path_factory):
    path = tiny_pipeline_path(name, tmp_path_factory)
    opts = {"max_sequence_length": 32} if name == "flux" else {}
    cls = get_host().backbones.get(name)
    default = _generate(cls.from_pretrained(str(path), **opts))
    for choice in ("sdpa", "auto"):
        bb = load_backbone(name, str(path), device="cpu", dtype=torch.float32, options=opts,
                           attention=choice)  # fmt: skip
        assert bb.attention == choice
        assert torch.equal(_generate(bb), default), choice


def test_the_choice_reaches_the_attention_processors(tmp_path_factory, monkeypatch):
    from diffusers.models import attention_dispatch

    path = tiny_pipeline_path("flux", tmp_path_factory)
    bb = get_host().backbones.get("flux").from_pretrained(str(path), max_sequence_length=32)
    procs = [m.processor for m in bb.denoiser.modules() if getattr(m, "processor", None)]
    assert procs
    assert bb.set_attention("sdpa") == "native"
    assert {str(p._attention_backend.value) for p in procs} == {"native"}
    # flash-attn is not installed here: one line naming the package
    with pytest.raises(DDError, match="--attention flash is not usable") as e:
        bb.set_attention("flash")
    assert "flash-attn" in e.value.hint
    # with the package's check satisfied, the processors take diffusers' flash backend
    monkeypatch.setattr(attention_dispatch, "_check_attention_backend_requirements", lambda b: None)
    monkeypatch.setattr(attention_dispatch, "_maybe_download_kernel_for_backend", lambda b: None)
    assert bb.set_attention("flash") == "flash"
    assert {str(p._attention_backend.value) for p in procs} == {"flash"}
    bb.set_attention("sdpa")
    assert {str(p._attention_backend.value) for p in procs} == {"native"}


def test_older_processors_refuse_flash_and_need_xformers(tmp_path_factory):
    path = tiny_pipeline_path("sd15", tmp_path_factory)
    bb = get_host().backbones.get("sd15").from_pretrained(str(path))
    with pytest.raises(DDError, match="do not use diffusers' attention dispatch"):
        bb.set_attention("flash")
    with pytest.raises(DDError, match="--attention xformers is not usable") as e:
        bb.set_attention("xformers")  # xformers is not installed here
    assert "xformers" in e.value.hint and "never installs" in e.value.hint
    with pytest.raises(UsageError, match="unknown --attention 'fast'"):
        bb.set_attention("fast")


def test_cli_attention(cli, tmp_path, tmp_path_factory):
    path = tiny_pipeline_path("flux", tmp_path_factory)
    (tmp_path / "p.txt").write_text("a red cat\n")
    common = ["generate", "--backbone", "flux", "--model", path, "--prompts",
              tmp_path / "p.txt", "--seeds", "1", "--resolution", "64", "--steps", "2",
              "-B", "max_sequence_length=32", "--device", "cpu"]  # fmt: skip
    a = cli(*common, "--out", tmp_path / "a")
    b = cli(*common, "--attention", "sdpa", "--out", tmp_path / "b")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ia = np.asarray(Image.open(tmp_path / "a" / "0000-seed0.png"))
    ib = np.asarray(Image.open(tmp_path / "b" / "0000-seed0.png"))
    assert np.array_equal(ia, ib)
    bad = cli(*common, "--attention", "fast", "--out", tmp_path / "c")
    assert bad.exit_code == 2 and "unknown --attention 'fast'" in bad.output
    flash = cli(*common, "--attention", "flash", "--out", tmp_path / "d")
    assert flash.exit_code == 1 and "flash-attn" in flash.output and "Traceback" not in flash.output
    treat = cli("treat", "--attention", "fast", "--backbone", "flux", "--model", path,
                "--prompts", tmp_path / "p.txt", "--eval-prompts", tmp_path / "p.txt",
                "--out", tmp_path / "t")  # fmt: skip
    assert treat.exit_code == 2 and "--attention" in treat.output


def test_refine_and_dreambooth_take_the_choice(cli, tmp_path, tmp_path_factory):
    """refine loads its models with the choice (flash: one line, nothing written);
    dreambooth refuses an unknown one as a usage error."""
    path = tiny_pipeline_path("flux", tmp_path_factory)
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    r = cli("refine", tmp_path / "in", "--backbone", "flux", "--model", path,
            "--late-steps", "500-1000", "--steps", "2", "-B", "max_sequence_length=32",
            "-O", "variant=tiny", "-O", "input_size=32", "--attention", "flash",
            "--out", tmp_path / "r")  # fmt: skip
    assert r.exit_code == 1 and "flash-attn" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r").exists()
    (tmp_path / "inst").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "inst" / "a.png")
    d = cli("dreambooth", "--backbone", "flux", "--model", path, "--instance-dir",
            tmp_path / "inst", "--instance-prompt", "a cat", "--out", tmp_path / "d",
            "--attention", "fast")  # fmt: skip
    assert d.exit_code == 2 and "unknown --attention 'fast'" in d.output

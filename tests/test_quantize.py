"""``--quantize int8|fp8|nf4`` and ``--optimizer adamw8bit``: a quantised frozen denoiser under
a trainable LoRA (dd.ops.quantize), on tiny FLUX and SD1.5 of the real classes, CPU.

Measured on this machine (the treat runs below, seeded; eval mean confidence, step 0 -> 10):
unquantised 0.5153 -> 0.3848 (gain 0.131); int8 0.5151 -> 0.3852 (0.130); fp8 0.5150 ->
0.3850 (0.130); nf4 0.5149 -> 0.3793 (0.136). The quantised runs must fall at least
``GAIN_SHARE`` of the unquantised run's gain, and start within ``START_TOL`` of its eval.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_treat import base_config, detector_dir, prompt_files, records, tiny_flux  # noqa: F401 - fixtures below come with it  # noqa: F401

from dd.api.plugins import get_host
from dd.engines.treat import treat
from dd.errors import DDError
from dd.ops.quantize import make_optimizer, parameter_bytes, quantize_module, quantized_mode
from dd.testing.tiny import tiny_pipeline_path

MODES = ["int8", "fp8", "nf4"]
GAIN_SHARE = 0.8
START_TOL = 0.005
RUN = dict(train_steps=10, lr=3e-2, batch_size=2, eval_every=5, save_every=5, eval_seeds=[0, 1])


#: Tiny models on a shared CPU run faster on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _evals(run) -> list[float]:
    return [r["mean"] for r in records(run) if r["type"] == "eval"]


@pytest.fixture(scope="module")
def flux_runs(tmp_path_factory, tiny_flux, detector_dir, prompt_files):  # noqa: F811
    """One treat run per mode (none included), the same seeds and settings."""
    root = tmp_path_factory.mktemp("quant-runs")
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests that resume them (float sums follow the threads)
    try:
        for mode in ["none", *MODES]:
            out = root / mode
            treat(base_config(tiny_flux, detector_dir, prompt_files, out, quantize=mode, **RUN))
            runs[mode] = out
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("mode", MODES)
def test_quantised_treat_lowers_confidence_like_the_unquantised_run(flux_runs, mode):
    base, quant = _evals(flux_runs["none"]), _evals(flux_runs[mode])
    assert abs(quant[0] - base[0]) <= START_TOL, (quant, base)
    assert quant[0] - quant[-1] >= GAIN_SHARE * (base[0] - base[-1]), (quant, base)
    config = (flux_runs[mode] / "config.toml").read_text()
    assert f'quantize = "{mode}"' in config


@pytest.mark.parametrize("mode", MODES)
def test_the_lora_loads_into_an_unquantised_pipeline(flux_runs, mode, tiny_flux):  # noqa: F811
    from diffusers import FluxPipeline

    plain = load_file(str(flux_runs["none"] / "pytorch_lora_weights.safetensors"))
    lora = load_file(str(flux_runs[mode] / "pytorch_lora_weights.safetensors"))
    assert lora.keys() == plain.keys()
    assert all(v.dtype == torch.float32 for v in lora.values())  # the LoRA stays fp32
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # it trained
    pipe = FluxPipeline.from_pretrained(str(tiny_flux))
    pipe.load_lora_weights(str(flux_runs[mode]))
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if "lora_" in n}
    assert len(loaded) == len(lora)
    # the values are the saved ones
    a = next(k for k in lora if "lora_A" in k)
    match = [p for n, p in loaded.items() if a.split("transformer.", 1)[1].replace(
        ".lora_A.weight", "") in n and "lora_A" in n]  # fmt: skip
    assert match and torch.equal(match[0].detach(), lora[a])


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_resume_after_stop_equals_the_uninterrupted_quantised_run(
    mode,
    flux_runs,
    tiny_flux,  # noqa: F811
    detector_dir,  # noqa: F811
    prompt_files,  # noqa: F811
    tmp_path,
):
    split = tmp_path / "split"
    treat(base_config(tiny_flux, detector_dir, prompt_files, split, quantize=mode,
                      stop_at=5, **RUN))  # fmt: skip
    resumed = treat(base_config(tiny_flux, detector_dir, prompt_files, split, quantize=mode,
                                resume=True, **RUN))  # fmt: skip
    assert resumed.step == 10
    a = load_file(str(flux_runs[mode] / "checkpoints" / "last" / "trainable.safetensors"))
    b = load_file(str(split / "checkpoints" / "last" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    # another --quantize is another run: refused like any changed setting
    with pytest.raises(DDError, match="quantize"):
        treat(base_config(tiny_flux, detector_dir, prompt_files, split, quantize="fp8",
                          resume=True, **RUN))  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_sd15_treat_runs_quantised(mode, tmp_path_factory, detector_dir, prompt_files, tmp_path):  # noqa: F811
    model = tiny_pipeline_path("sd15", tmp_path_factory)
    cfg = base_config(model, detector_dir, prompt_files, tmp_path / "run", backbone="sd15",
                      quantize=mode, train_steps=2, eval_every=2, eval_seeds=[0],
                      guidance=1.0, lr=3e-2)  # fmt: skip
    result = treat(cfg)
    assert result.step == 2
    train = [r for r in records(tmp_path / "run") if r["type"] == "train"]
    assert train and all(r["grad_norm"] > 0 for r in train)
    lora = load_file(str(result.lora))
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)


# ------------------------------------------------------------------------------------------
# The pieces
# ------------------------------------------------------------------------------------------
def test_parameter_memory_per_mode(tiny_flux):  # noqa: F811
    """On the tiny FLUX (most weights in linear layers); the mid-size figures are in
    docs/performance.md (dd bench quantize)."""
    flux = get_host().backbones.get("flux")
    bf16 = parameter_bytes(flux.from_pretrained(str(tiny_flux), dtype=torch.bfloat16).denoiser)
    for mode, most in (("int8", 0.75), ("fp8", 0.75), ("nf4", 0.55)):
        den = flux.from_pretrained(str(tiny_flux)).denoiser
        quantize_module(den, mode)
        assert quantized_mode(den) == mode
        assert parameter_bytes(den) <= most * bf16, mode


def test_quantised_backbone_moves_but_is_never_cast(tiny_flux):  # noqa: F811
    bb = get_host().backbones.get("flux").from_pretrained(str(tiny_flux))
    bb.quantize("int8")
    bb.to("cpu", torch.bfloat16)  # the other components are cast, the denoiser is not
    assert bb.pipe.vae.dtype == torch.bfloat16
    assert quantized_mode(bb.denoiser) == "int8"
    bb.add_lora(rank=2)
    with pytest.raises(DDError, match="before a LoRA"):
        bb.quantize("nf4")


def test_adamw8bit_keeps_8bit_states_for_large_tensors():
    big = torch.nn.Parameter(torch.randn(128, 64))
    opt = make_optimizer("adamw8bit", [big], lr=1e-3, weight_decay=0.0)
    assert type(opt).__name__ == "AdamW8bit"
    big.grad = torch.randn_like(big)
    before = big.detach().clone()
    opt.step()
    assert not torch.equal(before, big.detach())
    assert opt.state[big]["state1"].dtype == torch.uint8


def test_a_missing_library_is_one_line_naming_pip(monkeypatch):
    import builtins

    from dd.ops.quantize import check_available

    real = builtins.__import__

    def no_quanto(name, *a, **k):
        if name.startswith("optimum.quanto") or name == "bitsandbytes":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_quanto)
    monkeypatch.setattr("importlib.import_module", lambda name: no_quanto(name))
    with pytest.raises(DDError, match="pip install optimum-quanto"):
        check_available("int8")
    with pytest.raises(DDError, match="pip install bitsandbytes"):
        check_available("none", "adamw8bit")


def test_cli_usage_and_backbone_limits(cli, tmp_path, tiny_ldm):
    (tmp_path / "p.txt").write_text("a cat\n")
    base = ["treat", "--backbone", "flux", "--model", "m", "--prompts", tmp_path / "p.txt",
            "--eval-prompts", tmp_path / "p.txt", "--out", tmp_path / "t"]  # fmt: skip
    res = cli(*base, "--quantize", "int3")
    assert res.exit_code == 2 and "unknown --quantize 'int3'" in res.output
    res = cli(*base, "--optimizer", "sgd")
    assert res.exit_code == 2 and "unknown --optimizer 'sgd'" in res.output
    (tmp_path / "data").mkdir()
    res = cli("refine", "train", "--backbone", "ldm", "--init", tiny_ldm, "--late-steps",
              "500-750", "--data", tmp_path / "data", "--out", tmp_path / "rt",
              "--quantize", "int8")  # fmt: skip
    assert res.exit_code == 1 and "trains the whole denoiser" in res.output
    assert not (tmp_path / "rt").exists()


def test_dreambooth_and_refine_train_run_quantised(tmp_path, tmp_path_factory, cli):
    from PIL import Image

    sd15 = tiny_pipeline_path("sd15", tmp_path_factory)
    inst = tmp_path / "inst"
    inst.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(inst / f"{i}.png")
        (inst / f"{i}.txt").write_text("a photo of sks dog\n")
    res = cli("dreambooth", "--backbone", "sd15", "--model", sd15, "--instance-dir", inst,
              "--instance-prompt", "a photo of sks dog", "--out", tmp_path / "db",
              "--resolution", "64", "--train-steps", "2", "--quantize", "int8",
              "--optimizer", "adamw8bit", "--validation-every", "2", "--validation-seeds", "1",
              "--steps", "2")  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = (tmp_path / "db" / "config.toml").read_text()
    assert 'quantize = "int8"' in cfg and 'optimizer = "adamw8bit"' in cfg
    res = cli("refine", "train", "--backbone", "sd15", "--init", sd15, "--late-steps",
              "500-750", "--data", inst, "--out", tmp_path / "rt", "--resolution", "64",
              "--train-steps", "2", "--batch-size", "1", "--eval-every", "2",
              "--quantize", "int8")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "--quantize int8" in res.output
    assert json.loads((tmp_path / "rt" / "refine.json").read_text())["step"] == 2


def test_bench_quantize_meets_the_memory_targets(cli, tmp_path):
    out = tmp_path / "bq.json"
    res = cli("bench", "quantize", "--num-layers", "1", "--num-single-layers", "1",
              "--heads", "2", "--json", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    ratios = {r["mode"]: r["ratio_to_bf16"] for r in result["rows"]}
    assert ratios["none"] == 1.0
    assert ratios["int8"] <= 0.55 and ratios["fp8"] <= 0.55 and ratios["nf4"] <= 0.30
    assert all(t["met"] for t in result["targets"])
    res = cli("bench", "quantize", "--modes", "int3")
    assert res.exit_code == 2 and "unknown --modes" in res.output


def test_the_24gb_preset_sets_the_memory_options():
    from dd.engines.treat import TreatConfig
    from dd.runtime.config import load_preset

    preset, _ = load_preset("flux-dev-24gb", TreatConfig)
    assert preset["quantize"] == "nf4" and preset["optimizer"] == "adamw8bit"
    assert preset["gradient_checkpointing"] is True and preset["grad_steps"] == 1
    assert preset["dtype"] == "bf16"

"""``dd bench``: the measurements, the treat step's memory relations, the full-size FLUX path
on the meta device, and the three commands end to end at tiny sizes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dd.engines.bench import (
    bench_treat,
    count_flops,
    full_size_flux_setup,
    parse_grad_steps,
    peak_extra_memory,
    peak_tflops_for,
    set_checkpointing,
    tiny_treat_setup,
    treat_step,
)
from dd.errors import DDError

CPU = torch.device("cpu")
MIB = 2**20
#: A smaller denoiser than the CLI's default benchmark model, for speed.
SMALL_FLUX = {
    "num_layers": 2,
    "num_single_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "axes_dims_rope": (8, 12, 12),
}
# Deliberate copy: two benchmark model sizes, each spelled out (the keys are FLUX's).
#: Full-size FLUX code path at toy widths (the VAE keeps 4 levels: downsampling 8).
TOY_TRANSFORMER = {
    "num_layers": 1,
    "num_single_layers": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "axes_dims_rope": (4, 6, 6),
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
}
TOY_VAE = {"block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8}


def _allocate() -> None:
    a = torch.ones(1 << 20)  # 4 MiB
    b = torch.ones(1 << 19)  # 2 MiB, live together with a: peak 6 MiB
    del b
    c = torch.ones(1 << 18)  # 1 MiB, after b is gone
    del a, c


def test_allocator_peak_is_the_exact_tensor_peak():
    extra, total = peak_extra_memory(_allocate, CPU)
    assert total is None
    assert 6 * MIB <= extra < 6 * MIB + 64 * 1024


def test_parse_grad_steps():
    assert parse_grad_steps("1,2,all", 4) == [1, 2, 4]
    assert parse_grad_steps("all, 1, 1", 3) == [1, 3]
    for bad in ("0", "5", "x", ""):
        with pytest.raises(DDError):
            parse_grad_steps(bad, 4)


def test_peak_table():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4
    assert peak_tflops_for("NVIDIA H100 PCIe", torch.bfloat16) == 756.0
    assert peak_tflops_for("NVIDIA H200", torch.float16) == 989.4
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", torch.float32) is None
    assert peak_tflops_for("Some CPU", torch.bfloat16) is None


@pytest.fixture(scope="module")
def tiny_setup():
    return tiny_treat_setup("flux", device=CPU, steps=3, denoiser=SMALL_FLUX)


def test_checkpointed_step_has_the_naive_gradients(tiny_setup):
    """The modes differ in memory and time, not in what they compute."""
    lat = tiny_setup.latents(64)
    grads = {}
    for mode in ("naive", "blocks", "checkpointed"):
        set_checkpointing(tiny_setup, mode)
        tiny_setup.zero_grad()
        loss = treat_step(tiny_setup, 64, 2, lat)
        assert math.isfinite(float(loss))
        grads[mode] = torch.cat([p.grad.flatten() for p in tiny_setup.lora])
    tiny_setup.zero_grad()
    assert grads["naive"].abs().max() > 0
    for mode in ("blocks", "checkpointed"):
        torch.testing.assert_close(grads[mode], grads["naive"], rtol=1e-4, atol=1e-7)


def test_treat_memory_is_flat_in_k_with_checkpointing_and_grows_without(tiny_setup):
    result = bench_treat(
        tiny_setup,
        resolutions=[64],
        grad_steps=[1, 3],
        modes=["naive", "checkpointed"],
        repeat=1,
    )
    rows = {(r["mode"], r["grad_steps"]): r for r in result["rows"]}
    assert set(rows) == {("naive", 1), ("naive", 3), ("checkpointed", 1), ("checkpointed", 3)}
    for r in rows.values():
        assert r["status"] == "ok" and r["ms"] > 0 and r["peak_mib"] > 0 and r["flops"] > 0
        assert r["total_peak_mib"] is None and r["flop_fraction"] is None  # CPU: no peak
    ck1, ck3 = rows["checkpointed", 1]["peak_mib"], rows["checkpointed", 3]["peak_mib"]
    nv1, nv3 = rows["naive", 1]["peak_mib"], rows["naive", 3]["peak_mib"]
    assert ck3 <= 1.15 * ck1  # the target
    assert nv3 >= 1.3 * nv1  # naive keeps every tracked step's activations
    assert (nv3 - nv1) > 10 * max(ck3 - ck1, 0.01)
    assert ck3 < nv3
    # checkpointing recomputes: more FLOPs at the same K; more K, more FLOPs
    for k in (1, 3):
        assert rows["checkpointed", k]["flops"] > rows["naive", k]["flops"]
    assert rows["naive", 3]["flops"] > rows["naive", 1]["flops"]
    (target,) = result["targets"]
    assert target["met"] and target["value"] == pytest.approx(ck3 / ck1, abs=1e-3)
    growth = {g["mode"]: g for g in result["growth"]}
    assert growth["naive"]["mib_per_step"] > growth["checkpointed"]["mib_per_step"]
    assert result["model"]["lora_rank"] == 16 and result["model"]["lora_params"] > 0


def test_full_size_flux_builds_on_meta_without_memory():
    setup = full_size_flux_setup(device=torch.device("meta"))
    info = setup.info
    assert info["denoiser_params"] == 11_901_408_320  # FLUX.1-dev's transformer
    # rank 16 on 3072 x 3072 to_q/k/v/out.0: 4 per double block, 3 per single (no to_out)
    assert info["lora_params"] == 16 * (3072 + 3072) * (4 * 19 + 3 * 38)
    assert 83e6 < info["vae_params"] < 85e6  # FLUX.1's VAE: 83.8M
    assert 84e6 < info["detector_params"] < 86e6  # SegFormer MiT-b5
    assert info["dtype"] == "bfloat16"
    modules = (setup.backbone.denoiser, setup.backbone.vae, setup.detector)
    assert all(p.is_meta for m in modules for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in setup.lora)  # LoRA kept in fp32
    assert setup.cond["prompt_embeds"].shape == (1, 256, 4096)


def test_full_size_flops_on_meta_reduced_config():
    setup = full_size_flux_setup(
        device=torch.device("meta"),
        steps=2,
        transformer={"num_layers": 1, "num_single_layers": 1},  # real widths
        vae=TOY_VAE,
        detector_variant="tiny",
        detector_size=64,
    )
    result = bench_treat(
        setup, resolutions=[256], grad_steps=[1, 2], modes=["naive", "checkpointed"]
    )
    rows = {(r["mode"], r["grad_steps"]): r for r in result["rows"]}
    assert all(r["ms"] is None and r["peak_mib"] is None for r in rows.values())
    for k in (1, 2):
        assert rows["checkpointed", k]["flops"] > rows["naive", k]["flops"]
    assert rows["naive", 2]["flops"] > rows["naive", 1]["flops"]
    # at least two transformer forwards (untracked + tracked step) over the 256 image tokens
    params = setup.info["denoiser_params"]
    assert rows["naive", 1]["flops"] > 2 * 2 * params * (256 // 16) ** 2
    assert result["targets"] == []  # no memory measured on meta


def test_full_size_path_materialises_and_reports_the_flop_fraction():
    setup = full_size_flux_setup(
        device=CPU,
        dtype=torch.float32,
        steps=2,
        max_sequence_length=8,
        transformer=TOY_TRANSFORMER,
        vae=TOY_VAE,
        detector_variant="tiny",
        detector_size=64,
    )
    params = [p for m in (setup.backbone.denoiser, setup.detector) for p in m.parameters()]
    assert not any(p.is_meta for p in params)
    assert all(torch.isfinite(p).all() for p in params)
    loss = treat_step(setup, 64, 1, setup.latents(64))
    assert math.isfinite(float(loss))
    setup.zero_grad()
    result = bench_treat(
        setup,
        resolutions=[64],
        grad_steps=[1, 2],
        modes=["checkpointed"],
        repeat=1,
        peak_tflops=0.5,
    )
    for r in result["rows"]:
        expected = r["flops"] / (r["ms"] / 1e3) / 0.5e12
        assert r["flop_fraction"] == pytest.approx(expected, rel=1e-2, abs=1e-4)
    assert result["peak_tflops"] == 0.5 and result["targets"][0]["met"]


def test_count_flops_of_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


# ---------------------------------------------------------------------------------- CLI
def test_bench_help_lists_the_commands(cli):
    res = cli("bench", "--help")
    assert res.exit_code == 0
    for name in ("kernels", "treat", "detect"):
        assert name in res.output


def test_full_size_refuses_a_cpu_and_unknown_models(cli):
    res = cli("bench", "treat", "--full-size", "flux", "--device", "cpu")
    assert res.exit_code != 0 and "--device meta" in res.output
    res = cli("bench", "treat", "--full-size", "sd3", "--device", "meta")
    assert res.exit_code != 0 and "--full-size flux" in res.output


def test_cli_kernels(cli, tmp_path):
    out, png = tmp_path / "k.json", tmp_path / "k.png"
    res = cli(
        "bench", "kernels", "--device", "cpu", "--kernels", "cpp", "--batch", "2",
        "--sizes", "512", "--reductions", "mean,mse", "--repeat", "1",
        "--json", out, "--plot", png, "--markdown",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["kernels"] == ["reference", "cpp"] and result["memory_method"] == "cpu allocator"
    rows = {(r["reduction"], r["kernel"]): r for r in result["rows"]}
    assert rows["mean", "reference"]["peak_mib"] >= 2 * 512 * 512 * 4 / MIB  # the map at least
    assert rows["mean", "cpp"]["mem_ratio"] <= 0.25 and rows["mse", "cpp"]["mem_ratio"] <= 0.25
    assert "| 2 | 128² → 512² | mean |" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_treat_default_model(cli, tmp_path):
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    res = cli(
        "bench", "treat", "--device", "cpu", "--resolution", "64", "--steps", "2",
        "--grad-steps", "1,all", "--repeat", "1", "--no-flops", "--json", out, "--plot", png,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["model"]["denoiser_params"] == 17_752_128  # the documented CPU model
    assert [(r["mode"], r["grad_steps"]) for r in result["rows"]] == [
        ("naive", 1),
        ("naive", 2),
        ("checkpointed", 1),
        ("checkpointed", 2),
    ]
    assert result["targets"][0]["met"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_detect(cli, tmp_path):
    out = tmp_path / "d.json"
    res = cli(
        "bench", "detect", "--device", "cpu", "--variant", "tiny", "--input-size", "64",
        "--images", "3", "--size", "80", "--repeat", "1", "--batch-size", "2",
        "--workers", "2", "--json", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["outputs"] == {"released": 3, "dd detect": 3}
    ips = result["images_per_s"]
    assert result["speedup"] == pytest.approx(ips["dd detect"] / ips["released"], rel=1e-2)
    assert [r["approach"] for r in result["rows"]] == ["released", "dd detect"]
    assert result["targets"][0]["name"] == "dd detect / released throughput"
    assert result["targets"][0]["target"] == ">= 1.5"
    assert not result["full_size_outputs"] and result["dd_dtype"] in ("float32", "bfloat16")
    # the other rows of docs/performance.md: full-size PNG outputs in fp32
    res = cli(
        "bench", "detect", "--device", "cpu", "--variant", "tiny", "--input-size", "64",
        "--images", "2", "--size", "80", "--repeat", "1", "--full-size-outputs",
        "--dtype", "fp32", "--json", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["full_size_outputs"] and result["dd_dtype"] == "float32"
    assert "full-size outputs" in res.output


def test_unknown_kernel_names_are_refused(cli):
    res = cli("bench", "kernels", "--kernels", "bogus,cpp", "--device", "cpu", "--sizes", "8")
    assert res.exit_code == 1
    assert "unknown kernel(s) bogus" in res.output and "reference, cpp, cuda, triton" in res.output

"""``dd bench gpu`` (issue 37) on a machine without a GPU: the plan, the budget logic, the
isolation of each check in its own process and the report; the checks themselves need CUDA
and are skipped here with a reason naming the missing GPU."""

from __future__ import annotations

import json

from dd.engines.gpu_check import (
    CHECKS,
    FAIL,
    PASS,
    SKIP,
    Check,
    _subprocess_runner,
    gpu_markdown,
    run_gpu_check,
)


def test_without_a_gpu_every_check_is_skipped_with_the_reason(cli, tmp_path, monkeypatch):
    import torch

    import dd.engines.gpu_check as gpu_check

    if torch.cuda.is_available():  # on a GPU machine: as if there were none (no 8-min run)
        monkeypatch.setattr(gpu_check, "no_gpu_reason", lambda: "no CUDA GPU here (test)")
    r = cli("bench", "gpu", "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "g" / "gpu-check.json").read_text())
    assert [c["name"] for c in report["checks"]] == [
        "kernels",
        "pipelines",
        "flux-dev",
        "detect-b5",
    ]
    assert all(c["verdict"] == SKIP and "no CUDA GPU" in c["summary"] for c in report["checks"])
    assert r.output.count("SKIP") == 4
    md = (tmp_path / "g" / "gpu-check.md").read_text()
    assert "| kernels | skip |" in md
    again = cli("bench", "gpu", "--out", tmp_path / "g")
    assert again.exit_code == 1 and "already holds a gpu-check.json" in again.output
    assert cli("bench", "gpu", "--out", tmp_path / "g", "--overwrite").exit_code == 0
    assert cli("bench", "gpu", "--budget-s", "1").exit_code == 2


def test_the_checks_fit_the_default_budget_in_order_of_value():
    assert sum(c.estimate_s for c in CHECKS) <= 480
    assert [c.name for c in CHECKS][:2] == ["kernels", "pipelines"]


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_budget_skips_what_does_not_fit_and_a_failure_never_stops_the_rest(tmp_path):
    clock = _Clock()
    checks = (Check("a", "first", 10), Check("b", "crashes", 10), Check("c", "slow", 50),
              Check("d", "fails", 5), Check("e", "too big for what is left", 50))  # fmt: skip
    seen = []

    def runner(check, out_dir, left):
        seen.append((check.name, left))
        clock.t += {"a": 8, "b": 3, "c": 45, "d": 2}[check.name]
        if check.name == "b":
            raise RuntimeError("CUDA error: an illegal memory access")
        if check.name == "d":
            return {"verdict": FAIL, "summary": "2/6 kernel x dtype match", "rows": [{"x": 1}]}
        return {"verdict": PASS, "summary": "ok"}

    report = run_gpu_check(tmp_path, budget_s=100, checks=checks, runner=runner, clock=clock,
                           gpu_missing=None)  # fmt: skip
    got = {c["name"]: c for c in report["checks"]}
    assert [name for name, _ in seen] == ["a", "b", "c", "d"]
    assert [left for _, left in seen] == [100, 92, 89, 44]  # each gets what is left
    assert got["b"]["verdict"] == FAIL and "illegal memory access" in got["b"]["summary"]
    assert got["c"]["verdict"] == PASS and got["d"]["verdict"] == FAIL
    assert got["e"]["verdict"] == SKIP and "budget: needs ~50 s, 42 s left" in got["e"]["summary"]
    assert report["seconds"] == 58
    md = gpu_markdown(report)
    assert "## d: fails" in md and "| x |" in md  # each check's own table


def test_each_check_runs_in_its_own_process(tmp_path):
    # an unknown item fails inside the child, which still writes its result
    res = _subprocess_runner(Check("nope", "no such check", 1), tmp_path, 120)
    assert res["verdict"] == FAIL and "KeyError" in res["summary"]
    assert json.loads((tmp_path / "nope.json").read_text())["verdict"] == FAIL
    # a child that does not finish in the budget left is stopped and reported
    res = _subprocess_runner(Check("kernels", "k", 1), tmp_path, 0.01)
    assert res["verdict"] == FAIL and "timed out" in res["summary"]


def test_the_kernel_comparison_runs_with_the_cpu_kernel():
    """The GPU check's comparison code, run here with the C++ CPU kernel: every reduction,
    with and without target and weight, odd shapes, against the fp64 reference."""
    from dd.engines.gpu_check import check_kernels

    res = check_kernels(device="cpu", kernels=("cpp",), dtypes=("float32",), timing=False)
    assert res["verdict"] == PASS, res
    (row,) = res["rows"]
    assert row["kernel"] == "cpp" and row["loss rel. error"] < 1e-5


def test_the_pipeline_command_lines_run_on_the_cpu(one_torch_thread):
    """The command lines the GPU check runs (treat, detect, refine, generate), here on the
    CPU in fp32: a typo in them would otherwise surface only on a lent GPU."""
    from dd.engines.gpu_check import check_pipelines

    res = check_pipelines(device="cpu", dtypes=("fp32",), quantize=False)
    assert res["verdict"] == PASS, res["rows"]
    assert [r["run"] for r in res["rows"]] == [
        "treat fp32", "detect fp32", "refine fp32", "generate fp32"]  # fmt: skip

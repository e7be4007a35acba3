"""dd/training/loop.py: a toy recipe through `fit` (seconds): kill/resume equals the straight
run, gradient accumulation, best and patience, the step order's logging rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dd.errors import DDError
from dd.runtime.checkpoint import load_tensors, prepare_run_folder
from dd.runtime.device import run_accelerated
from dd.training.draws import noise_seed
from dd.training.loop import Evaluation, LoopSettings, Recipe, Setup, StepLoss, fit
from dd.training.setup import training_accelerator

TIMING = {"step_time_s"}
TARGET = torch.tensor([1.5, -2.0, 0.5, 3.0])


class Toy(Recipe):
    """Linear regression on seeded draws: every micro-batch is a function of the position."""

    log_keys = ("loss", "aux")

    def __init__(self, batch=4, scores=None, nan_at=None, crash_at=None, lr=0.05, aux_every=1):
        self.aux_every = aux_every
        self.batch, self.scores, self.nan_at, self.crash_at, self.lr = (
            batch, scores, nan_at, crash_at, lr,
        )  # fmt: skip
        self.evaluated: list[int] = []

    def initial_state(self):
        return {"position": 0}

    def setup(self, run):
        self.model = torch.nn.Linear(4, 1)  # initialised from the global RNG: seeded by fit
        params = list(self.model.parameters())
        opt = torch.optim.AdamW(params, lr=self.lr)
        return Setup(self.model, ["weight", "bias"], params, opt)

    def micro_batch(self, run, micro):
        first = run.state["position"] + micro * self.batch
        xs, ys = [], []
        for i in range(first, first + self.batch):  # one draw per sample
            g = torch.Generator().manual_seed(noise_seed(run.settings.seed, 1, i))
            xs.append(torch.randn(4, generator=g))
            ys.append(xs[-1] @ TARGET + 0.1 * torch.randn((), generator=g))
        return torch.stack(xs), torch.stack(ys)

    def loss(self, run, batch):
        step = run.state["step"] + 1
        if self.crash_at == step:
            raise KeyboardInterrupt  # a kill in the middle of a step
        x, y = batch
        loss = (run.wrapped(x).squeeze(1) - y).pow(2).mean()
        if self.nan_at == step:
            loss = loss * float("nan")
        logged = {"loss": loss}
        if step % self.aux_every == 0:  # a value some steps have (treat's reg loss)
            logged["aux"] = torch.tensor(float(step))
        return StepLoss(loss, logged)

    def end_step(self, run):
        run.state["position"] += self.batch * run.settings.grad_accum

    def evaluate(self, run):
        step = run.state["step"]
        self.evaluated.append(step)
        score = self.scores[step] if self.scores else float(self.model.weight.detach().norm())
        return Evaluation({"type": "eval", "step": step, "score": score}, score=score,
                          eligible=step > 0, summary=f"score {score:.3f}")  # fmt: skip

    def save_best(self, run, folder, evaluation):
        (folder / "step.txt").write_text(str(run.state["step"]))

    def finish(self, run, reason):
        return float(self.model.weight.detach().norm())


def go(out: Path, recipe=None, resume=False, **kw):
    recipe = recipe or Toy()
    settings = LoopSettings(**{"train_steps": 8, "save_every": 3, "eval_every": 4, **kw})
    last = prepare_run_folder(out, resume, "toy", ("checkpoints", "metrics.jsonl"))

    class Runner:
        world = 1

        def run(self):  # accelerate's state is reset after each run (run_accelerated)
            recipe.acc = training_accelerator("cpu", "no")
            return fit(recipe, settings, out, resume_from=last)

    return run_accelerated(Runner)


def lines(out: Path) -> list[dict]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def ckpt(out: Path):
    last = out / "checkpoints" / "last"
    return load_file(str(last / "trainable.safetensors")), load_tensors(last / "state.pt")


def assert_same_run(a: Path, b: Path):
    (wa, sa), (wb, sb) = ckpt(a), ckpt(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    for i in oa:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)
    assert lines(a) == lines(b)


def test_stop_and_resume_equals_the_straight_run(tmp_path):
    kw = dict(log_every=3, grad_accum=2)
    straight = go(tmp_path / "a", **kw)
    assert straight.step == 8 and straight.stop_reason == "reached --train-steps 8"
    first = go(tmp_path / "b", stop_at=5, **kw)
    assert first.step == 5 and "continue with --resume" in first.stop_reason
    # no train line at --stop-at: the window (2 steps) is carried in the checkpoint
    assert [r["step"] for r in lines(tmp_path / "b") if r["type"] == "train"] == [3]
    second = go(tmp_path / "b", resume=True, **kw)
    assert second.step == 8
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert [r["step"] for r in lines(tmp_path / "a") if r["type"] == "train"] == [3, 6, 8]


def test_a_kill_mid_step_resumes_exactly_and_drops_the_lines_after_the_checkpoint(tmp_path):
    go(tmp_path / "a", log_every=1)
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "b", Toy(crash_at=8), log_every=1)  # checkpoint at 6; lines of 7 written
    assert max(r["step"] for r in lines(tmp_path / "b")) == 7
    go(tmp_path / "b", resume=True, log_every=1)
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_lr_logged_is_the_lr_the_step_used(tmp_path):
    go(tmp_path / "a", warmup_steps=4, log_every=1)
    lrs = [r["lr"] for r in lines(tmp_path / "a") if r["type"] == "train"]
    assert lrs[:5] == pytest.approx([0.05 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0)])
    train = [r for r in lines(tmp_path / "a") if r["type"] == "train"]
    assert all(r["grad_norm"] is None for r in train)  # no clipping asked
    assert lines(tmp_path / "a")[-1] == {
        "type": "stop",
        "step": 8,
        "reason": "reached --train-steps 8",
    }


def test_a_value_some_steps_lack_is_averaged_over_the_steps_that_have_it(tmp_path):
    go(tmp_path / "a", Toy(aux_every=3), log_every=4)
    train = [r for r in lines(tmp_path / "a") if r["type"] == "train"]
    assert [(r["step"], r["aux"]) for r in train] == [(4, 3.0), (8, 6.0)]
    go(tmp_path / "b", Toy(aux_every=5), log_every=4)
    assert [r["aux"] for r in lines(tmp_path / "b") if r["type"] == "train"] == [None, 5.0]


def test_keep_checkpoints_prunes_the_oldest_step_folders(tmp_path):
    go(tmp_path / "a", train_steps=9, save_every=2, keep_step_checkpoints=True, keep_checkpoints=2)
    kept = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert kept == ["last", "step-6", "step-8"]


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    a = go(tmp_path / "a", Toy(batch=2), grad_accum=2, train_steps=3, save_every=3)
    b = go(tmp_path / "b", Toy(batch=4), train_steps=3, save_every=3)
    wa, wb = ckpt(tmp_path / "a")[0], ckpt(tmp_path / "b")[0]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    assert a.output == pytest.approx(b.output, rel=1e-5)


def test_best_and_patience(tmp_path):
    # scores at the evaluated steps 0, 2, 4, 6, 8: step 0 is not eligible, 2 is the first
    # best, 4 a better one, then two worse ones -> stop at 8
    scores = {0: 0.1, 2: 5.0, 4: 1.0, 6: 2.0, 8: 3.0}
    res = go(tmp_path / "a", Toy(scores=scores), eval_every=2, patience=2, train_steps=20)
    assert res.step == 8 and res.stop_reason == (
        "the evaluation score did not improve in 2 evaluations (best 1.00000 at step 4)"
    )
    assert (res.state["best"], res.state["best_step"]) == (1.0, 4)  # step 0: not eligible
    assert [r["best"] for r in lines(tmp_path / "a") if r["type"] == "eval"] == [
        False, True, True, False, False,
    ]  # fmt: skip
    assert (tmp_path / "a" / "best" / "step.txt").read_text() == "4"
    trainer = json.loads((tmp_path / "a" / "checkpoints" / "last" / "trainer.json").read_text())
    assert trainer["state"]["step"] == 8  # the stopping step is checkpointed


def test_higher_is_better(tmp_path):
    scores = {0: 0.0, 4: 1.0, 8: 0.5}
    res = go(tmp_path / "a", Toy(scores=scores), higher_is_better=True)
    assert res.state["best_step"] == 4


@pytest.mark.parametrize("step", [1, 3])
def test_a_non_finite_loss_stops_with_one_line(tmp_path, step):
    with pytest.raises(DDError, match=f"the loss became nan at step {step}"):
        go(tmp_path / "a", Toy(nan_at=step))


def test_evaluations_run_at_zero_every_n_and_at_the_end(tmp_path):
    toy = Toy()
    go(tmp_path / "a", toy, train_steps=10, eval_every=4)
    assert toy.evaluated == [0, 4, 8, 10]
    evals = [r["step"] for r in lines(tmp_path / "a") if r["type"] == "eval"]
    assert evals == [0, 4, 8, 10]


def test_patience_when_no_score_is_usable(tmp_path):
    nan = float("nan")
    res = go(tmp_path / "a", Toy(scores=dict.fromkeys(range(0, 21, 2), nan)), eval_every=2,
             patience=2, train_steps=20)  # fmt: skip
    assert res.step == 4 and res.stop_reason == (
        "the evaluation score did not improve in 2 evaluations (no evaluation had a usable score)"
    )


def test_loop_settings_take_the_config_fields_of_the_same_name():
    from dataclasses import dataclass

    from dd.training.loop import loop_settings

    @dataclass
    class Cfg:
        train_steps: int = 7
        seed: int = 3
        lr: float = 1.0  # not a loop setting
        eval_every: int = 2

    s = loop_settings(Cfg(), eval_every=5, title="x")
    assert (s.train_steps, s.seed, s.eval_every, s.title) == (7, 3, 5, "x")


def test_a_recipe_must_supply_setup_micro_batches_and_the_loss():
    class Incomplete(Recipe):
        def setup(self, run):
            return None

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()

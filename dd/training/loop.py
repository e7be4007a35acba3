"""The one training loop of dd: :func:`fit` runs a :class:`Recipe`.

A recipe supplies the model, the data and the objective (setup, micro-batches, the loss,
the end-of-step data positions, evaluation, extra checkpoint files, outputs); the loop owns
what every training job shares, written once:

* seeding (``accelerate.utils.set_seed`` before :meth:`Recipe.setup`, so the trainable
  weights' initialisation is a function of the seed), the learning-rate schedule
  (:func:`dd.training.schedule.lr_schedule`), ``accelerate.prepare`` and resume;
* one fixed step order: read the learning rate; for each micro-batch forward and backward
  of the loss divided by their number (``no_sync`` on all but the last: the accelerator
  is made with one accumulation step, :func:`dd.training.setup.training_accelerator`, so
  an epoch's end never forces a sync mid-step); clip; optimizer step; ``zero_grad``;
  :meth:`Recipe.after_optimizer_step` (e.g. EMA); scheduler step; :meth:`Recipe.end_step`
  (data positions); reduce the logged values across processes; refuse a non-finite one;
* ``metrics.jsonl`` (:func:`dd.training.outputs.open_metrics`): a ``train`` line every
  ``log_every`` steps (and at ``train_steps``) with the window's mean of each logged value,
  the learning rate of the step logged, its gradient norm and the window's mean step time;
  the window is part of the checkpoint and there is no extra line at ``--stop-at``, so a
  killed and resumed run writes the same lines as a straight one;
* evaluation at step 0, every ``eval_every`` steps and at ``train_steps``; the best score
  (``best/`` through :meth:`Recipe.save_best`) and patience;
* checkpoints (``OUT/checkpoints/last``, and ``step-N`` with ``keep_step_checkpoints``):
  ``trainable.safetensors``, the recipe's files, ``state.pt`` (optimizer, grad scaler),
  ``rng_rank*.pt`` and ``trainer.json`` (loop state, scheduler, world size, recipe's
  record), every ``save_every`` steps and where the run stops;
* the tracker (TensorBoard, W&B through accelerate) as a sink of ``metrics.jsonl``, the
  progress bar, the out-of-memory and non-finite-loss messages.
"""

from __future__ import annotations

import abc
import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dd.errors import DDError
from dd.runtime.checkpoint import (
    TRAINABLE_FILE,
    commit_checkpoint,
    load_optimizer_state,
    open_checkpoint,
    read_trainer_state,
    save_optimizer_state,
    swap_in,
    trainable_weights,
    write_trainer_state,
)
from dd.runtime.progress import QUIET, Reporter, as_reporter
from dd.runtime.tracking import RunTracker
from dd.training.outputs import open_metrics
from dd.training.schedule import lr_schedule

__all__ = [
    "Evaluation",
    "FitResult",
    "LoopSettings",
    "Recipe",
    "Run",
    "Setup",
    "StepLoss",
    "fit",
    "loop_settings",
]

OOM_HINT = "lower memory use: a smaller batch with --grad-accum, a lower resolution, bf16"
NONFINITE_HINT = "lower --lr, or train in fp32 or bf16"


@dataclass
class LoopSettings:
    """What the loop needs of a job's settings (each engine maps its options onto it)."""

    train_steps: int
    seed: int = 0
    grad_accum: int = 1
    clip_grad: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    log_every: int = 1
    #: Evaluate every N steps (and at step 0 and ``train_steps``); None: only those two.
    eval_every: int | None = None
    #: Evaluate the untrained weights at step 0.
    eval_at_start: bool = True
    #: Where :meth:`Recipe.save_best` writes, relative to the run folder.
    best_dir: str = "best"
    #: ``metrics.jsonl`` record types written before a step (:meth:`Recipe.before_step`):
    #: those of the checkpoint's step are written again by a resumed run.
    before_step_records: tuple[str, ...] = ()
    #: Seed each process differently (seed + process index), as accelerate offers.
    device_specific_seed: bool = False
    save_every: int = 100
    #: Keep ``checkpoints/step-N`` beside ``last`` at each ``save_every``.
    keep_step_checkpoints: bool = False
    stop_at: int | None = None
    #: Stop after this many evaluations without a better eligible score (None: never).
    patience: int | None = None
    higher_is_better: bool = False
    #: What the score is, for the patience message.
    score_name: str = "the evaluation score"
    report_to: str = "none"
    run_name: str = "dd-train"
    title: str = "train"
    oom_hint: str = OOM_HINT
    #: Shown after "out of GPU memory at step N", e.g. " (512px, batch 1)".
    oom_detail: str = ""
    #: For an out-of-memory error in an evaluation (default: ``oom_hint``, no detail).
    eval_oom_hint: str | None = None
    eval_oom_detail: str = ""
    nonfinite_hint: str = NONFINITE_HINT
    #: Keep only the newest N ``checkpoints/step-N`` folders (None: all).
    keep_checkpoints: int | None = None


def loop_settings(config: Any, **settings: Any) -> LoopSettings:
    """The :class:`LoopSettings` of a job: every field that ``config`` (an engine's config
    dataclass) has under the same name (``train_steps``, ``seed``, ``grad_accum``,
    ``clip_grad``, ``lr_schedule``, ``warmup_steps``, ``log_every``, ``save_every``,
    ``stop_at``, ``patience``, ``report_to``, ...), then ``settings``."""
    from dataclasses import fields

    names = {f.name for f in fields(LoopSettings)}
    found = {n: getattr(config, n) for n in names if hasattr(config, n) and n not in settings}
    return LoopSettings(**{**found, **settings})


@dataclass
class Setup:
    """What :meth:`Recipe.setup` builds: the module ``accelerate`` wraps (it must hold the
    trained parameters as submodules so DDP synchronises their gradients), the trained
    parameters by name, and their optimizer."""

    module: torch.nn.Module
    names: list[str]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    #: Other objects for ``accelerate.prepare`` (e.g. a DataLoader); the prepared ones are
    #: :attr:`Run.prepared`.
    extra: list[Any] = field(default_factory=list)


@dataclass
class StepLoss:
    """A micro-batch's loss to back-propagate and the values to log (``"loss"`` among them,
    e.g. DreamBooth logs the instance loss there and the prior loss beside it)."""

    loss: torch.Tensor
    logged: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Evaluation:
    """What :meth:`Recipe.evaluate` found: ``record`` goes to ``metrics.jsonl`` as it is;
    ``score`` (with ``eligible``) competes for ``best/``; ``stop`` ends the run with that
    reason; ``summary`` is shown in the progress bar."""

    record: dict[str, Any] | None = None
    score: float | None = None
    eligible: bool = True
    stop: str | None = None
    summary: str = ""


@dataclass
class FitResult:
    state: dict[str, Any]
    stop_reason: str
    records: list[dict[str, Any]]
    main: bool = True
    #: What :meth:`Recipe.finish` returned.
    output: Any = None

    @property
    def step(self) -> int:
        return int(self.state["step"])


@dataclass
class Run:
    """The running job as recipe hooks see it."""

    acc: Any
    out: Path
    settings: LoopSettings
    reporter: Reporter
    state: dict[str, Any]
    tracker: Any = None
    journal: Any = None
    setup: Setup | None = None
    wrapped: Any = None
    optimizer: Any = None
    scheduler: Any = None
    #: The values ``train`` lines log (:attr:`Recipe.log_keys`).
    log_keys: tuple[str, ...] = ("loss",)
    #: The last evaluation's :attr:`Evaluation.summary` (progress bar).
    eval_summary: str = ""
    #: :attr:`Setup.extra` after ``accelerate.prepare``.
    prepared: list[Any] = field(default_factory=list)
    #: True when patience ended the run.
    stopped_early: bool = False

    @property
    def main(self) -> bool:
        return bool(self.acc.is_main_process)

    @property
    def rank(self) -> int:
        return int(self.acc.process_index)

    @property
    def world(self) -> int:
        return int(self.acc.num_processes)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        assert self.setup is not None
        return self.setup.params

    def record(self, rec: dict[str, Any]) -> None:
        """Append ``rec`` to ``metrics.jsonl`` (main process) and the tracker."""
        if self.journal is not None:
            self.journal.append(rec)

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self.journal.records) if self.journal is not None else []


class Recipe(abc.ABC):
    """A training job's model, data and objective. Subclasses set :attr:`acc` (the
    accelerator the engine made) and implement :meth:`setup`, :meth:`micro_batch` and
    :meth:`loss`; the other hooks are optional (they do nothing by default)."""

    acc: Any
    #: Values the loop logs in ``train`` lines (missing ones are logged as null).
    log_keys: tuple[str, ...] = ("loss",)

    def initial_state(self) -> dict[str, Any]:
        """The recipe's part of the loop state (data positions...), saved in checkpoints."""
        return {}

    @abc.abstractmethod
    def setup(self, run: Run) -> Setup:
        """Add the trainable weights (after seeding) and build the optimizer."""

    @abc.abstractmethod
    def micro_batch(self, run: Run, micro: int) -> Any:
        """This process's micro-batch ``micro`` of the coming step."""

    @abc.abstractmethod
    def loss(self, run: Run, batch: Any) -> StepLoss:
        """Forward ``batch`` through ``run.wrapped``."""

    def before_step(self, run: Run) -> None:
        """Called before each step's first micro-batch."""
        return None  # optional hook

    def after_optimizer_step(self, run: Run) -> None:
        """Called once per step after the optimizer stepped (e.g. an EMA update)."""
        return None  # optional hook

    def end_step(self, run: Run) -> None:
        """Advance the data positions in ``run.state`` past this step's micro-batches."""
        return None  # optional hook

    def evaluate(self, run: Run) -> Evaluation | None:
        """Evaluate the current weights (step 0, every ``eval_every`` and at the end)."""
        return None

    def save_best(self, run: Run, folder: Path, evaluation: Evaluation) -> None:
        """Write the weights that just scored best into the empty ``folder`` (main process;
        the loop then swaps it in as ``OUT/best``)."""
        return None  # optional hook

    def after_evaluation(self, run: Run, evaluation: Evaluation, improved: bool) -> None:
        """Called after each evaluation was logged (``improved``: a new best)."""
        return None  # optional hook

    def save_weights(self, run: Run, folder: Path) -> None:
        """The trained weights in a checkpoint (main process): by default
        ``trainable.safetensors``, the trained parameters by name in float32."""
        from safetensors.torch import save_file

        assert run.setup is not None
        weights = trainable_weights(run.setup.names, run.setup.params)
        save_file(weights, str(folder / TRAINABLE_FILE))

    def load_weights(self, run: Run, folder: Path) -> None:
        """Read back :meth:`save_weights` into the trained parameters."""
        from safetensors.torch import load_file

        assert run.setup is not None
        try:
            weights = load_file(str(folder / TRAINABLE_FILE))
        except Exception as e:
            raise DDError(
                f"cannot read {folder / TRAINABLE_FILE}: {type(e).__name__}: {e}"
            ) from None
        names, params = run.setup.names, run.setup.params
        if sorted(weights) != sorted(names):
            raise DDError(
                f"the trained weights in {folder} do not match this run's",
                hint="resume with the original model and LoRA options",
            )
        with torch.no_grad():
            for name, p in zip(names, params, strict=True):
                p.copy_(weights[name].to(p.device, p.dtype))

    def train_fields(self, run: Run) -> dict[str, Any]:
        """Extra fields of ``train`` lines (e.g. the epoch)."""
        return {}

    def save_checkpoint(self, run: Run, folder: Path) -> None:
        """Extra files of a checkpoint (main process), e.g. EMA weights or the LoRA file."""
        return None  # optional hook

    def start(self, run: Run) -> None:
        """Called once ``metrics.jsonl`` is open, before the first step (or the step-0
        evaluation): e.g. a resumed run reads back what its evaluations compare against."""
        return None  # optional hook

    def load_checkpoint(self, run: Run, folder: Path, trainer: dict[str, Any]) -> None:
        """Read back :meth:`save_checkpoint`'s files; may refuse ``trainer.json``'s record."""
        return None  # optional hook

    def trainer_record(self, run: Run) -> dict[str, Any]:
        """Extra ``trainer.json`` fields (e.g. the settings a resume must keep)."""
        return {}

    def finish(self, run: Run, reason: str) -> Any:
        """Write the run's outputs (all processes call it); the value becomes
        :attr:`FitResult.output`."""
        return None


def fit(
    recipe: Recipe,
    settings: LoopSettings,
    out: str | Path,
    reporter: Reporter | None = None,
    *,
    resume_from: Path | None = None,
) -> FitResult:
    """Train ``recipe`` in the run folder ``out``, from the checkpoint ``resume_from`` if
    given (see :func:`dd.runtime.checkpoint.prepare_run_folder`); see the module docstring."""
    from accelerate.utils import set_seed

    acc = recipe.acc
    out = Path(out)
    rep = as_reporter(reporter) if acc.is_main_process else QUIET
    state: dict[str, Any] = {"step": 0, **recipe.initial_state(), "window": _new_window()}
    run = Run(acc, out, settings, rep, state, log_keys=tuple(recipe.log_keys))
    if acc.gradient_accumulation_steps != 1:
        raise ValueError("fit accumulates gradients itself: make the accelerator with 1 step")
    set_seed(settings.seed, device_specific=settings.device_specific_seed)
    run.setup = recipe.setup(run)
    schedule = lr_schedule(
        settings.lr_schedule, settings.train_steps, settings.warmup_steps, settings.min_lr_ratio
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(run.setup.optimizer, schedule)
    if resume_from is not None:
        _load_checkpoint(recipe, run, resume_from, scheduler)
    run.wrapped, run.optimizer, *run.prepared, run.scheduler = acc.prepare(
        run.setup.module, run.setup.optimizer, *run.setup.extra, scheduler
    )
    if resume_from is not None:
        load_optimizer_state(resume_from, run.optimizer, acc)
    if run.main:
        run.journal = open_metrics(
            out, state["step"], fresh=resume_from is None, rerun=settings.before_step_records
        )
    run.tracker = RunTracker(
        settings.report_to, out, settings.run_name, step=state["step"], main=run.main
    )
    if run.journal is not None:
        run.journal.on_append = run.tracker.record
    try:
        recipe.start(run)
        reason = _loop(recipe, run)
        run.record({"type": "stop", "step": state["step"], "reason": reason})
        rep.message(f"stopped at step {state['step']}: {reason}")
        acc.wait_for_everyone()
        output = recipe.finish(run, reason)
        records = run.records
    finally:
        if run.journal is not None:
            run.journal.close()
        run.tracker.close()
    acc.wait_for_everyone()
    return FitResult(state, reason, records, run.main, output)


# ------------------------------------------------------------------------------------------
def _new_window() -> dict[str, Any]:
    """Sums (and counts: a value may be missing from some steps) since the last log line."""
    return {"n": 0, "sums": {}, "counts": {}, "time_s": 0.0}


def _loop(recipe: Recipe, run: Run) -> str:
    s, state = run.settings, run.state
    stop_at = min(s.train_steps, s.stop_at or s.train_steps)
    if not isinstance(state.get("window"), dict):  # a checkpoint of an older dd
        state["window"] = _new_window()
    if state["step"] == 0 and s.eval_at_start:
        reason = _evaluate(recipe, run)
        if reason:
            return reason
    bar = run.reporter.progress(s.title, "{task.fields[info]}", "{task.fields[eval]}")
    reason = ""
    with bar:
        task = bar.add_task(s.title, total=s.train_steps, completed=state["step"], info="", eval="")
        while state["step"] < stop_at:
            t0 = time.perf_counter()
            values, lr, grad_norm = _guarded(
                run, "at step", s.oom_hint, s.oom_detail, lambda: _train_step(recipe, run)
            )
            state["step"] += 1
            step = state["step"]
            _window_add(run, values, time.perf_counter() - t0)
            bar.update(task, completed=step, info=f"loss {values['loss']:.4f}")
            if step % s.log_every == 0 or step == s.train_steps:
                _log_window(recipe, run, lr, grad_norm)
            if (s.eval_every and step % s.eval_every == 0) or step == s.train_steps:
                reason = _evaluate(recipe, run)
                bar.update(task, eval=run.eval_summary)
            if step == s.train_steps:
                reason = f"reached --train-steps {s.train_steps}"
            elif step == stop_at and not reason:
                reason = f"stopped at --stop-at {stop_at} (continue with --resume)"
            if step % s.save_every == 0 or reason:
                keep = s.keep_step_checkpoints and step % s.save_every == 0
                _save_checkpoint(recipe, run, keep_step=keep)
            if reason:
                break
    if not reason:  # resumed at or past the end
        reason = (
            f"reached --train-steps {s.train_steps}"
            if state["step"] >= s.train_steps
            else f"stopped at --stop-at {stop_at} (continue with --resume)"
        )
    return reason


def _guarded(run: Run, where: str, hint: str, detail: str, fn: Any) -> Any:
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        step = run.state["step"] + (where == "at step")
        raise DDError(f"out of GPU memory {where} {step}{detail}", hint=hint) from None


def _train_step(recipe: Recipe, run: Run) -> tuple[dict[str, float | None], float, float | None]:
    s, acc = run.settings, run.acc
    lr = float(run.scheduler.get_last_lr()[0])
    n = s.grad_accum
    total = torch.zeros((), device=acc.device)
    sums: dict[str, torch.Tensor] = {}
    grad_norm = None
    recipe.before_step(run)
    for micro in range(n):
        batch = recipe.micro_batch(run, micro)
        last = micro == n - 1
        with contextlib.nullcontext() if last else acc.no_sync(run.wrapped):
            out = recipe.loss(run, batch)
            acc.backward(out.loss / n)
        total += out.loss.detach().float() / n
        logged = out.logged or {"loss": out.loss}
        for key, value in logged.items():
            sums[key] = sums.get(key, torch.zeros((), device=acc.device)) + value.detach() / n
    if s.clip_grad > 0:
        grad_norm = float(acc.clip_grad_norm_(run.params, s.clip_grad))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    recipe.after_optimizer_step(run)
    run.scheduler.step()
    recipe.end_step(run)
    step = run.state["step"] + 1
    values: dict[str, float | None] = {"_total": float(acc.reduce(total, reduction="mean"))}
    for key in sorted(sums):
        values[key] = float(acc.reduce(sums[key].float(), reduction="mean"))
    for key, value in values.items():
        if value is not None and not math.isfinite(value):
            what = "loss" if key in ("_total", "loss") else key
            raise DDError(
                f"the {what} became {value} at step {step}", hint=run.settings.nonfinite_hint
            )
    values.pop("_total")
    for key in recipe.log_keys:
        values.setdefault(key, None)
    return values, lr, grad_norm


def _window_add(run: Run, values: dict[str, float | None], seconds: float) -> None:
    w = run.state["window"]
    w["n"] += 1
    w["time_s"] += seconds
    for key, value in values.items():
        if value is not None:
            w["sums"][key] = w["sums"].get(key, 0.0) + value
            w["counts"][key] = w["counts"].get(key, 0) + 1


def _log_window(recipe: Recipe, run: Run, lr: float, grad_norm: float | None) -> None:
    w = run.state["window"]
    n = max(1, w["n"])
    rec: dict[str, Any] = {"type": "train", "step": run.state["step"]}
    keys = list(dict.fromkeys([*run.log_keys, *w["sums"]]))
    for key in keys:
        rec[key] = w["sums"][key] / w["counts"][key] if key in w["sums"] else None
    rec.update(lr=lr, grad_norm=grad_norm, step_time_s=w["time_s"] / n)
    rec.update(recipe.train_fields(run))
    run.record(rec)
    run.state["window"] = _new_window()


def _evaluate(recipe: Recipe, run: Run) -> str:
    """Evaluate, log, keep the best score; returns a stop reason or ''.

    The loop state keeps ``best`` (score), ``best_step`` and ``bad_evals`` (evaluations
    after step 0 that did not improve, eligible or not), the schema treat's checkpoints
    have always had. A recipe's stop reason wins over patience."""
    s, state = run.settings, run.state
    hint = s.eval_oom_hint or s.oom_hint
    ev = _guarded(run, "evaluating at step", hint, s.eval_oom_detail, lambda: recipe.evaluate(run))
    if ev is None:
        return ""
    step = state["step"]
    improved = False
    if ev.score is not None:
        best = state.get("best")
        improved = (
            ev.eligible
            and math.isfinite(ev.score)
            and (best is None or (ev.score > best if s.higher_is_better else ev.score < best))
        )
        if improved:
            state["best"], state["best_step"], state["bad_evals"] = float(ev.score), step, 0
        elif step > 0:
            state["bad_evals"] = state.get("bad_evals", 0) + 1
        if ev.record is not None:
            ev.record["best"] = improved
    if improved:
        _save_best(recipe, run, ev)
    if ev.record is not None:
        run.record(ev.record)
    run.eval_summary = ev.summary
    recipe.after_evaluation(run, ev, improved)
    if ev.stop:
        return ev.stop
    if s.patience is not None and state.get("bad_evals", 0) >= s.patience:
        run.stopped_early = True
        best = state.get("best")
        where = (
            "no evaluation had a usable score"
            if best is None
            else f"best {best:.5f} at step {state['best_step']}"
        )
        return f"{s.score_name} did not improve in {s.patience} evaluations ({where})"
    return ""


def _save_best(recipe: Recipe, run: Run, ev: Evaluation) -> None:
    import shutil

    run.acc.wait_for_everyone()
    if run.main:
        final = run.out / run.settings.best_dir
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        recipe.save_best(run, tmp, ev)
        swap_in(tmp, final)
    run.acc.wait_for_everyone()


def _save_checkpoint(recipe: Recipe, run: Run, keep_step: bool) -> None:
    acc, state = run.acc, run.state
    ckpt_dir = run.out / "checkpoints"
    tmp = open_checkpoint(acc, ckpt_dir, state["step"])
    if run.main:
        recipe.save_weights(run, tmp)
        recipe.save_checkpoint(run, tmp)
        save_optimizer_state(tmp, run.optimizer, acc)
        write_trainer_state(tmp, state, run.scheduler, run.world, **recipe.trainer_record(run))
    # Every rank wrote its RNG state into tmp: only now is the checkpoint complete.
    acc.wait_for_everyone()
    if run.main:
        commit_checkpoint(tmp, ckpt_dir, state["step"], keep_step)
        if keep_step and run.settings.keep_checkpoints is not None:
            _prune(ckpt_dir, run.settings.keep_checkpoints)
    acc.wait_for_everyone()


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` ``step-N`` checkpoints."""
    import shutil

    steps = sorted(
        int(p.name.split("-", 1)[1])
        for p in ckpt_dir.glob("step-*")
        if p.is_dir() and p.name.split("-", 1)[1].isdigit()
    )
    for step in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(ckpt_dir / f"step-{step}", ignore_errors=True)


def _load_checkpoint(recipe: Recipe, run: Run, last: Path, scheduler: Any) -> None:
    trainer = read_trainer_state(last, run.world)
    recipe.load_checkpoint(run, last, trainer)
    recipe.load_weights(run, last)
    scheduler.load_state_dict(trainer["scheduler"])
    run.state.update(trainer["state"])
    run.reporter.message(f"resuming at step {run.state['step']} from {last}")

"""The settings several commands share, declared once: each function returns the
:func:`dd.runtime.config.setting` of one config field (flag, help, bound), so ``--lr`` or
``--save-every`` reads and checks the same in ``dd treat``, ``dd dreambooth``,
``dd refine train`` and ``dd train-detector``. A job passes its own default (and, where
the job gives the setting a more specific meaning, its own help)."""

from __future__ import annotations

from typing import Any

from dd.ops.attention import ATTENTION_CHOICES, ATTENTION_HELP
from dd.ops.quantize import OPTIMIZER_HELP, OPTIMIZERS, QUANTIZE_HELP, QUANTIZE_MODES
from dd.runtime.config import setting
from dd.runtime.tracking import REPORT_TO_HELP
from dd.training.schedule import SCHEDULES
from dd.training.setup import EMBEDDING_CACHE_HELP, PRECISIONS

#: The devices a training job runs on.
DEVICES = ("auto", "cpu", "cuda")

OVERWRITE_HELP = "Replace the run in --out (its checkpoints, metrics and {what}) with a new one."


# -- models and plugins ------------------------------------------------------------------------
def backbone_options(help: str = "Backbone option KEY=VALUE.") -> Any:
    return setting(factory=dict, flags=("--backbone-option", "-B"), text="options", help=help)


def detector_options(help: str = "Detector option KEY=VALUE (e.g. variant=b5).") -> Any:
    return setting(
        factory=dict, flags=("--option", "--detector-option", "-O"), text="options", help=help
    )


def detector(help: str = "Detector plugin (see `dd plugins`).") -> Any:
    return setting("segformer", help=help)


def inference_dtype() -> Any:
    return setting(
        "auto",
        help="auto (bf16 on GPUs and CPUs with native bf16, else fp32), fp32, bf16 or fp16.",
    )


def inference_device() -> Any:
    return setting("auto", help="auto, cpu, cuda, cuda:N or mps.")


def batch_size(default: int = 8, help: str = "Images per model call.") -> Any:
    return setting(default, min=1, help=help)


def workers(default: int = 4, help: str = "Threads decoding and writing.") -> Any:
    return setting(default, min=1, help=help)


def detector_weights(help: str = "Detector weights: file, folder or hub id.") -> Any:
    return setting(None, flags=("--detector-weights", "--weights"), help=help)


def model(help: str = "Diffusers folder, single .safetensors file or hub id of the model.") -> Any:
    return setting(None, help=help)


# -- the run folder ----------------------------------------------------------------------------
def run_folder(default: str | None = None, help: str = "Run folder.") -> Any:
    return setting(default, flags=("--out", "-o"), help=help)


def resume(help: str = "Continue the run in --out from its last checkpoint.") -> Any:
    return setting(False, help=help)


def overwrite(what: str = "model") -> Any:
    return setting(False, help=OVERWRITE_HELP.format(what=what))


# -- optimisation ------------------------------------------------------------------------------
def train_steps(default: int, help: str = "Optimizer steps in total.") -> Any:
    return setting(default, min=1, help=help)


def grad_accum(help: str = "Micro-batches accumulated per optimizer step.") -> Any:
    return setting(1, min=1, help=help)


def lr(default: float = 1e-4, help: str = "AdamW learning rate.") -> Any:
    return setting(default, help=help)


def weight_decay(default: float = 1e-2) -> Any:
    return setting(default, help="AdamW weight decay.")


def lr_schedule() -> Any:
    return setting("constant", help="constant or cosine (after warmup).", choices=SCHEDULES)


def warmup_steps(default: int | None = 0, help: str = "Linear warmup steps.") -> Any:
    return setting(default, min=0, help=help)


def clip_grad() -> Any:
    return setting(1.0, help="Clip the gradient norm (0: off).")


def quantize(help_prefix: str = "") -> Any:
    return setting("none", help=help_prefix + QUANTIZE_HELP, choices=QUANTIZE_MODES)


def optimizer() -> Any:
    return setting("adamw", help=OPTIMIZER_HELP, choices=OPTIMIZERS)


def dtype(help: str) -> Any:
    return setting("fp32", help=help, choices=tuple(PRECISIONS))


def device(help: str = "auto, cpu or cuda.") -> Any:
    return setting("auto", help=help, choices=DEVICES)


def attention() -> Any:
    return setting("auto", help=ATTENTION_HELP, choices=ATTENTION_CHOICES)


# -- memory ------------------------------------------------------------------------------------
def embedding_cache() -> Any:
    return setting(None, help=EMBEDDING_CACHE_HELP)


def offload_text_encoders(
    help: str = "Move the text encoders to the CPU once every prompt is embedded.",
) -> Any:
    return setting(True, help=help)


# -- logging and checkpoints -------------------------------------------------------------------
def report_to() -> Any:
    return setting("none", help=REPORT_TO_HELP)


def save_every(default: int) -> Any:
    return setting(default, min=1, help="Checkpoint every N steps.")


def log_every(default: int) -> Any:
    return setting(default, min=1, help="Log the loss every N steps.")


def stop_at() -> Any:
    return setting(
        None, min=1, help="Stop (with a checkpoint) at this step; continue later with --resume."
    )


def optimisation_checks(config: Any) -> list[tuple[bool, str]]:
    """The checks of the shared optimiser settings that a lower bound cannot say, for
    :func:`dd.runtime.config.check_settings`."""
    return [
        (config.lr > 0, "--lr must be above 0"),
        (config.clip_grad >= 0, "--clip-grad must be 0 (off) or more"),
        (config.weight_decay >= 0, "--weight-decay must be 0 or more"),
    ]

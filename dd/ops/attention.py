"""The attention kernel choice (``--attention``): names dd offers and the diffusers attention
backend each one means (:meth:`dd.api.backbones.Backbone.set_attention` applies it).

``auto`` is PyTorch's ``scaled_dot_product_attention`` (diffusers' ``native`` backend, which
picks its own flash or memory-efficient kernel on a GPU) until a GPU measurement of
``dd bench gpu`` shows another backend faster for a model (docs/performance.md).
"""

from __future__ import annotations

from dd.errors import UsageError

#: ``--attention`` choices.
ATTENTION_CHOICES = ("auto", "sdpa", "xformers", "flash")
#: diffusers' attention backend of each choice.
DIFFUSERS_BACKENDS = {"auto": "native", "sdpa": "native", "xformers": "xformers", "flash": "flash"}
ATTENTION_HELP = (
    "Attention kernel: auto (= sdpa until a GPU measurement says otherwise), sdpa (PyTorch's "
    "scaled_dot_product_attention), xformers or flash (diffusers' attention backends; their "
    "packages are not installed by dd)."
)


def backend_for(choice: str) -> str:
    """The diffusers attention backend of ``choice``; a usage error for an unknown one."""
    if choice not in DIFFUSERS_BACKENDS:
        raise UsageError(
            f"unknown --attention {choice!r}", hint=f"one of {', '.join(ATTENTION_CHOICES)}"
        )
    return DIFFUSERS_BACKENDS[choice]

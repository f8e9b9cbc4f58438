"""Which kernel computes each part of the model: one small config, resolved once per run.

    kernels = KernelChoices.parse("all=ours,attention=flash-attn")   # or KernelChoices()
    resolved = kernels.resolve("cuda")   # no "auto" left; an error if a choice cannot run there

The run plan (engine.training.run_plan) resolves the config's choices once, before any process group
exists; the layer specs and modules then take concrete values and never resolve again.

One vocabulary for every part, the same as csrc's ``impl=``: "ours" (our csrc/ Triton kernel),
"torch" (plain PyTorch: the csrc reference, or megatron's own module where megatron has one) and
"auto" (ours on CUDA, torch elsewhere: csrc.triton_support.ours_by_default). Attention also takes
"flash-attn" and "transformer-engine". Asking for a kernel that cannot run here is an error naming
the reason and the fix, never a silent switch, so a run measures what it names.

| field         | "ours" (csrc Triton)                                | "torch"                                   |
|---------------|-----------------------------------------------------|-------------------------------------------|
| attention     | csrc.attention (also "flash-attn", "transformer-engine") | csrc.attention reference             |
| rmsnorm       | csrc.rmsnorm                                        | csrc.rmsnorm reference                    |
| rope          | csrc.rope on q and k (RotaryKernelSelfAttention)    | megatron's apply_rotary_pos_emb           |
| swiglu        | csrc.swiglu as the MLP's activation module          | megatron's gated-unit silu                |
| cross_entropy | csrc.linear_cross_entropy: no [tokens, vocab] logits | megatron's output layer + vocab-parallel CE |
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from csrc.attention import TRITON_HEAD_DIMS
from csrc.select import ATTENTION_BACKENDS, attention_backend_available, select_attention_backend
from csrc.triton_support import (
    ours_by_default,
    triton_importable,
    triton_interpreting,
    triton_runs_on,
)

KERNEL_CHOICES = ("auto", "ours", "torch")
FIELD_CHOICES = {
    "attention": ATTENTION_BACKENDS,
    "rmsnorm": KERNEL_CHOICES,
    "rope": KERNEL_CHOICES,
    "swiglu": KERNEL_CHOICES,
    "cross_entropy": KERNEL_CHOICES,
}
PRESETS = ("auto", "ours", "torch")  # "all=ours" sets every field to "ours", and so on


@dataclass(frozen=True)
class KernelChoices:
    """The kernel behind each part of the model. Values are validated at construction."""

    attention: str = "auto"  # auto | ours | flash-attn | transformer-engine | torch
    rmsnorm: str = "auto"  # auto | ours | torch
    rope: str = "auto"
    swiglu: str = "auto"
    cross_entropy: str = "auto"

    def __post_init__(self):
        for name, allowed in FIELD_CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"kernels: {name}={value!r} is not one of {allowed}; "
                                 f"e.g. {name}='auto' picks ours on CUDA, torch on CPU")

    @classmethod
    def parse(cls, spec: str) -> "KernelChoices":
        """From "field=value,..." (command lines); "all=VALUE" sets every field first.

        "" is all-auto. Example: "all=ours,attention=flash-attn".
        """
        fields: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, value = item.partition("=")
            name, value = name.strip().replace("-", "_"), value.strip()
            if not sep:
                raise ValueError(f"kernels: {item!r} is not field=value; write e.g. 'attention=ours'")
            if name == "all":
                if value not in PRESETS:
                    raise ValueError(f"kernels: all={value!r} must be one of {PRESETS}")
                fields.update(dict.fromkeys(FIELD_CHOICES, value))
            elif name in FIELD_CHOICES:
                fields[name] = value
            else:
                raise ValueError(f"kernels: unknown field {name!r} in {spec!r}; "
                                 f"fields are {tuple(FIELD_CHOICES)} and 'all'")
        return cls(**fields)

    def describe(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    @property
    def resolved(self) -> bool:
        return "auto" not in dataclasses.astuple(self)

    def resolve(self, device: torch.device | str,
                head_dim: Optional[int] = None) -> "KernelChoices":
        """Concrete choices for ``device`` (and a model of ``head_dim``): no "auto" left, and
        each one able to run there.

        Raises ValueError naming the field, the reason and the fix.
        """
        device = torch.device(device)
        attention = select_attention_backend(self.attention, device)
        if attention == "ours" and head_dim is not None and head_dim not in TRITON_HEAD_DIMS:
            if self.attention == "ours":
                raise ValueError(
                    f"kernels: attention='ours' takes head dimensions {TRITON_HEAD_DIMS}, the "
                    f"model's is {head_dim}: use attention='auto' (flash-attn or the reference "
                    f"for this model) or 'torch'")
            # "auto" on a GPU: the next backend that takes any head dimension.
            attention = ("flash-attn" if attention_backend_available("flash-attn", device)[0]
                         else "torch")
        resolved = {"attention": attention}
        for name in ("rmsnorm", "rope", "swiglu", "cross_entropy"):
            value = getattr(self, name)
            if value == "auto":
                value = "ours" if ours_by_default(device) else "torch"
            elif value == "ours" and not triton_runs_on(device):
                raise ValueError(
                    f"kernels: {name}='ours' needs our Triton kernels, which cannot run on {device} "
                    f"(triton installed: {triton_importable()}, TRITON_INTERPRET set: "
                    f"{triton_interpreting()}); use {name}='torch' or 'auto', or set "
                    "TRITON_INTERPRET=1 before the first import of triton (tests only: it is slow)")
            resolved[name] = value
        return KernelChoices(**resolved)


def default_device() -> torch.device:
    """The device a run trains on: CUDA when present, else CPU (gloo layouts)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

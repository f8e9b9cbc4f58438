"""Which kernel computes each part of the model: one small config, resolved once per run.

    kernels = KernelChoices.parse("attention=ours,cross_entropy=fused")   # or KernelChoices()
    resolved = kernels.resolve("cuda")        # "auto" -> a concrete choice; errors if one cannot run
    config = transformer_config(model, layout, kernels=kernels)
    chunks = build_model_chunks(model, config, kernels=kernels)

"auto" means our csrc/ kernels on CUDA and the plain-PyTorch references on CPU (where the Triton
interpreter is far too slow for training). Asking for a kernel that cannot run here is an error
naming the reason and the fix, never a silent switch, so a run measures what it names.

Every choice maps to one slot of the layer spec or model:

| field         | "ours" (csrc Triton)                          | plain PyTorch                            |
|---------------|-----------------------------------------------|------------------------------------------|
| attention     | csrc.attention, also "flash-attn",            | "torch": csrc.attention reference        |
|               | "transformer-engine"                          |                                          |
| rmsnorm       | csrc.rmsnorm                                  | "torch": csrc.rmsnorm reference          |
| rope          | csrc.rope on q and k (RotaryKernelSelfAttention) | "torch": megatron's apply_rotary_pos_emb |
| swiglu        | csrc.swiglu as the MLP's activation module    | "torch": megatron's gated-unit silu      |
| cross_entropy | "fused": csrc.linear_cross_entropy, no logits | "megatron": output layer + vocab-parallel CE |
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from megatron.core.transformer.module import MegatronModule

from csrc.select import ATTENTION_BACKENDS, select_attention_backend
from csrc.triton_support import triton_importable, triton_interpreting

ELEMENTWISE_CHOICES = ("auto", "ours", "torch")
CROSS_ENTROPY_CHOICES = ("auto", "fused", "megatron")
FIELD_CHOICES = {
    "attention": ATTENTION_BACKENDS,
    "rmsnorm": ELEMENTWISE_CHOICES,
    "rope": ELEMENTWISE_CHOICES,
    "swiglu": ELEMENTWISE_CHOICES,
    "cross_entropy": CROSS_ENTROPY_CHOICES,
}
# What "all=ours" / "all=torch" sets each field to.
ALL_OURS = {"attention": "ours", "rmsnorm": "ours", "rope": "ours", "swiglu": "ours",
            "cross_entropy": "fused"}
ALL_TORCH = {"attention": "torch", "rmsnorm": "torch", "rope": "torch", "swiglu": "torch",
             "cross_entropy": "megatron"}


@dataclass(frozen=True)
class KernelChoices:
    """The kernel behind each part of the model. Values are validated at construction."""

    attention: str = "auto"  # auto | ours | flash-attn | transformer-engine | torch
    rmsnorm: str = "auto"  # auto | ours | torch
    rope: str = "auto"  # auto | ours | torch
    swiglu: str = "auto"  # auto | ours | torch
    cross_entropy: str = "auto"  # auto | fused | megatron

    def __post_init__(self):
        for name, allowed in FIELD_CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"kernels: {name}={value!r} is not one of {allowed}; "
                                 f"e.g. {name}={allowed[0]!r} picks ours on CUDA, PyTorch on CPU")

    @classmethod
    def parse(cls, spec: str) -> "KernelChoices":
        """From "field=value,..." (command lines); "all=ours" / "all=torch" set every field first.

        "" is all-auto. Example: "all=ours,attention=flash-attn".
        """
        fields: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, value = item.partition("=")
            name, value = name.strip().replace("-", "_"), value.strip()
            if not sep:
                raise ValueError(f"kernels: {item!r} is not field=value; write e.g. 'attention=ours'")
            if name == "all":
                presets = {"ours": ALL_OURS, "torch": ALL_TORCH, "auto": {}}
                if value not in presets:
                    raise ValueError(f"kernels: all={value!r} must be one of {tuple(presets)}")
                fields.update(presets[value])
            elif name in FIELD_CHOICES:
                fields[name] = value
            else:
                raise ValueError(f"kernels: unknown field {name!r} in {spec!r}; "
                                 f"fields are {tuple(FIELD_CHOICES)} and 'all'")
        return cls(**fields)

    def describe(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    def resolve(self, device: torch.device | str) -> "KernelChoices":
        """Concrete choices for ``device``: no "auto" left, and each one able to run there.

        Raises ValueError naming the field, the reason and the fix. Call it before setting up
        process groups, so a bad choice fails in seconds on every rank alike.
        """
        device = torch.device(device)
        ours_by_default = device.type == "cuda" and triton_importable()
        resolved = {"attention": select_attention_backend(self.attention, device)}
        for name in ("rmsnorm", "rope", "swiglu", "cross_entropy"):
            value = getattr(self, name)
            ours, plain = ("fused", "megatron") if name == "cross_entropy" else ("ours", "torch")
            if value == "auto":
                value = ours if ours_by_default else plain
            elif value == ours and not _triton_runs_on(device):
                raise ValueError(
                    f"kernels: {name}={value!r} needs our Triton kernels, which cannot run on {device} "
                    f"(triton installed: {triton_importable()}, TRITON_INTERPRET set: "
                    f"{triton_interpreting()}); use {name}={plain!r} or 'auto', or set "
                    "TRITON_INTERPRET=1 before the first import of triton (tests only: it is slow)")
            resolved[name] = value
        return KernelChoices(**resolved)


def _triton_runs_on(device: torch.device) -> bool:
    if not triton_importable():
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())


def csrc_impl(choice: str) -> str:
    """csrc's impl= for a resolved choice: "triton" for ours, "reference" for plain PyTorch."""
    return "triton" if choice in ("ours", "fused") else "reference"


def default_device() -> torch.device:
    """The device a run trains on: CUDA when present, else CPU (gloo layouts)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SummedTokenLoss(NamedTuple):
    """What the model returns when the fused output layer + cross-entropy computed the loss.

    loss_sum: fp32 scalar summed over counted tokens (differentiable); num_tokens: int scalar.
    The training step divides by the global batch's token count, as for per-token losses.
    """

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor


class SwiGLU(MegatronModule):
    """megatron MLP activation module: silu(gate) * up on fc1's output [gate; up] (csrc.swiglu).

    megatron's MLP hands a module activation the whole fc1 output only when
    ``config.use_te_activation_func`` is set (named after TE, but it is the spec slot for any
    activation module); transformer_config sets it when swiglu is ours. A MegatronModule because
    the MLP asks every child for its (here empty) sharded_state_dict when checkpointing.
    """

    def __init__(self, config, impl: str = "triton"):
        super().__init__(config=config)
        self.impl = impl

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        from csrc.swiglu import swiglu

        return swiglu(gate_up, impl=self.impl)

"""LoRA (Hu et al. 2021): frozen pre-trained weights plus trainable low-rank updates ΔW = (α/r)·B·A, through ``peft``.

Defaults are peft's and the paper's: rank r = 8, ``lora_alpha`` α = r (Hu et al. set α to the first r they try and
do not tune it), no adapter dropout. Targets (``target_modules``: peft names, exact or dotted suffixes) default per
backbone: every ``nn.Linear`` in the encoder when it has any (open_clip ViT: the MLP ``c_fc``/``c_proj`` of every
block; the attention projections of ``nn.MultiheadAttention`` are skipped, because its forward reads
``out_proj.weight`` directly and bypasses an adapter), else every 1x1 ``nn.Conv2d`` with ``groups == 1``
(EfficientNet-Lite0: the expand/project/head pointwise convolutions). The head trains fully (``train_head``).
BatchNorm statistics stay frozen so the encoder's buffers remain the pre-trained ones.

The run stores only ``<weight key>.lora_A`` / ``.lora_B`` per adapted layer (plus ``head.*`` when the head trains)
in ``adapter.safetensors``, with each layer's scaling α/r in the header; :meth:`LoRA.load_finetuned_state` merges
them into full weights, W + (α/r)·B·A, exactly as peft's ``merge``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from robustft.methods.base import Method, TrainingHyperparameters, check_same_keys, hyperparameter

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.trainer import TrainContext

ADAPTER = "default"


@dataclass
class LoRAHyperparameters(TrainingHyperparameters):
    rank: int = hyperparameter(8, "Adapter rank r.", minimum=1)
    lora_alpha: float = hyperparameter(8.0, "Adapter scaling alpha (update = alpha/r BA).", exclusiveMinimum=0)
    lora_dropout: float = hyperparameter(0.0, "Dropout on the adapter input.", minimum=0, maximum=0.99)
    target_modules: list[str] | None = hyperparameter(
        None, "Module name patterns to adapt (null = all encoder Linear layers, else 1x1 convs).")
    train_head: bool = hyperparameter(True, "Train the classification head fully alongside the adapters.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: expected a positive integer, got {self.rank!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]


def _inside_multihead_attention(model: nn.Module) -> set[str]:
    names = set()
    for parent_name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            names.update(f"{parent_name}.{n}" if parent_name else n for n, _ in module.named_modules() if n)
    return names


def default_lora_targets(model: nn.Module) -> list[str]:
    """Full names of the encoder layers to adapt: its Linear layers if any, else its pointwise (1x1) convolutions."""
    skip = _inside_multihead_attention(model)
    modules = [(n, m) for n, m in model.named_modules() if n.startswith("encoder.") and n not in skip]
    linears = [n for n, m in modules if isinstance(m, nn.Linear)]
    if linears:
        return linears
    convs = [n for n, m in modules if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
    if convs:
        return convs
    raise ValueError("lora: the encoder has no Linear or 1x1 Conv2d layer to adapt; set target_modules")


@contextmanager
def _plain_pointwise_convs(model: nn.Module) -> Iterator[None]:
    """Let peft build its adapters for 1x1 ``nn.Conv2d`` subclasses (e.g. EfficientNet's static-same-padding conv).

    peft creates ``lora_A``/``lora_B`` with ``type(base_layer)(...)``, which fails for subclasses with extra
    constructor arguments. A 1x1 convolution never needs "same" padding, so plain ``nn.Conv2d`` adapters are exact;
    the base layers get their own class back afterwards.
    """
    swapped = [
        (m, type(m)) for m in model.modules()
        if isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d and tuple(m.kernel_size) == (1, 1)
    ]
    for module, _ in swapped:
        module.__class__ = nn.Conv2d
    try:
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def lora_delta(lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """ΔW = scaling·B·A for a Linear (A: r×in, B: out×r) or a Conv2d (A: r×in×k×k, B: out×r×1×1), as peft."""
    if lora_a.dim() == 2:
        return (lora_b @ lora_a) * scaling
    if lora_a.dim() == 4 and lora_a.shape[2:] == (1, 1):
        return (lora_b.flatten(1) @ lora_a.flatten(1))[:, :, None, None] * scaling
    if lora_a.dim() == 4:
        return F.conv2d(lora_a.permute(1, 0, 2, 3), lora_b).permute(1, 0, 2, 3) * scaling
    raise ValueError(f"lora_delta: unsupported adapter shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers by the state-dict key of the weight they adapt (``<module name>.weight``)."""
    from peft.tuners.lora import LoraLayer

    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


class LoRA(Method):
    name = "lora"
    hyperparameters = LoRAHyperparameters
    checkpoint_file = "adapter.safetensors"
    freeze_norm_statistics = True

    def prepare(self, model: nn.Module, ctx: "TrainContext") -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import Conv2d as LoraConv2d
        from peft.tuners.lora import Linear as LoraLinear

        targets = list(self.hp.target_modules or default_lora_targets(model))
        config = LoraConfig(
            r=self.hp.rank, lora_alpha=self.hp.lora_alpha, lora_dropout=self.hp.lora_dropout,
            target_modules=targets, bias="none",
        )
        with _plain_pointwise_convs(model):  # peft freezes every non-adapter weight
            model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        self.layers = lora_layers(model)
        if not self.layers:
            raise ValueError(f"lora: target_modules {targets} matched no layer")
        skip = _inside_multihead_attention(model)
        for key, layer in self.layers.items():
            name = key[: -len(".weight")]
            if not isinstance(layer, (LoraLinear, LoraConv2d)) or name in skip:
                raise ValueError(
                    f"lora: layer {name!r} ({type(layer).__name__}) is not supported: only Linear and Conv2d layers "
                    "outside nn.MultiheadAttention can be adapted and merged"
                )
            if not name.startswith("encoder."):
                raise ValueError(f"lora: layer {name!r} is not in the encoder (the head trains fully: train_head)")
        model.head.requires_grad_(self.hp.train_head)
        return model

    def checkpoint_tensors(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Tensor]:
        out = {}
        for key, layer in self.layers.items():
            out[f"{key}.lora_A"] = layer.lora_A[ADAPTER].weight.detach().clone()
            out[f"{key}.lora_B"] = layer.lora_B[ADAPTER].weight.detach().clone()
        if self.hp.train_head:
            out["head.weight"] = model.head.weight.detach().clone()
            out["head.bias"] = model.head.bias.detach().clone()
        return out

    def checkpoint_metadata(self, model: nn.Module, ctx: "TrainContext") -> dict[str, str]:
        return {"lora_scaling": json.dumps({k: float(layer.scaling[ADAPTER]) for k, layer in self.layers.items()})}

    def summary(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Any]:
        return {"adapted_layers": sorted(k[: -len(".weight")] for k in self.layers)}

    @classmethod
    def load_finetuned_state(cls, reference_state: Mapping[str, Tensor], run_dir: str | Path) -> dict[str, Tensor]:
        from safetensors import safe_open

        path = Path(run_dir) / cls.checkpoint_file
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the run's adapter file is missing (is the run complete?)")
        with safe_open(str(path), framework="pt") as handle:
            scaling = json.loads((handle.metadata() or {})["lora_scaling"])
            stored = {k: handle.get_tensor(k) for k in handle.keys()}
        state = {k: v.clone() for k, v in reference_state.items()}
        for key, factor in scaling.items():
            if key not in state:
                raise ValueError(f"{path}: adapted weight {key!r} is not a key of the reference model")
            delta = lora_delta(stored[f"{key}.lora_A"].float(), stored[f"{key}.lora_B"].float(), factor)
            state[key] = (state[key].float() + delta).to(state[key].dtype)
        for key in ("head.weight", "head.bias"):
            if key in stored:
                state[key] = stored[key]
        check_same_keys(reference_state, state, path)
        return state

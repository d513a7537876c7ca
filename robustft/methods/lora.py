"""LoRA (Hu et al. 2021): frozen pre-trained weights plus trainable low-rank updates ΔW = (α/r)·B·A, through ``peft``.

Defaults are peft's and the paper's: rank r = 8, ``lora_alpha`` α = r (Hu et al. set α to the first r they try and
do not tune it), no adapter dropout. What is adapted (``targets``, a preset, or ``target_modules``, peft names):

- ``attention`` (default when the encoder has ``nn.MultiheadAttention``, as open_clip ViTs): Hu et al. adapt the
  attention projections. peft (>= 0.15) wraps the whole ``nn.MultiheadAttention``: one rank-r pair for the fused
  q/k/v in-projection (``in_proj_weight``) and one for ``out_proj``. Adapting ``out_proj`` alone would train nothing,
  because the module's forward reads ``out_proj.weight`` directly. peft 0.21 adds the ``out_proj`` update twice in
  its merge-then-unmerge forward and leaves rounding residue in the base weights (huggingface/peft#3774), so the
  attention layers here run :class:`AttentionLoRA`: the same peft layer and parameters, with a forward that hands
  W + ΔW to the attention without writing the base weights, and a merge that adds each ΔW once. peft has no
  adapter-dropout path on attention, so ``lora_dropout`` must be 0 there.
- ``mlp``: every ``nn.Linear`` outside attention (open_clip ViT: ``c_fc`` and ``c_proj`` of every block).
- ``attention+mlp``: both.
- ``conv1x1`` (default for encoders without attention or Linear layers, as EfficientNet-Lite0): every 1x1
  ``nn.Conv2d`` with ``groups == 1`` (the expand/project/head pointwise convolutions).

The head trains fully (``train_head``). BatchNorm statistics stay frozen so the encoder's buffers remain the
pre-trained ones. The run stores only ``<weight key>.lora_A`` / ``.lora_B`` per adapted weight (plus ``head.*`` when
the head trains) in ``adapter.safetensors``, with each weight's scaling α/r in the header;
:meth:`LoRA.load_finetuned_state` merges them into the full state dict WiSE-FT interpolates, W + (α/r)·B·A.
"""

from __future__ import annotations

import functools
import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from robustft.methods.base import Method, TrainingHyperparameters, check_same_keys, hyperparameter

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.context import TrainContext

ADAPTER = "default"
#: ``targets`` presets (None: ``attention`` when the encoder has attention, else Linear layers, else 1x1 convs)
TARGET_PRESETS = ("attention", "mlp", "attention+mlp", "conv1x1")


@dataclass
class LoRAHyperparameters(TrainingHyperparameters):
    rank: int = hyperparameter(8, "Adapter rank r.", minimum=1)
    lora_alpha: float = hyperparameter(8.0, "Adapter scaling alpha (update = alpha/r BA).", exclusiveMinimum=0)
    lora_dropout: float = hyperparameter(
        0.0, "Dropout on the adapter input (Linear and conv adapters; peft has none on attention, so it must be 0 "
        "with attention targets).", minimum=0, maximum=0.99)
    targets: str | None = hyperparameter(
        None, "Which encoder layers get adapters: attention (the fused q/k/v in-projection and out_proj of every "
        "nn.MultiheadAttention, as Hu et al.), mlp (every Linear outside attention: open_clip c_fc/c_proj), "
        "attention+mlp, or conv1x1 (pointwise convolutions); null = attention when the encoder has it (open_clip "
        "ViTs), else conv1x1 (EfficientNet).", enum=[*TARGET_PRESETS, None])
    target_modules: list[str] | None = hyperparameter(
        None, "Explicit peft module names to adapt, instead of targets (a layer inside nn.MultiheadAttention alone "
        "is refused: its forward bypasses it).")
    train_head: bool = hyperparameter(True, "Train the classification head fully alongside the adapters.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: expected a positive integer, got {self.rank!r}")
        if self.targets is not None and self.targets not in TARGET_PRESETS:
            raise ValueError(f"targets: expected one of {list(TARGET_PRESETS)} or null, got {self.targets!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.targets is not None and self.target_modules:
            raise ValueError(
                f"targets {self.targets!r} and target_modules {self.target_modules} both set: give one of them"
            )


def _inside_multihead_attention(model: nn.Module) -> set[str]:
    names = set()
    for parent_name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            names.update(f"{parent_name}.{n}" if parent_name else n for n, _ in module.named_modules() if n)
    return names


def lora_targets(model: nn.Module, targets: str | None) -> list[str]:
    """Full names of the encoder modules the ``targets`` preset adapts (see the module docstring)."""
    inside = _inside_multihead_attention(model)
    modules = [(n, m) for n, m in model.named_modules() if n.startswith("encoder.") and n not in inside]
    found = {
        "attention": [n for n, m in modules if isinstance(m, nn.MultiheadAttention)],
        "mlp": [n for n, m in modules if isinstance(m, nn.Linear)],
        "conv1x1": [n for n, m in modules if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and m.groups == 1],
    }
    found["attention+mlp"] = found["attention"] + found["mlp"]
    if targets is None:
        targets = next((t for t in ("attention", "mlp", "conv1x1") if found[t]), None)
        if targets is None:
            raise ValueError("lora: the encoder has no attention, Linear or 1x1 Conv2d layer to adapt; set target_modules")
    if not found[targets]:
        available = [t for t in TARGET_PRESETS if found[t]]
        raise ValueError(f"lora: targets {targets!r} matches no layer of this encoder; it has {available or 'none'}")
    return found[targets]


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


@functools.cache
def attention_lora_class() -> type:
    """:class:`AttentionLoRA`, built on first use (importing peft takes seconds)."""
    from peft.tuners.lora.layer import MultiheadAttention
    from peft.tuners.tuners_utils import check_adapters_to_merge
    from torch.func import functional_call

    class AttentionLoRA(MultiheadAttention):
        """peft's LoRA layer for ``nn.MultiheadAttention`` with W + ΔW passed to the attention, never written.

        peft 0.21 merges into the base weights before each forward and subtracts afterwards; its merge adds the
        ``out_proj`` delta twice (huggingface/peft#3774) and (W + ΔW) − ΔW is not W in floating point. Here the
        forward calls the attention with ``in_proj_weight`` + ΔW_in and ``out_proj.weight`` + ΔW_out substituted
        (``torch.func.functional_call``), so gradients reach both adapter pairs and the base weights stay
        bit-identical; ``merge`` adds each ΔW once.
        """

        def _adapted_weights(self) -> dict[str, Tensor]:
            base = self.get_base_layer()
            in_w, out_w = base.in_proj_weight, base.out_proj.get_base_layer().weight
            for name in self.active_adapters:
                if name in self.lora_A:
                    in_w = in_w + self.get_delta_weight(name).to(in_w.dtype)
                    out_w = out_w + base.out_proj.get_delta_weight(name).to(out_w.dtype)
            return {"in_proj_weight": in_w, "out_proj.base_layer.weight": out_w}

        def forward(self, query: Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.disable_adapters or self.merged:
                return super().forward(query, *args, **kwargs)
            self._check_forward_args(query, *args, **kwargs)
            return functional_call(self.get_base_layer(), self._adapted_weights(), (query, *args), kwargs)

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            base = self.get_base_layer()
            for name in check_adapters_to_merge(self, adapter_names):
                if name not in self.lora_A:
                    continue
                merged = base.in_proj_weight.data + self.get_delta_weight(name).to(base.in_proj_weight.dtype)
                if safe_merge and not merged.isfinite().all():
                    raise ValueError(f"lora: non-finite merged in_proj_weight for adapter {name!r}")
                base.in_proj_weight.data = merged
                base.out_proj.merge(safe_merge=safe_merge, adapter_names=[name])
                self.merged_adapters.append(name)

        def unmerge(self) -> None:
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.")
                return
            base = self.get_base_layer()
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name in self.lora_A:
                    base.in_proj_weight.data -= self.get_delta_weight(name).to(base.in_proj_weight.dtype)
            base.out_proj.unmerge()

    return AttentionLoRA


def inject_lora(model: nn.Module, targets: list[str], rank: int, lora_alpha: float, lora_dropout: float) -> nn.Module:
    """Add peft LoRA adapters to the modules named ``targets`` (attention through :class:`AttentionLoRA`)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, bias="none")
    config._register_custom_module({nn.MultiheadAttention: attention_lora_class()})
    with _plain_pointwise_convs(model):  # peft freezes every non-adapter weight
        return inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def _check_adapted_layers(model: nn.Module) -> None:
    """Only encoder Linear/Conv2d layers and whole attention modules: a layer inside a bare ``nn.MultiheadAttention``
    (e.g. ``out_proj`` alone) would never run, since the attention's forward reads its weights directly."""
    from peft.tuners.lora import Conv2d as LoraConv2d
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import Linear as LoraLinear

    wrapped = attention_lora_class()
    modules = dict(model.named_modules())
    bare = [
        n for n, m in modules.items()
        if isinstance(m, nn.MultiheadAttention) and not isinstance(modules.get(n.removesuffix(".base_layer")), wrapped)
    ]
    for name, layer in modules.items():
        if not isinstance(layer, LoraLayer):
            continue
        if not isinstance(layer, (LoraLinear, LoraConv2d, wrapped)):
            raise ValueError(f"lora: layer {name!r} ({type(layer).__name__}) is not supported: only Linear, Conv2d "
                             "and nn.MultiheadAttention layers can be adapted and merged")
        if any(name.startswith(f"{b}.") for b in bare):
            raise ValueError(f"lora: layer {name!r} is inside nn.MultiheadAttention, whose forward bypasses it; adapt "
                             "the whole attention module (targets: attention)")
        if not name.startswith("encoder."):
            raise ValueError(f"lora: layer {name!r} is not in the encoder (the head trains fully: train_head)")


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
    """peft LoRA layers by the reference state-dict key of the weight each adapts.

    A Linear/Conv2d layer ``<name>`` adapts ``<name>.weight``; an attention layer adapts ``<name>.in_proj_weight``,
    and its nested ``<name>.base_layer.out_proj`` layer ``<name>.out_proj.weight``.
    """
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            plain = name.replace(".base_layer.", ".")
            weight = "in_proj_weight" if isinstance(module, attention_lora_class()) else "weight"
            layers[f"{plain}.{weight}"] = module
    return layers


class LoRA(Method):
    name = "lora"
    hyperparameters = LoRAHyperparameters
    checkpoint_file = "adapter.safetensors"
    freeze_norm_statistics = True

    def prepare(self, model: nn.Module, ctx: "TrainContext") -> nn.Module:
        targets = list(self.hp.target_modules or lora_targets(model, self.hp.targets))
        attention = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
        if self.hp.lora_dropout and attention & set(targets):
            raise ValueError(
                f"lora_dropout {self.hp.lora_dropout}: peft's nn.MultiheadAttention adapters have no dropout; set "
                "lora_dropout: 0 or targets: mlp"
            )
        model = inject_lora(model, targets, self.hp.rank, self.hp.lora_alpha, self.hp.lora_dropout)
        self.layers = lora_layers(model)
        if not self.layers:
            raise ValueError(f"lora: target_modules {targets} matched no layer")
        _check_adapted_layers(model)
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
        return {"adapted_weights": sorted(self.layers)}

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

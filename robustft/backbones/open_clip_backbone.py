"""CLIP-style backbones from ``open_clip``: image encoder for fine-tuning, text tower for zero-shot heads.

Weights follow ONE path: the ``pretrained`` spec (an open_clip tag such as ``"openai"`` or a local checkpoint file)
is resolved to a local file (a tag through open_clip's pretrained registry and download helper, into its cache),
which is read with :func:`load_weights_file` (safetensors or weights-only torch, never arbitrary pickles) and
loaded with ``load_state_dict(strict=True)`` into a freshly built open_clip model.
"""

from __future__ import annotations

import difflib
import json
import logging
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from robustft.backbones.base import Backbone, Preprocessing, WeightsError, file_sha256, load_weights_file
from robustft.backbones.templates import get_templates
from robustft.backbones.weights import download_tag, read_weights_record
from robustft.devices import resolve_device

#: Keys of OpenAI JIT state dicts that are not parameters.
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class OpenClipImageEncoder(nn.Module):
    """The visual tower of an open_clip model: normalised pixels (N, 3, H, W) -> unnormalised embeddings (N, D).

    Equals ``clip_model.encode_image(pixels)``; state dict keys are ``visual.*``.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


def encoder_from_clip(clip_model: nn.Module) -> OpenClipImageEncoder:
    """Image encoder sharing ``clip_model.visual`` (its parameters, not a copy); same keys as ``build_encoder()``."""
    return OpenClipImageEncoder(clip_model.visual)


def _format(template: str | Callable[[str], str], class_name: str) -> str:
    return template(class_name) if callable(template) else template.format(class_name)


def text_head_weights(
    clip_model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    batch_size: int = 256,
) -> torch.Tensor:
    """(C, D) float32 zero-shot head weights on CPU, as wise-ft ``src/models/zeroshot.py``.

    Per class: encode every ``template.format(class_name)``, L2-normalise each embedding, average over templates,
    re-normalise, multiply by ``logit_scale.exp()``. Runs on ``clip_model``'s device in eval mode (its training mode
    is restored afterwards), so FLYP can rebuild the head from its fine-tuned text tower.
    """
    if isinstance(templates, str):
        raise TypeError("templates: expected a sequence of templates, got a string (use get_templates(name))")
    class_names, templates = list(class_names), list(templates)
    if not class_names or not templates:
        raise ValueError("text_head_weights: class_names and templates must be non-empty")
    texts = [_format(t, c) for c in class_names for t in templates]
    device = next(clip_model.parameters()).device
    was_training = clip_model.training
    clip_model.eval()
    try:
        with torch.inference_mode():
            chunks = []
            for start in range(0, len(texts), batch_size):
                tokens = tokenizer(texts[start : start + batch_size]).to(device)
                emb = clip_model.encode_text(tokens).float()
                chunks.append(emb / emb.norm(dim=-1, keepdim=True))
            emb = torch.cat(chunks).view(len(class_names), len(templates), -1)
            weights = emb.mean(dim=1)
            weights = weights / weights.norm(dim=-1, keepdim=True)
            weights = weights * clip_model.logit_scale.exp().float()
            weights = weights.float().cpu()
    finally:
        clip_model.train(was_training)
    return weights.clone()  # a normal tensor (not an inference tensor): usable as a trainable head's init


@contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """open_clip logs 'initialized randomly' when built without weights; ours are loaded right after."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _is_torchscript_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class OpenClipBackbone(Backbone):
    """An open_clip model; its reference head is the zero-shot head built from class-name prompts.

    ``model``: open_clip model name (``open_clip.list_models()``), e.g. ``"ViT-B-32"`` (use ``"ViT-B-32-quickgelu"``
    for an OpenAI checkpoint given as a file; with the tag ``"openai"`` QuickGELU is switched on automatically).
    ``pretrained``: an open_clip pretrained tag for ``model`` (e.g. ``"openai"``, ``"laion2b_s34b_b79k"``) or a path
    to a local checkpoint (``.safetensors`` or a weights-only torch state dict). ``model_config``: path to a custom
    open_clip model config JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``) registered under its file stem, which is
    then the model name. ``image_size``: override the model's input size (positional embeddings are resized).
    ``templates``: name of the prompt template set (:mod:`robustft.backbones.templates`). ``cache_dir``: download
    cache for tags (open_clip's default when None). ``weights_record``: the record of rule weights
    (:mod:`robustft.backbones.weights`): its file and SHA-256 are used and nothing is downloaded (workflow jobs).
    """

    reference_head_kind = "zeroshot"

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        model_config: str | None = None,
        image_size: int | None = None,
        templates: str = "openai_imagenet",
        cache_dir: str | None = None,
        weights_record: str | None = None,
        **_: Any,
    ) -> None:
        import open_clip
        from open_clip.pretrained import get_pretrained_cfg
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        self.model_config = Path(model_config).expanduser() if model_config else None
        if self.model_config is not None:
            if not self.model_config.is_file():
                raise WeightsError(f"backbone.model_config: file not found: {self.model_config}")
            stem = self.model_config.stem
            if model is not None and model != stem:
                raise WeightsError(
                    f"backbone.model: {model!r} must equal the model_config file stem {stem!r} "
                    f"(open_clip registers a config under its file name)"
                )
            model = stem
            if stem not in open_clip.list_models() or open_clip.get_model_config(stem) != self._config_json():
                open_clip.add_model_config(self.model_config)
        if not model:
            raise WeightsError("backbone.model: an open_clip model name is required (or backbone.model_config)")
        self.model_name = str(model).replace("/", "-")
        self._cfg = open_clip.get_model_config(self.model_name)
        if self._cfg is None:
            names = open_clip.list_models()
            close = difflib.get_close_matches(self.model_name, names, n=5, cutoff=0.5)
            examples = close or [n for n in ("RN50", "ViT-B-32", "ViT-B-16", "ViT-L-14") if n in names]
            raise WeightsError(
                f"unknown open_clip model {self.model_name!r}; valid names include {examples} "
                f"({len(names)} in open_clip.list_models())"
            )
        if not pretrained:
            raise WeightsError(
                f"backbone.pretrained is required for open_clip model {self.model_name}: "
                f"a pretrained tag {self.available_tags()[:6]} or a local checkpoint file"
            )
        self.pretrained = str(pretrained)
        self._tag_cfg: dict[str, Any] = dict(get_pretrained_cfg(self.model_name, self.pretrained))
        self.cache_dir = cache_dir
        self.weights_record = weights_record
        self.templates = templates
        get_templates(templates)  # validates the name

        native = self._cfg["vision_cfg"].get("image_size", 224)
        if isinstance(native, (list, tuple)):
            if len(set(native)) != 1:
                raise ValueError(f"open_clip model {self.model_name}: non-square image size {native} is not supported")
            native = native[0]
        self._image_size_override = int(image_size) if image_size else None
        self.image_size = self._image_size_override or int(native)

        pp = merge_preprocess_dict(PreprocessCfg(), self._tag_cfg)
        pp["size"] = self.image_size
        if pp.get("interpolation") not in ("bicubic", "bilinear"):
            warnings.warn(f"{self.model_name}: interpolation {pp.get('interpolation')!r} replaced by 'bicubic'")
            pp["interpolation"] = "bicubic"
        if pp.get("resize_mode", "shortest") != "shortest":
            warnings.warn(
                f"{self.model_name}:{self.pretrained}: resize_mode {pp['resize_mode']!r} was used in pre-training; "
                "robustft resizes the shorter side and centre-crops"
            )
        self._preprocess_cfg = pp
        self._quick_gelu = bool(self._tag_cfg.get("quick_gelu", False))
        self._weights_path: Path | None = None
        self._weights_sha256: str | None = None

    # ----------------------------------------------------------------------------------------------------- config
    def _config_json(self) -> dict[str, Any] | None:
        assert self.model_config is not None
        with open(self.model_config, encoding="utf-8") as handle:
            return json.load(handle)

    def available_tags(self) -> list[str]:
        from open_clip.pretrained import list_pretrained_tags_by_model

        return list_pretrained_tags_by_model(self.model_name)

    @property
    def is_tag(self) -> bool:
        return bool(self._tag_cfg)

    @property
    def preprocessing(self) -> Preprocessing:
        pp = self._preprocess_cfg
        return Preprocessing(
            self.image_size,
            pp["interpolation"],
            tuple(float(v) for v in pp["mean"]),  # type: ignore[arg-type]
            tuple(float(v) for v in pp["std"]),  # type: ignore[arg-type]
        )

    @property
    def feature_dim(self) -> int:
        return int(self._cfg["embed_dim"])

    @property
    def features_normalized(self) -> bool:
        return True

    # ---------------------------------------------------------------------------------------------------- weights
    @property
    def weights_path(self) -> Path:
        """The local checkpoint file (a tag is fetched into the cache on first use)."""
        if self._weights_path is None:
            self._weights_path = self._resolve_weights()
        return self._weights_path

    @property
    def weights_source(self) -> str:
        """``tag`` (downloaded by rule weights) or ``file`` (a local checkpoint used in place)."""
        return "tag" if self.is_tag else "file"

    def _resolve_weights(self) -> Path:
        if self.weights_record:
            record = read_weights_record(self.weights_record)
            self._weights_sha256 = record["sha256"]
            return Path(record["path"])
        if self.is_tag:
            return download_tag(self._tag_cfg, self.cache_dir,
                                f"open_clip model {self.model_name} pretrained tag {self.pretrained!r}")
        path = Path(self.pretrained).expanduser()
        if path.is_file():
            return path
        tags = self.available_tags()
        shown = f"{tags[:8]}{f' and {len(tags) - 8} more' if len(tags) > 8 else ''}"
        raise WeightsError(
            f"backbone.pretrained: {self.pretrained!r} is neither a pretrained tag of open_clip model "
            f"{self.model_name} (tags: {shown}) nor an existing checkpoint file"
        )

    @property
    def weights_sha256(self) -> str:
        self.weights_path  # a weights record carries the hash
        if self._weights_sha256 is None:
            self._weights_sha256 = file_sha256(self.weights_path)
        return self._weights_sha256

    def _load_state(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_weights_file(path)
        except WeightsError:
            if _is_torchscript_archive(path):
                raise WeightsError(
                    f"{path}: a TorchScript (OpenAI JIT) archive, refused; save its state_dict() as .safetensors "
                    f"or use an open_clip state-dict checkpoint"
                ) from None
            raise

    def _adapt_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> dict:
        from open_clip.convert import convert_state_dict
        from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed

        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module.") :]: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k not in _JIT_EXTRA_KEYS}
        state = convert_state_dict(model, state)
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)
        expected = model.state_dict()
        for key in ("logit_scale", "logit_bias"):
            if key in state and key in expected and state[key].ndim != expected[key].ndim:
                if state[key].numel() == expected[key].numel():
                    state[key] = state[key].reshape(expected[key].shape)
        position_ids = "text.transformer.embeddings.position_ids"
        if position_ids in state and position_ids not in expected:
            del state[position_ids]
        if self._image_size_override is not None:
            resize_pos_embed(state, model)

        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        shapes = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in expected
            if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
        ]
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys e.g. {missing[:2]}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys e.g. {unexpected[:2]}")
            if shapes:
                parts.append(f"{len(shapes)} shape mismatches e.g. {shapes[0]}")
            raise WeightsError(f"{path}: does not match open_clip model {self.model_name} ({'; '.join(parts)})")
        return state

    def _build_model(self) -> nn.Module:
        """A fresh full open_clip model (both towers, logit_scale) with the pre-trained weights, in eval mode."""
        import open_clip

        path = self.weights_path
        with _quiet_random_init_warning(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="QuickGELU mismatch")
            model = open_clip.create_model(
                self.model_name,
                pretrained=None,
                force_quick_gelu=self._quick_gelu,
                force_image_size=self._image_size_override,
                force_preprocess_cfg=self._preprocess_cfg,
                pretrained_image=False,
                pretrained_text=False,
            )
        state = self._adapt_state_dict(model, self._load_state(path), path)
        model.load_state_dict(state, strict=True)
        return model.eval()

    # ------------------------------------------------------------------------------------------------ public API
    def build_encoder(self) -> nn.Module:
        """A fresh image encoder (the visual tower only; the text tower is dropped)."""
        return encoder_from_clip(self._build_model())

    def build_clip(self) -> tuple[nn.Module, Callable[[list[str]], torch.Tensor]]:
        """The full pre-trained open_clip model (both towers, ``logit_scale``) and its tokenizer (for FLYP)."""
        import open_clip

        return self._build_model(), open_clip.get_tokenizer(self.model_name)

    def zeroshot_head_weights(
        self,
        class_names: Sequence[str],
        templates: Sequence[str] | str | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """(C, D) float32 CPU weights of the zero-shot head (wise-ft recipe, see :func:`text_head_weights`).

        ``templates``: a list of templates, or a template-set name; None uses this backbone's ``templates``.
        ``device``: where to run the text tower (default: CUDA when available, else CPU).
        """
        if templates is None:
            templates = self.templates
        if isinstance(templates, str):
            templates = get_templates(templates)
        if device is None:
            device = resolve_device("auto")
        clip_model, tokenizer = self.build_clip()
        clip_model.to(device)
        return text_head_weights(clip_model, tokenizer, class_names, templates)

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {
            "backbone": "open_clip",
            "model": self.model_name,
            "pretrained": self.pretrained if self.is_tag else self.weights_path.name,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.pixel_key,
            "templates": self.templates,
        }
        if self.model_config is not None:
            ident["model_config_sha256"] = file_sha256(self.model_config)[:16]
        return ident


__all__ = ["OpenClipBackbone", "OpenClipImageEncoder", "encoder_from_clip", "text_head_weights"]

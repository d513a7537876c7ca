"""Prompt templates for CLIP zero-shot heads: plain ``str.format`` strings with one ``{}`` for the class name."""

from __future__ import annotations

#: The 80 OpenAI ImageNet templates, in the order of mlfoundations/wise-ft
#: ``src/templates/openai_imagenet_template.py`` (also used by FLYP, Lipsum-FT and model-soups).
OPENAI_IMAGENET_TEMPLATES: list[str] = [
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
]

#: wise-ft ``simple_template``.
SIMPLE_TEMPLATE: list[str] = ["a photo of a {}."]

#: The widely copied 7-template ensemble ("selected by Tip-Adapter"; see REFERENCES.md §3).
TIP_ADAPTER_7: list[str] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

TEMPLATE_SETS: dict[str, list[str]] = {
    "openai_imagenet": OPENAI_IMAGENET_TEMPLATES,
    "simple": SIMPLE_TEMPLATE,
    "ensemble7": TIP_ADAPTER_7,
}


def get_templates(name: str) -> list[str]:
    """A copy of the template set ``name``; ValueError naming the allowed sets otherwise."""
    if name not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {name!r}; allowed: {sorted(TEMPLATE_SETS)}")
    return list(TEMPLATE_SETS[name])


__all__ = ["OPENAI_IMAGENET_TEMPLATES", "SIMPLE_TEMPLATE", "TEMPLATE_SETS", "TIP_ADAPTER_7", "get_templates"]

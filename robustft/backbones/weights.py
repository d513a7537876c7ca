"""A backbone's checkpoint as a pipeline input: resolved once (rule weights, on the submit node), recorded with its
size and SHA-256, and read by every job from that record, never downloaded by a job.

An open_clip pretrained tag is downloaded into ``<weights_dir>/open_clip`` (a folder the user may share between
projects: a checkpoint already there is reused); a local checkpoint file (``backbone.pretrained`` or
``backbone.weights``) and EfficientNet-Lite0's packaged checkpoint are used in place.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from robustft.backbones.base import WeightsError

#: Seconds the weights rule waits for the download host to answer before calling it unreachable.
PROBE_TIMEOUT_S = 5.0
#: How to get a checkpoint where there is no network (appended to every download failure).
OFFLINE_HINT = (
    "download the checkpoint where there is network and set backbone.pretrained to the local file "
    "(.safetensors or a weights-only .bin/.pt state dict), or pre-fetch it with `snakemake --until weights` on a "
    "machine with network"
)


def _one_line(exc: BaseException | str, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _endpoint(tag_cfg: dict[str, Any]) -> tuple[str, int]:
    """The host and port a tag downloads from (the Hugging Face endpoint, or the tag's URL)."""
    if _uses_hub(tag_cfg):
        from huggingface_hub import constants

        url = constants.ENDPOINT
    else:
        url = tag_cfg.get("url", "")
    parsed = urlparse(url)
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def unreachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``host:port`` cannot be reached within ``timeout`` seconds (None when a TCP connection opens)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"cannot reach {host}:{port} ({_one_line(exc, 80)})"


def _hub_offline_now() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Only what is in the cache: huggingface_hub's offline switch for the block (it reads it at call time)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _uses_hub(tag_cfg: dict[str, Any]) -> bool:
    from open_clip.pretrained import has_hf_hub

    return bool(tag_cfg.get("hf_hub")) and has_hf_hub()


def _url_copy(tag_cfg: dict[str, Any], cache_dir: Path) -> Path:
    """Where open_clip keeps a URL download."""
    return cache_dir / os.path.basename(tag_cfg.get("url", ""))


def _download(tag_cfg: dict[str, Any], cache_dir: Path | None) -> Path:
    """open_clip's download of a tag into ``cache_dir`` (None: the hub's cache); URL downloads land under a
    temporary name first."""
    from open_clip.pretrained import download_pretrained

    if _uses_hub(tag_cfg):  # the hub's own downloads are atomic
        return Path(download_pretrained(tag_cfg, cache_dir=None if cache_dir is None else str(cache_dir)))
    cache_dir = Path.home() / ".cache" / "clip" if cache_dir is None else cache_dir  # open_clip's own default
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = _url_copy(tag_cfg, cache_dir)
    if final.is_file():
        return Path(download_pretrained(tag_cfg, cache_dir=str(cache_dir)))  # checks the SHA-256 in OpenAI URLs
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        os.replace(download_pretrained(tag_cfg, cache_dir=tmp), final)
    return final


def download_tag(tag_cfg: dict[str, Any], cache_dir: str | Path | None, what: str) -> Path:
    """The checkpoint of an open_clip pretrained tag, from ``cache_dir`` or downloaded into it.

    The download host is probed first (a few seconds at most): where it cannot be reached, or the hub is switched
    offline, only a copy already in ``cache_dir`` is used, and its absence fails at once with one line (the hub's
    own client would retry for about a minute).
    """
    cache_dir = None if cache_dir is None else Path(cache_dir)
    problem = None if _hub_offline_now() else unreachable(*_endpoint(tag_cfg))
    try:
        if not problem:
            target = _download(tag_cfg, cache_dir)
        elif _uses_hub(tag_cfg):
            with _hub_offline():  # a copy already in the cache, or LocalEntryNotFoundError at once
                target = _download(tag_cfg, cache_dir)
        else:
            copy = _url_copy(tag_cfg, cache_dir or Path.home() / ".cache" / "clip")
            if not copy.is_file():
                raise WeightsError(problem)
            target = copy
    except Exception as exc:
        raise WeightsError(f"{what}: weights could not be fetched (offline?); {OFFLINE_HINT} "
                           f"[cause: {problem or _one_line(exc)}]") from None
    if not target or not Path(target).is_file():
        raise WeightsError(f"{what}: no weights file resolved; {OFFLINE_HINT}")
    return Path(target)


def read_weights_record(path: str | Path) -> dict[str, Any]:
    """A record written by rule weights (robustft.pipeline.weights), once its checkpoint is found, of the same size."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: unreadable weights record ({_one_line(exc, 80)}); rerun rule weights") from None
    checkpoint = Path(record["path"])
    size = checkpoint.stat().st_size if checkpoint.is_file() else None
    if size != record["size_bytes"]:
        found = "missing" if size is None else f"{size} bytes"
        raise WeightsError(f"{checkpoint}: checkpoint {found}, but {path} recorded {record['size_bytes']} bytes "
                           f"(sha256 {record['sha256'][:12]}); rerun rule weights")
    return record


__all__ = ["OFFLINE_HINT", "download_tag", "read_weights_record", "unreachable"]

"""Weights as a pipeline input (#20): rule weights resolves each backbone's checkpoint once, records its size and
SHA-256, and every job that builds the model reads that file and never touches the network.

There is no network here: downloads come from a local HTTP server of the test, and a pretrained tag for the tiny
test model is registered in every process of a pipeline run by ``tests/fake_hub/sitecustomize.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline_utils import (
    AFTER_SUMMARY_RULES,
    PACS_ROOT,
    REPO,
    dry_run_jobs,
    kill_tree,
    output_tail,
    run_pipeline,
    run_snakemake,
    snakemake_command,
    study_dir,
    tiny_config,
    write_config,
)

from robustft.backbones.base import WeightsError, file_sha256
from robustft.network import HUB_OFFLINE_VARS, SAVED_VAR, restore_user_hub_env, set_jobs_offline

TAG = "tinytag"


# ------------------------------------------------------------------------------------------------ a local "hub"


class _Counting(SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.gets.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/served``; ``.gets`` lists the paths requested."""
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Counting, directory=str(folder)))
    httpd.gets = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(folder=folder, url=f"http://127.0.0.1:{httpd.server_address[1]}", gets=httpd.gets)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clip_spec(tiny: dict, pretrained: str) -> dict:
    return {"name": "open_clip", "model": tiny["model"], "model_config": tiny["model_config"], "pretrained": pretrained}


# ------------------------------------------------------------------------------------------------------- unit


def test_jobs_are_switched_offline_and_the_weights_rule_gets_the_users_settings_back():
    env = {"HF_HUB_OFFLINE": "0", "OTHER": "x"}
    set_jobs_offline(env)
    assert all(env[name] == "1" for name in HUB_OFFLINE_VARS) and SAVED_VAR in env
    set_jobs_offline(env)  # a cluster job parses the workflow again: the user's values stay saved
    restore_user_hub_env(env)
    assert env["HF_HUB_OFFLINE"] == "0" and "TRANSFORMERS_OFFLINE" not in env and env["OTHER"] == "x"


def test_a_url_tag_is_downloaded_once_into_the_weights_folder(server, tmp_path):
    from robustft.backbones.weights import download_tag

    (server.folder / "model.bin").write_bytes(b"weights" * 100)
    cfg = {"url": f"{server.url}/model.bin", "hf_hub": ""}
    first = download_tag(cfg, tmp_path / "cache", "model m pretrained tag 't'")
    assert first == tmp_path / "cache" / "model.bin" and first.read_bytes() == b"weights" * 100
    assert download_tag(cfg, tmp_path / "cache", "model m pretrained tag 't'") == first
    assert server.gets == ["/model.bin"], server.gets
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model.bin"]  # no temporary download left


def test_an_unreachable_hub_fails_in_seconds_with_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from open_clip.pretrained import get_pretrained_cfg

    from robustft.backbones.weights import download_tag

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cfg = get_pretrained_cfg("RN50", "openai")
    assert cfg.get("hf_hub")
    started = time.monotonic()
    with pytest.raises(WeightsError) as info:
        download_tag(cfg, tmp_path / "cache", "open_clip model RN50 pretrained tag 'openai'")
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert "\n" not in message and message.startswith("open_clip model RN50 pretrained tag 'openai': weights could "
                                                      "not be fetched (offline?)")
    assert "cannot reach 127.0.0.1" in message and "snakemake --until weights" in message
    # a copy already in the folder is used without the network
    url_cfg = {"url": f"http://127.0.0.1:{_closed_port()}/model.bin", "hf_hub": ""}
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache" / "model.bin").write_bytes(b"x")
    assert download_tag(url_cfg, tmp_path / "cache", "m") == tmp_path / "cache" / "model.bin"


def test_jobs_load_the_recorded_file_and_hash(tmp_path, tiny_open_clip, monkeypatch):
    from robustft.backbones import build_backbone
    from robustft.backbones import open_clip_backbone
    from robustft.backbones.weights import read_weights_record
    from robustft.pipeline.weights import weights_stage

    spec = _clip_spec(tiny_open_clip, tiny_open_clip["checkpoint"])
    record = weights_stage(backbone=spec, weights_dir=tmp_path / "weights", out=tmp_path / "record.json")
    assert record["source"] == "file" and record["path"] == tiny_open_clip["checkpoint"]
    assert record["sha256"] == file_sha256(tiny_open_clip["checkpoint"]) and len(record["sha256"]) == 64
    assert record["size_bytes"] == Path(tiny_open_clip["checkpoint"]).stat().st_size
    assert read_weights_record(tmp_path / "record.json") == record

    def no_download(*args, **kwargs):
        raise AssertionError("a job tried to download weights")

    monkeypatch.setattr(open_clip_backbone, "download_tag", no_download)
    backbone = build_backbone({**spec, "pretrained": TAG, "weights_record": str(tmp_path / "record.json")})
    assert backbone.weights_path == Path(tiny_open_clip["checkpoint"])
    assert backbone.identity()["weights_sha256"] == record["sha256"]
    backbone.build_encoder()

    lite = weights_stage(backbone={"name": "efficientnet_lite0", "image_size": 64}, weights_dir=tmp_path,
                         out=tmp_path / "lite.json")
    assert lite["source"] == "package" and Path(lite["path"]).is_file()
    lite0 = build_backbone({"name": "efficientnet_lite0", "image_size": 64, "weights_record": str(tmp_path / "lite.json")})
    assert lite0.identity()["weights_sha256"] == lite["sha256"] == file_sha256(lite["path"])


def test_a_record_whose_checkpoint_changed_is_refused(tmp_path, tiny_open_clip):
    from robustft.backbones.weights import read_weights_record
    from robustft.pipeline.weights import weights_stage

    checkpoint = tmp_path / "tiny.safetensors"
    shutil.copy(tiny_open_clip["checkpoint"], checkpoint)
    weights_stage(backbone=_clip_spec(tiny_open_clip, str(checkpoint)), weights_dir=tmp_path, out=tmp_path / "r.json")
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    with pytest.raises(WeightsError) as info:
        read_weights_record(tmp_path / "r.json")
    message = str(info.value)
    assert "\n" not in message and str(checkpoint) in message and "r.json" in message and "rule weights" in message


# ---------------------------------------------------------------------------------------------------- pipeline

MODEL_RULES = {"features", "reference", "finetune", "sweep"}


def _config(backbone: dict) -> dict:
    config = tiny_config({"dataset": {"ood_domains": ["art_painting"]}, "sweep": {"alphas": [0.0, 1.0]},
                          "eval": {"bootstrap": 20}})
    return {**config, "backbone": backbone, "methods": {"zeroshot": {"default": {}}, "full_ft": {"default": {}}}}


def _feature_sha(workdir: Path, config: dict) -> set[str]:
    import h5py

    from robustft.config import backbone_key

    key = backbone_key({**config["backbone"], "image_size": config["backbone"].get("image_size")})
    shas = set()
    for path in (workdir / "results" / "features" / key).rglob("*.h5"):
        with h5py.File(path, "r") as handle:
            shas.add(handle.attrs["weights_sha256"])
    return shas


@pytest.mark.pipeline
@pytest.mark.skipif(not PACS_ROOT.is_dir(), reason=f"PACS not found at {PACS_ROOT}")
def test_the_weights_rule_fetches_once_every_job_reads_the_record_and_a_changed_checkpoint_reruns(
        tmp_path, tiny_open_clip, server, monkeypatch):
    from robustft.config import backbone_key

    workdir = tmp_path / "work"
    shutil.copy(tiny_open_clip["checkpoint"], server.folder / "tiny.safetensors")
    hub_log = tmp_path / "hub.log"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests" / "fake_hub"),
                                                                    os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("ROBUSTFT_FAKE_HUB", json.dumps({"model": tiny_open_clip["model"], "tag": TAG,
                                                        "url": f"{server.url}/tiny.safetensors", "log": str(hub_log)}))
    for name in HUB_OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)

    # 1. a pretrained tag: downloaded once, by the weights rule, into results/weights/open_clip
    tagged = _config(_clip_spec(tiny_open_clip, TAG))
    write_config(workdir, tagged)
    run_pipeline(workdir, timeout=1800)
    assert server.gets == ["/tiny.safetensors"], server.gets
    key = backbone_key(tagged["backbone"])
    record = json.loads((workdir / "results" / "weights" / f"{key}.json").read_text())
    assert record["source"] == "tag" and Path(record["path"]).is_relative_to("results/weights/downloads/open_clip")
    assert record["sha256"] == file_sha256(tiny_open_clip["checkpoint"]) == file_sha256(workdir / record["path"])
    assert _feature_sha(workdir, tagged) == {record["sha256"]}
    run = json.loads((study_dir(workdir, tagged) / "runs" / "full_ft" / "default" / "seed0" / "run.json").read_text())
    assert run["backbone"]["weights_sha256"] == record["sha256"]
    # every job that loaded open_clip ran with the hub switched offline, but the weights rule
    loads = [json.loads(line) for line in hub_log.read_text().splitlines()]
    scripts = [(next((r for r in ("fetch_weights", *MODEL_RULES, "pixel_cache") if f".{r}.py" in " ".join(e["argv"])),
                     " ".join(e["argv"])), e["HF_HUB_OFFLINE"]) for e in loads]
    assert [offline for rule, offline in scripts if rule == "fetch_weights"] == [None], scripts
    assert MODEL_RULES <= {rule for rule, _ in scripts}, scripts
    assert all(offline == "1" for rule, offline in scripts if rule != "fetch_weights"), scripts

    # 2. a local checkpoint, used in place: changing it reruns the weights and everything that uses the model
    local = workdir / "checkpoints" / "tiny.safetensors"
    local.parent.mkdir()
    shutil.copy(tiny_open_clip["checkpoint"], local)
    in_place = _config(_clip_spec(tiny_open_clip, "checkpoints/tiny.safetensors"))
    write_config(workdir, in_place)
    run_pipeline(workdir, timeout=1800)
    before = json.loads((workdir / "results" / "weights" / f"{backbone_key(in_place['backbone'])}.json").read_text())
    assert before["path"] == "checkpoints/tiny.safetensors" and before["source"] == "file"

    from safetensors.torch import load_file, save_file

    state = load_file(str(local))
    save_file({k: (v + 0.01 if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(local))
    proc = run_snakemake(workdir, "-n", "--quiet", "rules", timeout=300)
    assert proc.returncode == 0, output_tail(proc)
    assert set(dry_run_jobs(proc)) == {"weights", "features", "reference", "finetune", "sweep", "calibrate",
                                       "study_summary", "summary", *AFTER_SUMMARY_RULES, "all"}, output_tail(proc)
    run_pipeline(workdir, timeout=1800)
    after = json.loads((workdir / "results" / "weights" / f"{backbone_key(in_place['backbone'])}.json").read_text())
    assert after["sha256"] == file_sha256(local) != before["sha256"]
    assert _feature_sha(workdir, in_place) == {after["sha256"]}


@pytest.mark.pipeline
@pytest.mark.skipif(not PACS_ROOT.is_dir(), reason=f"PACS not found at {PACS_ROOT}")
def test_offline_the_weights_job_runs_first_and_fails_within_seconds(tmp_path, monkeypatch):
    """The run is stopped once the failure is printed: the data jobs, which need no model, would go on (keep-going)."""
    workdir = tmp_path / "work"
    config = _config({"name": "open_clip", "model": "RN50", "pretrained": "openai", "image_size": 64})
    write_config(workdir, config)
    for name in HUB_OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # the hub, unreachable
    out = workdir / "snakemake.out"
    started = time.monotonic()
    with open(out, "w") as handle:
        proc = subprocess.Popen(snakemake_command(workdir), stdout=handle, stderr=subprocess.STDOUT, cwd=str(workdir),
                                start_new_session=True)
        try:
            while "robustft: " not in out.read_text() and proc.poll() is None and time.monotonic() - started < 600:
                time.sleep(0.2)
            elapsed = time.monotonic() - started
            pixels = sorted((workdir / "results" / "pixels").rglob("*.h5")) if (workdir / "results").exists() else []
        finally:
            kill_tree(proc)
    text = out.read_text()
    lines = [line for line in text.splitlines() if line.startswith("robustft: ")]
    assert len(lines) == 1, text[-6000:]
    assert "open_clip model RN50 pretrained tag 'openai': weights could not be fetched" in lines[0], lines
    assert "cannot reach 127.0.0.1" in lines[0], lines
    before = text[: text.index(lines[0])]
    jobs = [line.split()[-1].rstrip(":") for line in before.splitlines() if line.startswith(("rule ", "localrule "))]
    assert jobs and jobs[0] == "weights" and "pixel_cache" not in jobs, jobs
    assert not pixels, pixels
    log = next((workdir / "results" / "logs" / "weights").glob("*.log")).read_text()
    assert "Retrying" not in log
    print(f"offline: the weights job failed {elapsed:.1f} s after `snakemake` started (start-up included); jobs "
          f"started before: {jobs}")
    assert elapsed < 120, f"the failure took {elapsed:.0f} s"

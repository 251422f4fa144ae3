"""Shared test fixtures: everything offline, everything generated on the fly."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CAPCURATE_PROGRESS", "0")


def make_image_bytes(seed: int, size: tuple[int, int] = (32, 32), fmt: str = "JPEG") -> bytes:
    """A small deterministic image: a coloured background with a rectangle."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    x0, y0 = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
    d.rectangle([x0, y0, x0 + size[0] // 3, y0 + size[1] // 3], fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def build_dataset(root: Path, samples: list[dict], per_shard: int = 8) -> Path:
    """Write a dataset directory directly (shards + manifest), as download/ingest would.

    Each sample dict: caption, and either ``image`` (bytes) or ``status``/``error_message`` for a
    failed download; optional uid, url, extra columns.
    """
    import pyarrow as pa

    from capcurate import atomic
    from capcurate.dataset import Dataset, samples_schema
    from capcurate.shards import TarShardWriter
    from capcurate.uid import make_uid

    ds = Dataset.create(root, sources=[{"kind": "test-fixture"}])
    for s_i in range(0, len(samples), per_shard):
        shard_id = f"{s_i // per_shard:05d}"
        rows = []
        with TarShardWriter(ds.shard_path(shard_id)) as w:
            for j, s in enumerate(samples[s_i:s_i + per_shard]):
                key = f"{shard_id}{j:04d}"
                url = s.get("url", f"http://127.0.0.1/img/{s_i + j}.jpg")
                uid = s.get("uid") or make_uid(url, s.get("caption"))
                ok = "image" in s
                if ok:
                    w.write(key, {"jpg": s["image"], "txt": (s.get("caption") or "").encode()})
                rows.append({
                    "uid": uid, "key": key, "shard": shard_id, "url": url, "caption": s.get("caption"),
                    "status": "success" if ok else s.get("status", "failed_to_download"),
                    "error_message": None if ok else s.get("error_message", "404"),
                    "width": 32 if ok else None, "height": 32 if ok else None,
                    "original_width": 32 if ok else None, "original_height": 32 if ok else None,
                    "sha256": None,
                })
        atomic.write_parquet(ds.samples_path(shard_id), pa.Table.from_pylist(rows, schema=samples_schema()))
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """24 samples in 3 shards: 21 good images, one corrupt image, one truncated JPEG, one failed download."""
    samples = [{"caption": f"a photo number {i}", "image": make_image_bytes(i)} for i in range(21)]
    samples.append({"caption": "corrupt", "image": b"this is not an image"})
    samples.append({"caption": "truncated", "image": make_image_bytes(99)[:200]})
    samples.append({"caption": "dead link", "status": "failed_to_download", "error_message": "HTTP 404"})
    return build_dataset(tmp_path / "ds", samples, per_shard=8)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests where no CUDA device is visible (torch is imported only if one is marked)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs CUDA (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


def pytest_sessionstart(session: pytest.Session) -> None:
    """transformers makes its log handler the first time it logs, bound to the sys.stderr of that moment:
    inside a ``CliRunner.invoke`` that is a buffer closed afterwards, and every later transformers log line
    of the session becomes a "--- Logging error ---" traceback in some other test's output (seen in
    test_recaption's one-line checks, depending on test order). Make it now, on the session's stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests not marked ``gpu`` run on the CPU wherever they run: on a GPU workstation ``auto`` would pick
    cuda and bf16, and the fp32 reference tests would compare bf16 with fp32. torch's view is patched (it
    may have initialised CUDA for an earlier gpu test, so the environment alone would not do), and
    CUDA_VISIBLE_DEVICES="" hides the GPU from subprocesses. Session and module fixtures run before this one
    (pytest orders by scope): those that start subprocesses set the variable themselves."""
    if request.node.get_closest_marker("gpu") is not None:
        return
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


# -- object storage: a local S3 server (moto's server mode) on loopback, started once per test session --
@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server for the session (tests/s3_fixtures.py); the AWS_* variables it sets are restored
    afterwards. Yields the endpoint URL."""
    from s3_fixtures import AWS_VARS, start_local_s3

    saved = {k: os.environ.get(k) for k in AWS_VARS}
    proc, endpoint = start_local_s3()
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_server, request) -> str:
    """A new, empty bucket on the local S3 server; returns its URL ``s3://<name>``."""
    import re
    import uuid

    from s3_fixtures import create_bucket

    return create_bucket(re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-"
                         + uuid.uuid4().hex[:8])


def _run_tiny_quickstart(tmp, fetch: str):
    import subprocess

    from test_quickstart import (
        QUICKSTART,
        QUICKSTART_COMMANDS,
        TINY_STRATEGIES,
        _env,
        _failing_download,
        help_failures,
    )

    broken = help_failures(QUICKSTART_COMMANDS)
    if broken:  # a failure, never a skip: the quickstart would stop at that command
        pytest.fail(f"quickstart commands whose --help fails: {'; '.join(broken)}")
    env = _env(tmp, QUICKSTART_SCALE="tiny", QUICKSTART_STRATEGIES=TINY_STRATEGIES, QUICKSTART_FETCH=fetch)
    if fetch == "ingest":  # for machines without img2dataset: a download there would fail
        env = _failing_download(tmp, env, "no img2dataset here")
    res = subprocess.run(["bash", str(QUICKSTART)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "demo", res


@pytest.fixture(scope="session")
def tiny_quickstart(tmp_path_factory):
    """One local tiny quickstart (download mode) for the session, as (output folder, CompletedProcess)."""
    return _run_tiny_quickstart(tmp_path_factory.mktemp("quickstart"), "download")


@pytest.fixture(scope="session")
def tiny_quickstart_ingest(tmp_path_factory):
    """The same in ingest mode (the world's own uids): test_quickstart checks it, test_storage_quickstart
    runs the chain again with everything in a bucket and compares the two output by output."""
    return _run_tiny_quickstart(tmp_path_factory.mktemp("quickstart_ingest"), "ingest")

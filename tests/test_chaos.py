"""Chaos: parallel parts, kill -9 and resume, repeated input rows, overwrite chains.

Every test drives real ``python -m capcurate`` processes over one tiny dataset (8 input rows in 3 tars,
6 distinct uids: one row repeated inside a tar, one across tars) and asserts the final content (manifest,
image shards, captions, scores, the selection, training shards and sizes.json) equals a clean sequential
run's. Kills are at random file commits of a stage (``CAPCURATE_CHAOS_KILL``: SIGKILL, before
or after the rename) drawn from a seed new each run, printed and named in a failure (replay it with
``CAPCURATE_CHAOS_SEED``). Tiny models, ``--workers 0``, batch size 1: the
same image gives the same floats in any process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from captioner_fixtures import build_tiny_blip
from compare import near
from conftest import make_image_bytes
from scorer_fixtures import save_tiny_openclip

from capcurate.dataset import Dataset
from capcurate.stages.ingest import ingest
from capcurate.stages.mix import mix
from capcurate.stages.query import stats
from capcurate.stages.recaption import recaption
from capcurate.stages.score import score
from capcurate.stages.shard import shard

# (caption, url, image seed) per tar; rows 2 and 4 repeat rows 0 and 1 (same url and caption: same uid)
ROWS = [
    [("a red circle", "http://h/0.jpg", 0), ("a blue square", "http://h/1.jpg", 1),
     ("a red circle", "http://h/0.jpg", 0)],
    [("a green star", "http://h/3.jpg", 3), ("a blue square", "http://h/1.jpg", 1),
     ("a small cat", "http://h/5.jpg", 5)],
    [("a big dog", "http://h/6.jpg", 6), ("a white tree", "http://h/7.jpg", 7)],
]
DISTINCT = 6
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CAPCURATE_PROGRESS": "0",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("CAPCURATE_CHAOS_KILL", None)


def chaos_seed() -> int:
    """The seed of this run's kill points: new each run (so runs explore different points), printed, and
    replayed by setting ``CAPCURATE_CHAOS_SEED``."""
    raw = os.environ.get("CAPCURATE_CHAOS_SEED")
    seed = int(raw) if raw else random.SystemRandom().randrange(2**31)
    print(f"chaos seed {seed} (replay: CAPCURATE_CHAOS_SEED={seed})")
    return seed


@contextlib.contextmanager
def replayable(seed: int, points: list[str]) -> Iterator[None]:
    """Any assertion inside names the seed and the kill points drawn from it."""
    try:
        yield
    except AssertionError as e:
        raise AssertionError(f"[chaos seed {seed}, kill points {points}; replay: "
                             f"CAPCURATE_CHAOS_SEED={seed}] {e}") from e


def write_inputs(folder: Path, image_offset: int = 0) -> Path:
    """Three webdataset tars; ``image_offset`` gives other images under the same urls and captions."""
    folder.mkdir(parents=True)
    n = 0
    for t, rows in enumerate(ROWS):
        with tarfile.open(folder / f"part{t}.tar", "w") as tf:
            for caption, url, seed in rows:
                key = f"s{n:03d}"
                n += 1
                members = {"jpg": make_image_bytes(seed + image_offset), "txt": caption.encode(),
                           "json": json.dumps({"url": url}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return folder


class Pipeline:
    """The command lines of every stage, for the CLI and (the same options) for the library."""

    def __init__(self, blip: str, clip_cfg: Path, clip_weights: Path):
        self.blip, self.clip_cfg, self.clip_weights = blip, clip_cfg, clip_weights

    def args(self, stage: str, web: Path, ds: Path, out: Path) -> list[str]:
        return {
            "ingest": ["ingest", str(web), "-o", str(ds), "--kind", "webdataset"],
            "recaption": ["recaption", str(ds), "--model", self.blip, "--name", "blip", "--decoding", "greedy",
                          "--max-new-tokens", "5", "--workers", "0", "--batch-size", "1", "--device", "cpu"],
            "score": ["score", str(ds), "--model", f"openclip:{self.clip_cfg}", "--pretrained",
                      str(self.clip_weights), "--name", "s", "--workers", "0", "--batch-size", "1",
                      "--device", "cpu"],
            "mix": ["mix", str(ds), "--strategy", "synthetic", "--synthetic", "blip", "--name", "m"],
            "shard": ["shard", str(ds), "--selection", "m", "-o", str(out), "--samples-per-shard", "2",
                      "--shuffle", "--seed", "3"],
        }[stage]

    def sequential(self, web: Path, ds: Path, out: Path) -> None:
        """The clean reference: every stage once, in this process, through the library."""
        ingest(web, ds, kind="webdataset")
        recaption(ds, model=self.blip, name="blip", decoding="greedy", max_new_tokens=5, workers=0,
                  batch_size=1, device="cpu")
        score(ds, f"openclip:{self.clip_cfg}", "s", pretrained=str(self.clip_weights), workers=0, batch_size=1,
              device="cpu")
        mix(ds, "synthetic", synthetic="blip", name="m")
        shard(ds, "m", out, samples_per_shard=2, shuffle=True, seed=3)


STAGES = ("ingest", "recaption", "score", "mix", "shard")


def cli(args: list[str], *, kill: str | None = None) -> subprocess.Popen:
    env = dict(ENV, CAPCURATE_CHAOS_KILL=kill) if kill else ENV
    return subprocess.Popen([sys.executable, "-m", "capcurate", *args, "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen], *, killed: bool = False) -> list[dict]:
    """Wait for every process; each must succeed (or, with ``killed``, die of SIGKILL)."""
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        if killed:
            assert p.returncode == -9, f"expected a kill, got {p.returncode}: {stderr[-2000:]}"
            continue
        assert p.returncode == 0, f"{p.args[3:]} exited {p.returncode}: {stderr[-3000:]}"
        outs.append(json.loads(stdout))
    return outs


def _rounded(v):
    """Floats compared within a tolerance (tests/compare.py), not rounded: a rounding boundary flips."""
    return near(v)


def _tar_members(path: Path) -> list[tuple[str, object]]:
    with tarfile.open(path) as tf:
        out = []
        for m in tf.getmembers():
            data = tf.extractfile(m).read()
            out.append((m.name, _rounded(json.loads(data)) if m.name.endswith(".json")
                        else hashlib.sha256(data).hexdigest()))
        return out


def content(ds: Path, out: Path) -> dict[str, object]:
    """Everything a user reads: Parquet rows (floats within 1e-5), image shard bytes, training shards."""
    assert not [p for p in (*ds.rglob(".*.tmp"), *out.rglob(".*.tmp"))], "temp files were left behind"
    assert not list(out.glob(".plan*")), "a plan folder was left behind"
    c: dict[str, object] = {}
    for f in sorted(ds.rglob("*.parquet")):
        rows = pq.read_table(f).to_pylist()
        for r in rows:
            r.pop("source", None)  # the input path, which differs between test folders
        c[str(f.relative_to(ds))] = _rounded(rows)
    for f in sorted((ds / "shards").glob("*.tar")):
        c[f"shards/{f.name}"] = [m for m in _tar_members(f) if not m[0].endswith(".json")]
    for f in sorted(out.glob("*.tar")):
        c[f"out/{f.name}"] = _tar_members(f)
    c["out/sizes.json"] = json.loads((out / "sizes.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    c["out/manifest.json"] = {k: v for k, v in manifest.items() if k not in ("dataset", "train_data")}
    return c


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Models, inputs and the clean sequential reference (old and new images under the same uids)."""
    root = tmp_path_factory.mktemp("chaos")
    blip = build_tiny_blip(root / "models")
    cfg, weights = save_tiny_openclip(root / "models" / "clip")
    pipe = Pipeline(blip, cfg, weights)
    web, web_new = write_inputs(root / "web"), write_inputs(root / "web_new", image_offset=100)
    pipe.sequential(web, root / "ref", root / "ref_out")
    pipe.sequential(web_new, root / "ref_new", root / "ref_new_out")
    return {"root": root, "pipe": pipe, "web": web, "web_new": web_new,
            "ref": content(root / "ref", root / "ref_out"),
            "ref_new": content(root / "ref_new", root / "ref_new_out")}


def test_repeated_input_rows_are_kept_once_in_samples_mix_shards_and_sizes(world, tmp_path):
    ref = world["root"] / "ref"
    ds = Dataset(ref)
    assert ds.query("SELECT count(*) AS n, count(DISTINCT uid) AS u FROM samples").to_pylist() == [
        {"n": DISTINCT, "u": DISTINCT}]
    assert ds.query("SELECT count(*) AS n FROM selection_m").to_pylist() == [{"n": DISTINCT}]
    entry = ds.card.lineage("shards", "ingest")[-1]
    assert entry["counts"]["duplicate_uids"] == 2 and entry["counts"]["samples"] == DISTINCT
    # every family joins one row per uid: the wide view has as many rows as the manifest
    assert ds.query("SELECT count(*) AS n FROM samples WHERE cap_blip IS NOT NULL "
                    "AND score_s_raw IS NOT NULL AND score_s_blip IS NOT NULL").to_pylist() == [{"n": DISTINCT}]
    sizes = json.loads((world["root"] / "ref_out" / "sizes.json").read_text())
    assert sum(sizes.values()) == DISTINCT
    assert sum(len(_tar_members(t)) for t in (world["root"] / "ref_out").glob("*.tar")) == 3 * DISTINCT
    assert stats(ref).counts["duplicate_uids"] == 0
    # mix "both" pairs each image twice, never more
    copy = shutil.copytree(ref, tmp_path / "ds")
    mix(copy, "both", synthetic="blip", name="both")
    assert Dataset(copy).query("SELECT count(*) AS n FROM selection_both").to_pylist() == [{"n": 2 * DISTINCT}]


def test_concurrent_parts_of_every_stage_equal_a_sequential_run(world, tmp_path):
    pipe, ds, out = world["pipe"], tmp_path / "ds", tmp_path / "out"
    for stage in STAGES:
        args = pipe.args(stage, world["web"], ds, out)
        if stage == "mix":  # one selection file: not split into parts
            finish([cli(args)])
            continue
        outs = finish([cli([*args, "--part", f"{i}/2"]) for i in range(2)])
        if stage == "ingest":
            assert sum(o["counts"].get("duplicate_uids", 0) for o in outs) == 2
    assert content(ds, out) == world["ref"]


def test_kill_9_at_random_points_of_every_stage_then_resume_equals_a_sequential_run(world, tmp_path):
    """Each stage is killed at a seeded random file commit (before or after its rename), then re-run."""
    seed = chaos_seed()
    rng = random.Random(seed)
    pipe, ds, out = world["pipe"], tmp_path / "ds", tmp_path / "out"
    points: list[str] = []
    with replayable(seed, points):
        for stage in STAGES:
            args = pipe.args(stage, world["web"], ds, out)
            # every stage commits at least 3 files (lineage entry, outputs, finish): each point is reached
            point = f"{rng.randint(1, 3)}:{rng.choice(['before', 'after'])}"
            points.append(f"{stage}={point}")
            if stage in ("recaption", "shard"):  # and one of two concurrent parts dies while the other goes on
                finish([cli([*args, "--part", "0/2"], kill=point)], killed=True)
                finish([cli([*args, "--part", "1/2"])])
            else:
                finish([cli(args, kill=point)], killed=True)
            finish([cli(args)])
        assert content(ds, out) == world["ref"]


def test_overwrite_chain_reingest_recaption_score_recomputes_what_changed(world, tmp_path):
    """New images under the same uids: captions and scores are stale until recomputed, then equal a clean
    run on the new images; a recaption --overwrite makes its score column stale until score runs."""
    pipe, ds, out = world["pipe"], tmp_path / "ds", tmp_path / "out"
    shutil.copytree(world["root"] / "ref", ds)
    finish([cli([*pipe.args("ingest", world["web_new"], ds, out), "--overwrite"])])
    st = stats(ds)
    assert set(st.details["stale_columns"]) == {"cap_blip", "score_s_raw", "score_s_blip"}
    assert "stale" in st.message

    (rec,) = finish([cli(pipe.args("recaption", world["web_new"], ds, out))])
    assert rec["counts"]["shards_processed"] == 3  # not resumed over captions of the old images
    assert set(stats(ds).details["stale_columns"]) == {"score_s_raw", "score_s_blip"}
    (sc,) = finish([cli(pipe.args("score", world["web_new"], ds, out))])
    assert sc["counts"]["shards_processed"] == 3
    assert stats(ds).details["stale_columns"] == {}
    for stage in ("mix", "shard"):
        finish([cli([*pipe.args(stage, world["web_new"], ds, out), "--overwrite"])])
    assert content(ds, out) == world["ref_new"]

    # recaption --overwrite with other parameters: score's blip column is stale, its raw column is not
    before = pq.read_table(ds / "scores" / "s").to_pydict()
    finish([cli([*pipe.args("recaption", world["web_new"], ds, out), "--max-new-tokens", "2", "--overwrite"])])
    stale = stats(ds).details["stale_columns"]
    assert list(stale) == ["score_s_blip"]  # shards whose captions came out the same bytes stay fresh
    (sc,) = finish([cli(pipe.args("score", world["web_new"], ds, out))])
    assert sc["counts"]["shards_processed"] == stale["score_s_blip"] and stats(ds).details["stale_columns"] == {}
    after = pq.read_table(ds / "scores" / "s").to_pydict()
    assert _rounded(after["score_s_raw"]) == _rounded(before["score_s_raw"])
    assert _rounded(after["score_s_blip"]) != _rounded(before["score_s_blip"])
    caps = {r["uid"]: r["caption"] for r in pq.read_table(ds / "captions" / "blip").to_pylist()}
    assert all(len((c or "").split()) <= 2 for c in caps.values())

"""train / eval / model references on a bucket (a local S3 server): the same results as local folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import tiny_clip_config, write_eval_set, write_textured_shards
from typer.testing import CliRunner

from capcurate import storage
from capcurate.cli import app
from capcurate.errors import InputError


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CAPCURATE_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def upload_tree(local: Path, url: str) -> None:
    for f in sorted(local.rglob("*")):
        if f.is_file():
            storage.upload(f, storage.path(url) / f.relative_to(local).as_posix())


def download_tree(url: str, local: Path) -> None:
    q = storage.path(url)
    q.fs.get(q.path.rstrip("/") + "/", str(local), recursive=True)


def loss_rows(text: str) -> list[dict]:
    rows = [json.loads(x) for x in text.splitlines() if x.strip()]
    return [{k: r[k] for k in ("step", "epoch", "loss", "contrastive_loss", "lr")} for r in rows if "loss" in r]


ROOT = Path(__file__).resolve().parents[1]
OPTS = ["--batch-size", "8", "--epochs", "2", "--lr", "2e-3", "--workers", "1", "--shuffle-buffer", "10",
        "--save-every", "2", "--seed", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, s3_server):
    """One tiny run from local shards into a local folder (CLI), and the same shards in a bucket."""
    import boto3

    root = tmp_path_factory.mktemp("train")
    write_textured_shards(root / "shards", 2, 16)  # crops differ visibly: the augmentation seed shows
    write_eval_set(root / "eval")
    cfg = tiny_clip_config(root)
    import uuid

    name = f"storage-train-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    b = f"s3://{name}"
    upload_tree(root / "shards", f"{b}/shards")
    upload_tree(root / "eval", f"{b}/eval")
    import torch

    torch.set_num_threads(1)
    r = CliRunner().invoke(app, ["train", str(root / "shards"), "-o", str(root / "run"), "--model-config", str(cfg),
                                 *OPTS])
    assert r.exit_code == 0, r.output
    return {"root": root, "cfg": cfg, "bucket": b}


def test_bucket_shards_to_bucket_run_with_a_resume_equal_the_local_run(trained):
    root, b = trained["root"], trained["bucket"]
    run = f"{b}/runs/x"
    opts = ["--model-config", str(trained["cfg"]), *OPTS]
    # kill -9 after step 5 (the last checkpoint: step 4), then --resume latest from the bucket
    env = {**os.environ, "CAPCURATE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "CAPCURATE_TRAIN_KILL_AT_STEP": "5"}
    p = subprocess.run([sys.executable, "-m", "capcurate", "train", f"{b}/shards", "-o", run, *opts], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    # the stored metrics.jsonl holds every line up to the checkpoint (uploaded before it)
    assert [x["step"] for x in loss_rows(storage.path(run).joinpath("metrics.jsonl").read_text())][:4] == [1, 2, 3, 4]
    # a checkpoint an upload kill cut off (no COMPLETE marker) is not one, and the next save removes it
    storage.upload(root / "shards" / "manifest.json", storage.path(run) / "checkpoints/step_00000099/meta.json")
    from capcurate.train import checkpoint as ck

    assert [d.name for d in ck.checkpoint_dirs(run)] == ["step_00000002", "step_00000004"]
    assert ck.resolve_resume(run, f"{run}/checkpoints/step_00000002").name == "step_00000002"
    with pytest.raises(InputError, match="complete checkpoint"):
        ck.resolve_resume(run, f"{run}/checkpoints/step_00000099")
    r = CliRunner().invoke(app, ["train", f"{b}/shards", "-o", run, *opts, "--resume", "latest", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["details"]["resumed_from"].endswith("step_00000004")
    local = root / "run"
    stored = storage.path(run)
    want = loss_rows((local / "metrics.jsonl").read_text())
    assert len(want) == 8 and loss_rows(stored.joinpath("metrics.jsonl").read_text()) == want
    # the same weights: exported model and both kept checkpoints, byte for byte
    for rel in ("model/open_clip_model.safetensors", "model/open_clip_config.json",
                "checkpoints/step_00000008/model.safetensors", "checkpoints/step_00000006/model.safetensors"):
        assert stored.joinpath(rel).read_bytes() == (local / rel).read_bytes(), rel
    assert [d.name for d in ck.checkpoint_dirs(run)] == [d.name for d in ck.checkpoint_dirs(local)] == \
        ["step_00000006", "step_00000008"]
    names = storage.list_names(stored / "checkpoints/step_00000008")
    assert names == {"model.safetensors", "state.pt", "meta.json", "COMPLETE"}
    assert storage.list_dirs(stored / "checkpoints") == ["step_00000006", "step_00000008"]  # partial 99 gone
    assert storage.exists(stored / "run.json") and storage.exists(stored / "summary.json")

    # eval of the bucket run (a model ref downloaded into the cache) on the stored eval set, into the bucket
    r = CliRunner().invoke(app, ["eval", run, "--data", f"{b}/eval", "--output", f"{b}/evals/e.json", "--json"])
    assert r.exit_code == 0, r.output
    remote = json.loads(r.stdout)["details"]["results"]
    r = CliRunner().invoke(app, ["eval", str(local), "--data", str(root / "eval"), "--json"])
    assert r.exit_code == 0, r.output
    here = json.loads(r.stdout)["details"]["results"]
    assert [x["metrics"] for x in remote] == [x["metrics"] for x in here]
    assert {x["task"] for x in remote} == {"zeroshot_classification", "zeroshot_retrieval"}
    written = json.loads(storage.path(f"{b}/evals/e.json").read_text())
    assert [x["metrics"] for x in written] == [x["metrics"] for x in here]


def test_shard_specs_on_a_bucket_are_listed_not_downloaded(trained, monkeypatch):
    from capcurate.train.shard_list import check_members, resolve_shards

    b = trained["bucket"]
    folder = resolve_shards(f"{b}/shards")
    manifest = resolve_shards(f"{b}/shards/manifest.json")
    pattern = resolve_shards(f"{b}/shards/{{00000..00001}}.tar")
    want = [f"{b}/shards/00000.tar", f"{b}/shards/00001.tar"]
    assert folder.urls == manifest.urls == pattern.urls == want
    assert folder.num_samples == manifest.num_samples == 32 and pattern.num_samples is None
    with pytest.raises(InputError, match="1 of 3 shards do not exist"):
        resolve_shards(f"{b}/shards/{{00000..00002}}.tar")
    # the first shard's members are probed from its head: a big shard is not downloaded for it
    import s3fs.core
    from train_fixtures import colour_image

    from capcurate.shards import TarShardWriter

    big = trained["root"] / "big.tar"
    with TarShardWriter(big) as w:
        for i in range(96):
            w.write(f"k{i:04d}", {"jpg": colour_image("red"), "txt": b"a red square", "bin": os.urandom(2**17)})
    storage.upload(big, storage.path(f"{b}/big/00000.tar"))
    fetched = []
    real = s3fs.core.S3File._fetch_range

    def counted(self, start, end):
        fetched.append(end - start)
        return real(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)
    check_members(f"{b}/big/00000.tar")
    assert fetched and sum(fetched) < big.stat().st_size / 2, (sum(fetched), big.stat().st_size)
    check_members(want[0])  # and the training shards pass the probe
    with TarShardWriter(trained["root"] / "notext.tar") as w:
        w.write("k0", {"jpg": colour_image("red"), "json": b"{}"})
    storage.upload(trained["root"] / "notext.tar", storage.path(f"{b}/notext/00000.tar"))
    with pytest.raises(InputError, match="no text members"):
        check_members(f"{b}/notext/00000.tar")


def test_train_on_missing_bucket_data_creates_no_output(trained, tmp_path):
    b = trained["bucket"]
    for data in (f"{b}/no-such-shards", f"{b}/no-such/manifest.json", f"{b}/shards/{{00007..00008}}.tar"):
        out = tmp_path / "never"
        r = CliRunner().invoke(app, ["train", data, "-o", str(out), "--model-config", str(trained["cfg"])])
        assert r.exit_code == 2, (data, r.output)
        assert not out.exists()
        r = CliRunner().invoke(app, ["train", data, "-o", f"{b}/runs/never", "--model-config", str(trained["cfg"])])
        assert r.exit_code == 2, (data, r.output)
        assert storage.list_entries(f"{b}/runs/never") == []
    r = CliRunner().invoke(app, ["train", f"{b}/shards", "-o", "s3://no-such-bucket-zz/run", "--model-config",
                                 str(trained["cfg"])])
    assert r.exit_code == 2 and "does not exist" in r.output, r.output


def test_an_s3_model_ref_scores_like_its_local_copy_and_downloads_once(trained, tmp_path, tiny_dataset):
    import pyarrow.parquet as pq

    from capcurate.dataset import Dataset
    from capcurate.models.ref import cache_root, parse_model_ref
    from capcurate.stages.score import score

    root, b = trained["root"], trained["bucket"]
    url = f"{b}/runs/scorer"
    upload_tree(root / "run", url)
    ref = parse_model_ref(url)
    assert ref.kind == "openclip" and ref.url == url and ref.describe()["url"] == url and ref.version
    assert ref.local_dir is not None and ref.local_dir.parent.parent == cache_root()
    assert sorted(p.name for p in ref.local_dir.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert parse_model_ref(url).local_dir == ref.local_dir and len(list(cache_root().iterdir())) == 1
    a = score(str(tiny_dataset), str(root / "run"), "here", workers=0, device="cpu", precision="fp32")
    s = score(str(tiny_dataset), url, "there", workers=0, device="cpu", precision="fp32")
    assert a.ok and s.ok
    (col_a,), (col_s,) = a.details["columns"], s.details["columns"]
    here = pq.read_table(tiny_dataset / "scores" / "here").to_pylist()
    there = pq.read_table(tiny_dataset / "scores" / "there").to_pylist()
    assert [r[col_a] for r in here] == [r[col_s] for r in there]
    assert sum(r[col_a] is not None for r in here) == 21
    entry = Dataset(tiny_dataset).card.lineage("scores", "there")[-1]
    assert entry["model"]["url"] == url and entry["model"]["reference"] == url
    # a re-uploaded model is a new version (other ETags): downloaded again, into a new cache folder
    changed = tmp_path / "open_clip_config.json"
    changed.write_text(json.dumps(json.loads((root / "run" / "model" / "open_clip_config.json").read_text())))
    storage.upload(changed, storage.path(url) / "model" / "open_clip_config.json")
    again = parse_model_ref(url)
    assert again.local_dir != ref.local_dir and again.version != ref.version
    assert len([p for p in cache_root().iterdir() if not p.name.startswith(".")]) == 2


def test_an_s3_hf_captioner_captions_like_its_local_copy(bucket, tmp_path, tiny_dataset):
    import pyarrow.parquet as pq
    from captioner_fixtures import build_tiny_blip

    from capcurate.stages.recaption import recaption

    ref = build_tiny_blip(tmp_path / "models")
    local_dir = Path(ref[len("hf:"):])
    url = f"{bucket}/models/blip"
    upload_tree(local_dir, url)
    opts = dict(max_new_tokens=6, workers=0, batch_size=8, device="cpu", decoding="greedy")
    assert recaption(str(tiny_dataset), model=ref, name="here", **opts).ok
    assert recaption(str(tiny_dataset), model=url, name="there", **opts).ok
    here = pq.read_table(tiny_dataset / "captions" / "here").to_pylist()
    there = pq.read_table(tiny_dataset / "captions" / "there").to_pylist()
    assert [r["caption"] for r in here] == [r["caption"] for r in there]
    assert sum(bool(r["caption"]) for r in here) == 21
    from capcurate.dataset import Dataset

    entry = Dataset(tiny_dataset).card.lineage("captions", "there")[-1]
    assert entry["model"]["url"] == url and entry["model"]["kind"] == "hf"


def test_a_parquet_eval_set_in_a_bucket_evaluates_like_its_local_copy(trained, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from train_fixtures import COLOURS, colour_image

    from capcurate.train.evaluation import evaluate

    root = tmp_path / "pq"
    (root / "img").mkdir(parents=True)
    rows = []
    for c, name in enumerate(COLOURS):
        (root / "img" / f"{name}.png").write_bytes(colour_image(name, fmt="PNG"))
        rows.append({"image": f"img/{name}.png", "label": c, "caption": f"a {name} square"})
    pq.write_table(pa.Table.from_pylist(rows), root / "test.parquet")
    (root / "classnames.txt").write_text("\n".join(COLOURS))
    url = f"{trained['bucket']}/evalsets/pq"
    upload_tree(root, url)
    model = str(trained["root"] / "run")
    here = evaluate(model, str(root), device="cpu", precision="fp32").details["results"]
    there = evaluate(model, url, device="cpu", precision="fp32").details["results"]
    assert [x["metrics"] for x in there] == [x["metrics"] for x in here]
    assert there[0]["num_samples"] == len(COLOURS) and there[0]["dataset"] == "pq"
    storage.remove(storage.path(url) / "test.parquet")  # neither test.parquet nor test/*.tar now
    storage.upload(root / "test.parquet", storage.path(url) / "test.pq")
    with pytest.raises(InputError, match="found classnames.txt, img, test.pq"):
        evaluate(model, url, device="cpu")


def test_pretrained_weights_in_a_bucket_score_and_train_like_the_local_file(bucket, tmp_path, tiny_dataset):
    """--pretrained s3://.../weights.pt: one download into the cache, keyed by the object's ETag; the URL and
    version are what lineage records."""
    import pyarrow.parquet as pq
    import torch
    from scorer_fixtures import save_tiny_openclip

    from capcurate.dataset import Dataset
    from capcurate.models.ref import cache_root
    from capcurate.stages.score import score
    from capcurate.train.config import TrainConfig
    from capcurate.train.model_setup import build_model

    cfg, weights = save_tiny_openclip(tmp_path / "clip")
    url = f"{bucket}/weights/{weights.name}"
    storage.upload(weights, storage.path(url))
    opts = dict(workers=0, device="cpu", precision="fp32")
    assert score(str(tiny_dataset), f"openclip:{cfg}", "here", pretrained=str(weights), **opts).ok
    assert score(str(tiny_dataset), f"openclip:{cfg}", "there", pretrained=url, **opts).ok
    here, there = (pq.read_table(tiny_dataset / "scores" / n).to_pylist() for n in ("here", "there"))
    assert [r["score_here_raw"] for r in here] == [r["score_there_raw"] for r in there]
    model = Dataset(tiny_dataset).card.lineage("scores", "there")[-1]["model"]
    assert model["pretrained_url"] == url and model["pretrained_version"]
    assert len([p for p in cache_root().iterdir() if not p.name.startswith(".")]) == 1   # downloaded once

    def first_weight(pretrained: str) -> torch.Tensor:
        setup = build_model(TrainConfig(data="x", output="y", model_config=str(cfg), pretrained=pretrained),
                            torch.device("cpu"))
        return next(iter(setup.model.state_dict().values()))

    assert torch.equal(first_weight(url), first_weight(str(weights)))
    r = CliRunner().invoke(app, ["score", str(tiny_dataset), "--model", f"openclip:{cfg}", "--pretrained",
                                 f"{bucket}/weights/missing.pt", "--name", "z"])
    assert r.exit_code == 4 and "no such object" in r.output and len(r.output.strip().splitlines()) == 1, r.output

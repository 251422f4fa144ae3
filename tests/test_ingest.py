"""capcurate ingest: webdataset tars (bad members, unsafe keys, truncation), image folders, img2dataset output."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from http_fixtures import make_image, png_bomb_header
from typer.testing import CliRunner

from capcurate.cli import app
from capcurate.dataset import Dataset
from capcurate.shards import TarShardWriter, index_tar
from capcurate.stages.ingest import ingest

runner = CliRunner()


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_ingest_webdataset_makes_keys_safe_and_counts_bad_members(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    write_tar(src / "a.tar", [
        ("plain.jpg", make_image(1)), ("plain.txt", b"a plain caption"),
        ("photo.2021.v2.jpg", make_image(2)), ("photo.2021.v2.txt", b"dotted key"),
        ("../escape.png", make_image(3, fmt="PNG")), ("../escape.json", json.dumps({"caption": "from json",
                                                                                  "url": "http://x/e.png"}).encode()),
        ("webp.webp", make_image(4, fmt="WEBP")),
        ("label.cls", b"3"),                                     # a sample with no image
        ("fake.jpg", b"<html>not an image</html>"), ("fake.txt", b"fake"),
        ("bomb.png", png_bomb_header()),
    ])
    full = [(f"s{i}.jpg", make_image(10 + i, (64, 64))) for i in range(6)]
    write_tar(src / "b.tar", full)
    data = (src / "b.tar").read_bytes()
    (src / "b.tar").write_bytes(data[: len(data) // 2])         # truncated mid-way

    s = ingest(src, tmp_path / "ds")

    assert s.ok and s.counts["kind"] == "webdataset" and s.counts["shards_processed"] == 2
    assert s.counts["truncated_tars"] == 1 and s.counts["samples_without_image"] == 1
    assert s.counts["non_image_members"] == 1 and s.counts["bad_images"] == 2
    ds = Dataset(tmp_path / "ds")
    rows = {r["source_key"]: r for r in ds.query("SELECT * FROM samples WHERE shard = '00000'").to_pylist()}
    assert set(rows) == {"plain", "photo.2021.v2", "../escape", "webp", "fake", "bomb"}
    assert rows["photo.2021.v2"]["caption"] == "dotted key" and rows["../escape"]["caption"] == "from json"
    assert rows["../escape"]["url"] == "http://x/e.png" and rows["plain"]["width"] == 40
    assert rows["fake"]["status"] != "success" and "too large" in rows["bomb"]["error_message"]
    assert all(r["key"].isdigit() for r in rows.values())
    with tarfile.open(ds.shard_path("00000")) as tf:
        names = tf.getnames()
    assert all("/" not in n and n.count(".") == 1 for n in names)
    assert {n.split(".")[1] for n in names} == {"jpg", "png", "webp", "txt", "json"}
    n_b = ds.query("SELECT count(*) AS n FROM samples WHERE shard = '00001'").column("n")[0].as_py()
    assert 0 < n_b < 6                                           # the readable prefix of the cut tar


def test_ingest_image_folder_with_sidecar_captions_reshards_and_resumes(tmp_path):
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        (src / ("sub" if i % 2 else "") / f"im{i}.jpg").write_bytes(make_image(i))
    (src / "im0.txt").write_text("caption zero\n")
    (src / "sub" / "im1.txt").write_text("caption one")
    args = ["ingest", str(src), "-o", str(tmp_path / "ds"), "--samples-per-shard", "2", "--json"]

    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"]["shards_processed"] == 3
    ds = Dataset(tmp_path / "ds")
    caps = dict(ds.connect().execute("SELECT source_key, caption FROM samples").fetchall())
    assert caps == {"im0.jpg": "caption zero", "im2.jpg": None, "im4.jpg": None,
                    "sub/im1.jpg": "caption one", "sub/im3.jpg": None}

    ds.samples_path("00001").unlink()                            # as if killed before finishing shard 1
    again = json.loads(runner.invoke(app, args).stdout)["counts"]
    assert (again["shards_processed"], again["shards_skipped"]) == (1, 2)
    assert ds.connect().execute("SELECT count(DISTINCT uid), count(*) FROM samples").fetchone() == (5, 5)

    # a damaged manifest (0 bytes, garbage) is not a finished shard: ingest writes it again
    before = pq.read_table(ds.samples_path("00002"))
    ds.samples_path("00002").write_bytes(b"")
    ds.samples_path("00000").write_bytes(b"not parquet at all")
    again = json.loads(runner.invoke(app, args).stdout)["counts"]
    assert (again["shards_processed"], again["shards_skipped"]) == (2, 1)
    assert pq.read_table(ds.samples_path("00002")).equals(before)
    assert ds.connect().execute("SELECT count(DISTINCT uid), count(*) FROM samples").fetchall() == [(5, 5)]


def test_ingest_adopts_img2dataset_output(tmp_path):
    src = tmp_path / "i2d"
    src.mkdir()
    rows = []
    with TarShardWriter(src / "00000.tar") as w:
        for i in range(3):
            key = f"0000000{i:02d}"
            w.write(key, {"jpg": make_image(i), "txt": f"cap {i}".encode()})
            rows.append({"uid": f"u{i}", "caption": f"cap {i}", "url": f"http://h/{i}.jpg", "key": key,
                         "status": "success", "error_message": None, "width": 40, "height": 30,
                         "original_width": 40, "original_height": 30, "exif": None, "sha256": "0" * 64})
    rows.append({**rows[0], "uid": "u9", "key": "000000009", "status": "failed_to_download",
                 "error_message": "HTTP Error 404: Not Found", "width": None})
    pq.write_table(pa.Table.from_pylist(rows), src / "00000.parquet")
    (src / "00000_stats.json").write_text(json.dumps({"count": 4, "successes": 3}))
    (src / "00001.tar").write_bytes(b"partial")                   # unfinished shard: no stats, ignored

    s = ingest(src, tmp_path / "ds", link=True)
    assert s.counts["kind"] == "img2dataset" and (s.counts["samples"], s.counts["ok"]) == (4, 3)
    ds = Dataset(tmp_path / "ds")
    assert ds.shard_ids() == ["00000"] and len(index_tar(ds.shard_path("00000")).samples) == 3
    assert sorted(ds.connect().execute("SELECT uid FROM samples").fetchall()) == [("u0",), ("u1",), ("u2",), ("u9",)]


def test_ingest_refuses_foreign_output_and_empty_input(tmp_path):
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["ingest", str(tmp_path / "empty"), "-o", str(tmp_path / "ds")])
    assert r.exit_code == 2 and "found no" in r.output and not (tmp_path / "ds").exists()
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "a.png").write_bytes(make_image(0, fmt="PNG"))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "x").write_text("x")
    r = runner.invoke(app, ["ingest", str(src), "-o", str(out)])
    assert r.exit_code == 3 and "--force" in r.output
    assert runner.invoke(app, ["ingest", str(src), "-o", str(out), "--force"]).exit_code == 0

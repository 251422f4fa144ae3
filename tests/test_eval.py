"""capcurate eval: metric definitions against hand computations, eval-set layouts, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_fixtures import COLOURS, colour_image, tiny_clip_config, write_eval_set
from typer.testing import CliRunner

from capcurate.cli import app
from capcurate.errors import InputError
from capcurate.train.evalset import open_eval_set
from capcurate.train.evaluation import evaluate_encoders, retrieval_metrics, zeroshot_metrics


def unit(*rows: list[float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_zeroshot_metrics_equal_a_hand_computation():
    # 3 classes on the axes; 4 images: two right, one whose 2nd guess is right, one fully wrong
    classes = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    images = unit([1, .1, 0], [0, 1, .2], [.9, .5, 0], [0, .4, 1])
    labels = torch.tensor([0, 1, 1, 0])
    m = zeroshot_metrics(images, classes, labels)
    assert m["acc1"] == pytest.approx(2 / 4)
    assert m["acc5"] == pytest.approx(1.0)  # top-5 with 3 classes covers everything
    assert m["mean_per_class_recall"] == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_retrieval_recall_equals_a_hand_computation():
    images = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    # texts 0,1 describe image 0; text 2 image 1 but looks like image 2; text 3 image 2
    texts = unit([1, 0, 0], [.2, 1, 0], [0, .3, 1], [0, 0, 1])
    m = retrieval_metrics(images, texts, torch.tensor([0, 0, 1, 2]), ks=(1, 2))
    # per text, is its image first: text0 yes, text1 no (image 1 first), text2 no, text3 yes
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 4)
    # top-2: text1 -> {1, 0} yes; text2 -> {2, 1} yes
    assert m["image_retrieval_recall@2"] == pytest.approx(4 / 4)
    # per image, is one of its texts first: image0 -> text0 yes; image1 -> text1 (no); image2 -> text3 yes
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    # image1 top-2 texts: text1 (1.0/|.|) and text2 (.3/|.|): text2 is its own -> yes
    assert m["text_retrieval_recall@2"] == pytest.approx(3 / 3)


def _oracle_encoders():
    """Encoders that map each colour image and each colour word to that colour's axis."""
    names = list(COLOURS)

    def preprocess(im):
        return torch.tensor(im.getpixel((0, 0)), dtype=torch.float32)

    def enc_img(x):
        ref = torch.tensor([COLOURS[n] for n in names], dtype=torch.float32)
        idx = torch.cdist(x, ref).argmin(dim=1)
        return torch.nn.functional.one_hot(idx, len(names)).float()

    def enc_txt(texts):
        idx = torch.tensor([next(i for i, n in enumerate(names) if n in t) for t in texts])
        return torch.nn.functional.one_hot(idx, len(names)).float()

    return preprocess, enc_img, enc_txt


def test_an_oracle_model_scores_perfectly_on_the_webdataset_layout(tmp_path):
    es = open_eval_set(write_eval_set(tmp_path / "eval", per_class=1))
    res = {r["task"]: r for r in evaluate_encoders(es, *_oracle_encoders(), model_name="oracle")}
    assert res["zeroshot_classification"]["metrics"] == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    assert all(v == 1.0 for v in res["zeroshot_retrieval"]["metrics"].values())
    assert res["zeroshot_classification"]["dataset"] == "eval" and res["zeroshot_classification"]["model"] == "oracle"


def test_parquet_and_images_folder_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "pq"
    (root / "img").mkdir(parents=True)
    rows = []
    for c, name in enumerate(COLOURS):
        (root / "img" / f"{name}.png").write_bytes(colour_image(name, fmt="PNG"))
        rows.append({"image": f"img/{name}.png", "label": c, "caption": f"a {name} square"})
    rows.append({"image": "img/red.png", "label": 0, "caption": None})
    pq.write_table(pa.Table.from_pylist(rows), root / "test.parquet")
    (root / "classnames.txt").write_text("\n".join(COLOURS))
    res = {r["task"]: r for r in evaluate_encoders(open_eval_set(root), *_oracle_encoders())}
    assert res["zeroshot_classification"]["num_samples"] == len(COLOURS) + 1
    assert res["zeroshot_retrieval"]["num_texts"] == len(COLOURS)
    assert res["zeroshot_classification"]["metrics"]["acc1"] == 1.0


def test_eval_set_of_unknown_layout_is_refused_naming_what_was_found(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "readme.md").write_text("hi")
    with pytest.raises(InputError, match="readme.md"):
        open_eval_set(tmp_path / "x")


def test_eval_cli_on_an_open_clip_config_writes_clip_benchmark_json(tmp_path):
    evalset = write_eval_set(tmp_path / "eval", per_class=1)
    cfg = tiny_clip_config(tmp_path)
    out = tmp_path / "results.json"
    r = CliRunner().invoke(app, ["eval", f"openclip:{cfg}", "--pretrained", "random", "--data", str(evalset),
                                  "--output", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    written = json.loads(out.read_text())
    assert [x["task"] for x in written] == ["zeroshot_classification", "zeroshot_retrieval"]
    for x in written:
        assert {"dataset", "model", "task", "metrics"} <= set(x)
        assert all(0.0 <= v <= 1.0 for v in x["metrics"].values())
    assert summary["counts"]["zeroshot_classification/acc1"] == pytest.approx(
        written[0]["metrics"]["acc1"], abs=1e-6)


def test_eval_of_an_unresolvable_model_exits_4(tmp_path):
    evalset = write_eval_set(tmp_path / "eval", per_class=1)
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "nope"), "--data", str(evalset)])
    assert r.exit_code == 4


@pytest.fixture(autouse=True)
def _paths(monkeypatch):
    monkeypatch.chdir(Path(__file__).parent)

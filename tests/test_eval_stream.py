"""capcurate eval on the shared image input pipeline: --workers, --decode and --batch-size change speed,
never the metrics (compared with the serial reference path on the same data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from scorer_fixtures import save_tiny_openclip
from train_fixtures import COLOURS, colour_image, textured_image
from typer.testing import CliRunner

from capcurate.cli import app
from capcurate.errors import InputError
from capcurate.inputs import Preprocess
from capcurate.models.scorers import load_scorer
from capcurate.train.evalset import open_eval_set
from capcurate.train.evaluation import evaluate, evaluate_encoders, evaluate_streamed

SIZES = [(48, 40), (40, 56), (64, 64), (30, 36), (96, 50)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    cfg, weights = save_tiny_openclip(tmp_path_factory.mktemp("eval-model"))
    return f"openclip:{cfg}", str(weights)


@pytest.fixture(scope="module")
def evalset(tmp_path_factory) -> Path:
    """22 images over 2 tars: textured JPEGs and PNGs of several sizes (so resize and crop run), one or two
    captions each, a label each; the last image of the second tar is corrupt (left out and counted)."""
    from capcurate.shards import TarShardWriter

    root = tmp_path_factory.mktemp("evalset") / "ev"
    (root / "test").mkdir(parents=True)
    names = list(COLOURS)
    i = 0
    for t, n in enumerate((12, 10)):
        with TarShardWriter(root / "test" / f"{t}.tar") as w:
            for _ in range(n):
                fmt = "PNG" if i % 4 == 3 else "JPEG"
                img = textured_image(i, *SIZES[i % len(SIZES)], fmt=fmt)
                if t == 1 and _ == n - 1:
                    img = b"not an image"
                caps = f"texture {i}\nanother view of texture {i}" if i % 3 == 0 else f"texture {i}"
                w.write(f"s{i:05d}", {"png" if fmt == "PNG" else "jpg": img, "cls": str(i % len(names)).encode(),
                                      "txt": caps.encode()})
                i += 1
    (root / "test" / "nshards.txt").write_text("2\n")
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    return root


def _serial(model, evalset, batch_size):
    ref, weights = model
    sc = load_scorer(ref, pretrained=weights, device="cpu", precision="fp32")
    return evaluate_encoders(open_eval_set(evalset), sc.preprocess, sc.encode_images, sc.encode_texts,
                             batch_size=batch_size, model_name=ref, spec=sc.spec)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_eval_equals_the_serial_path_for_workers_0_and_2(model, evalset, workers):
    ref, weights = model
    want = _serial(model, evalset, batch_size=4)
    got = evaluate(ref, str(evalset), pretrained=weights, workers=workers, decode="cpu", batch_size=4,
                   device="cpu", precision="fp32")
    assert got.details["workers"] == workers and got.details["decode"] == "cpu" and got.details["batch_size"] == 4
    results = got.details["results"]
    assert [r["task"] for r in results] == ["zeroshot_classification", "zeroshot_retrieval"]
    assert [r["metrics"] for r in results] == [r["metrics"] for r in want]
    assert [r["num_samples"] for r in results] == [r["num_samples"] for r in want] == [21, 21]
    assert results[1]["num_texts"] == want[1]["num_texts"] == 28
    assert results[0]["skipped_images"] == want[0]["skipped_images"] == 1
    assert got.details["images_per_s"] > 0


def test_streamed_embeddings_equal_the_serial_ones_row_by_row(model, evalset):
    """Equal metrics could hide a permutation: the embeddings themselves come back in the reader's order."""
    ref, weights = model
    sc = load_scorer(ref, pretrained=weights, device="cpu", precision="fp32")
    es = open_eval_set(evalset)
    seen: dict[str, list[torch.Tensor]] = {"serial": [], "stream": []}

    def recorder(key):
        def enc(x):
            out = sc.encode_images(x)
            seen[key].append(out)
            return out
        return enc

    evaluate_encoders(es, sc.preprocess, recorder("serial"), sc.encode_texts, batch_size=64, spec=sc.spec)
    evaluate_streamed(es, Preprocess(sc.spec, sc.preprocess), recorder("stream"), sc.encode_texts, batch_size=5,
                      workers=2, decode="cpu")
    serial = torch.cat(seen["serial"])
    # the stream's batches come in order and hold rows in order (decode cpu): concatenated, the reader's order
    assert torch.allclose(torch.cat(seen["stream"]), serial, atol=1e-6)


def _oracle():
    """A PIL transform and encoders that map each colour image and colour word to that colour's axis."""
    names = list(COLOURS)

    def preprocess(im):
        return torch.tensor(im.getpixel((0, 0)), dtype=torch.float32)

    def enc_img(x):
        ref = torch.tensor([COLOURS[n] for n in names], dtype=torch.float32)
        return torch.nn.functional.one_hot(torch.cdist(x, ref).argmin(dim=1), len(names)).float()

    def enc_txt(texts):
        idx = torch.tensor([next(i for i, n in enumerate(names) if n in t) for t in texts])
        return torch.nn.functional.one_hot(idx, len(names)).float()

    return preprocess, enc_img, enc_txt


def test_a_parquet_eval_set_streams_through_the_models_own_transform(tmp_path):
    """Parquet rows (file paths and inline bytes) are packed into a scratch tar; a model without an
    ImageSpec gets its own PIL transform in the workers; the scratch folder is gone afterwards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "pq"
    (root / "img").mkdir(parents=True)
    rows = []
    for c, name in enumerate(COLOURS):
        (root / "img" / f"{name}.png").write_bytes(colour_image(name, fmt="PNG"))
        rows.append({"image": f"img/{name}.png", "label": c, "caption": f"a {name} square"})
    rows.append({"image": "img/red.png", "label": 0, "caption": None})
    (root / "classnames.txt").write_text("\n".join(COLOURS))
    pre, enc_img, enc_txt = _oracle()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    inline = [{**r, "image": (root / r["image"]).read_bytes()} for r in rows]
    for table in (rows, inline):  # a column of paths, then one of image bytes
        pq.write_table(pa.Table.from_pylist(table), root / "test.parquet")
        res = {r["task"]: r for r in evaluate_streamed(open_eval_set(root), Preprocess(fallback=pre), enc_img,
                                                       enc_txt, batch_size=3, workers=2, scratch=str(scratch))}
        assert res["zeroshot_classification"]["num_samples"] == len(COLOURS) + 1
        assert res["zeroshot_classification"]["skipped_images"] == 0
        assert res["zeroshot_classification"]["metrics"]["acc1"] == 1.0
        assert res["zeroshot_retrieval"]["num_texts"] == len(COLOURS)
        m = res["zeroshot_retrieval"]["metrics"]  # the captionless second red image ties with the first
        assert m["image_retrieval_recall@5"] == 1.0 and m["text_retrieval_recall@1"] == pytest.approx(8 / 9)
        assert list(scratch.iterdir()) == []
    pq.write_table(pa.Table.from_pylist(rows), root / "test.parquet")
    (root / "img" / "red.png").unlink()
    with pytest.raises(InputError, match="'img/red.png' listed in .*test.parquet does not exist"):
        evaluate_streamed(open_eval_set(root), Preprocess(fallback=pre), enc_img, enc_txt, workers=0,
                          scratch=str(scratch))
    assert list(scratch.iterdir()) == []


def test_eval_cli_takes_scores_workers_decode_and_batch_size(model, evalset):
    ref, weights = model
    runner = CliRunner()
    base = ["eval", ref, "--pretrained", weights, "--data", str(evalset), "--json"]
    r = runner.invoke(app, [*base, "--workers", "2", "--decode", "cpu", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert (out["details"]["workers"], out["details"]["decode"], out["details"]["batch_size"]) == (2, "cpu", 4)
    # draft: libjpeg scales JPEGs down while decoding (approximate); every image still gets a prediction
    r = runner.invoke(app, [*base, "--workers", "0", "--decode", "draft"])
    assert r.exit_code == 0, r.output
    draft = json.loads(r.stdout)
    assert draft["details"]["decode"] == "draft" and draft["details"]["batch_size"] == 64
    assert draft["counts"]["images"] == out["counts"]["images"] == 21
    # auto on a machine whose GPU is hidden (conftest): the CPU decoder, one worker per core less one
    r = runner.invoke(app, [*base, "--workers", "auto", "--decode", "auto", "--batch-size", "auto"])
    assert r.exit_code == 0, r.output
    auto = json.loads(r.stdout)
    assert auto["details"]["decode"] == "cpu" and auto["counts"] == out["counts"]
    for bad, words in ((["--decode", "gpu", "--device", "cpu"], "--decode gpu needs --device cuda"),
                       (["--decode", "nvjpeg"], "--decode must be one of"),
                       (["--workers", "many"], "--workers"), (["--batch-size", "0"], "--batch-size")):
        r = runner.invoke(app, [*base, *bad])
        assert r.exit_code == 2 and words in r.output, (bad, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output


def test_streamed_eval_emits_one_batch_event_per_model_batch(model, evalset):
    """The supported timing hook (capcurate.events): one "batch" event per batch the model embedded."""
    from capcurate import events

    ref, weights = model
    seen: list[tuple[str, int]] = []
    with events.listening(lambda kind, n: seen.append((kind, n))):
        evaluate(ref, str(evalset), pretrained=weights, workers=0, batch_size=8, device="cpu", precision="fp32")
    assert [k for k, _ in seen] == ["batch"] * 3 and sum(n for _, n in seen) == 21

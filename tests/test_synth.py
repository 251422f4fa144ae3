"""capcurate synth: the CapWorld demo world (deterministic, documented noise, readable eval set)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from capcurate.stages.synth import synth
from capcurate.world.noise import KINDS, alt_text, resolve_rates
from capcurate.world.scene import COLOURS, SHAPES, sample_scene

N_CLASSES = len(COLOURS) * len(SHAPES)

SMALL = dict(n_images=60, image_size=32, seed_size=30, eval_size=70, shard_size=32)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("capworld") / "world"
    synth(out, seed=3, workers=2, **SMALL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes().replace(str(root.resolve()).encode(), b"ROOT")
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_is_byte_identical_under_the_same_seed_whatever_the_worker_count(world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synth(again, seed=3, workers=1, **SMALL)
    a, b = _files(world), _files(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    other = tmp_path / "other"
    synth(other, seed=4, workers=1, **SMALL)
    assert _files(other)["urls.parquet"] != a["urls.parquet"]


def test_noise_rates_are_what_was_asked_within_tolerance() -> None:
    rates = resolve_rates("web", {"boilerplate": 0.5, "correct": 0.2})
    assert rates.boilerplate == 0.5 and rates.correct == 0.2
    assert abs(sum(rates.kind_rates().values()) - 1) < 1e-9
    # the kinds left unset keep the profile's proportions among themselves
    web = resolve_rates("web")
    assert rates.partial / rates.wrong_object == pytest.approx(web.partial / web.wrong_object)
    rng = random.Random(0)
    n = 6000
    counts = Counter(alt_text(sample_scene(rng), rates, rng)[1] for _ in range(n))
    for kind in KINDS:
        # 4 standard deviations of a binomial proportion
        tol = 4 * (rates.kind_rates()[kind] * (1 - rates.kind_rates()[kind]) / n) ** 0.5 + 1e-9
        assert abs(counts[kind] / n - rates.kind_rates()[kind]) <= tol, (kind, counts)


def test_noise_rates_that_cannot_sum_to_one_are_refused() -> None:
    from capcurate.errors import InputError

    with pytest.raises(InputError, match="more than 1"):
        resolve_rates("web", {"correct": 0.7, "boilerplate": 0.6})
    with pytest.raises(InputError, match="unknown noise profile 'webby'; expected one of web"):
        resolve_rates("webby")
    assert resolve_rates("clean").correct == 1.0


def _described(text: str) -> dict[str, set]:
    """The attribute values a text names, read from its words alone (never from the noise model's code)."""
    from capcurate.world.noise import POSITION_PHRASES
    from capcurate.world.scene import SIZES, plural

    words = set(text.lower().replace(",", " ").split())
    shapes = {s for s in SHAPES if s in words or plural(s, 2) in words}
    return {
        "shape": shapes,
        "count": {1 for s in SHAPES if s in words} | {2 for s in SHAPES if plural(s, 2) in words},
        "colour": words & set(COLOURS),
        "size": words & set(SIZES),
        "position": {p for p, phrase in POSITION_PHRASES.items() if phrase in text},
    }


def test_each_noise_kind_says_what_its_name_says() -> None:
    """correct: every attribute, all true; partial: only true values, at least one attribute missing;
    wrong_attribute: the right shape and exactly one of colour/size/position/count wrong; wrong_object:
    another shape, the rest right; boilerplate: no shape and no colour at all. Every kind is drawn."""
    rng = random.Random(1)
    rates = resolve_rates("web", {"decorate": 0.0})
    seen: Counter = Counter()
    for _ in range(2000):
        scene = sample_scene(rng)
        text, kind = alt_text(scene, rates, rng)
        seen[kind] += 1
        said = _described(text)
        truth = {"shape": scene.shape, "count": scene.count, "colour": scene.colour, "size": scene.size,
                 "position": scene.position}
        named = {a for a, v in said.items() if v}
        assert all(len(v) <= 1 for v in said.values()), (kind, text, said)
        wrong = {a for a in named if said[a] != {truth[a]}}
        if kind == "boilerplate":
            assert not said["shape"] and not said["colour"], text
        elif kind == "correct":
            assert named == set(truth) and not wrong, (text, scene)
        elif kind == "partial":
            assert named and not wrong and named != set(truth), (text, scene)
        elif kind == "wrong_attribute":
            assert named == set(truth) and len(wrong) == 1 and wrong <= {"colour", "size", "position", "count"}, \
                (text, scene)
        elif kind == "wrong_object":
            assert named == set(truth) and wrong == {"shape"}, (text, scene)
        else:
            raise AssertionError(f"unknown kind {kind}")
    assert set(seen) == set(KINDS), seen


def test_every_world_text_tokenizes_without_unknown_words(world: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world / "tokenizer"))
    vocab = tok.get_vocab()
    assert (vocab["[PAD]"], vocab["[SOS]"], vocab["[UNK]"], vocab["[EOS]"]) == (0, 1, 2, len(tok) - 1)
    card = json.loads((world / "synth.json").read_text())
    assert card["vocab_size"] == len(tok)
    import pyarrow.parquet as pq

    urls = pq.read_table(world / "urls.parquet").to_pylist()
    templates = (world / "eval" / "zeroshot_classification_templates.txt").read_text().splitlines()
    classes = (world / "eval" / "classnames.txt").read_text().splitlines()
    texts = [r["caption"] for r in urls] + [r["true_caption"] for r in urls]
    texts += [t.replace("{c}", c) for t in templates for c in classes]
    ids = tok(texts)["input_ids"]
    unknown = [t for t, i in zip(texts, ids, strict=True) if vocab["[UNK]"] in i]
    assert unknown == []
    assert all(i[0] == 1 and i[-1] == len(tok) - 1 for i in ids)
    assert tok.decode(tok("two small red circles on the left")["input_ids"], skip_special_tokens=True) \
        == "two small red circles on the left"


def test_tiny_configs_load_in_open_clip_offline_and_coca_loss_runs(world: Path) -> None:
    import open_clip
    import torch

    from capcurate.models.openclip_loader import load_openclip
    from capcurate.models.ref import parse_model_ref

    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    clip = load_openclip(parse_model_ref(f"openclip:{world}/models/tiny_clip.json", pretrained="random"))
    text = clip.tokenizer(["a small red circle on the left", "IMG_0042.jpg"])
    assert text.shape == (2, 32) and text[0, 0] == 1 and text.max() < clip.model_cfg["text_cfg"]["vocab_size"]
    with torch.no_grad():
        assert clip.model.encode_text(text).shape == (2, 128)
        assert clip.model.encode_image(images).shape == (4, 128)
    coca = load_openclip(parse_model_ref(f"openclip:{world}/models/tiny_coca.json", pretrained="random"))
    coca.model.train()
    out = coca.model(images, coca.tokenizer(["a red circle", "two blue stars", "ring", "logo"]))
    losses = open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)(**out, output_dict=True)
    assert torch.isfinite(sum(losses.values()))
    assert out["logits"].shape[-1] == coca.model_cfg["multimodal_cfg"]["vocab_size"]
    # the CoCa's context is the longest true caption's, rounded up to 8: every seed caption fits, [EOS] kept
    from capcurate.world.tokenizer import true_caption_max_tokens

    assert coca.model_cfg["text_cfg"]["context_length"] == 16 >= true_caption_max_tokens()
    from capcurate.world.captions import true_caption

    rng = random.Random(0)
    ids = coca.tokenizer([true_caption(sample_scene(rng), rng) for _ in range(3000)])
    lengths = (ids > 0).sum(dim=1)
    assert int(lengths.max()) == true_caption_max_tokens()  # the bound is reached, and never passed
    eos = coca.model_cfg["text_cfg"]["vocab_size"] - 1
    assert all(row[int((row > 0).sum()) - 1] == eos for row in ids)
    # the GPU scale's bigger models load and run the same way
    for name, dim in (("small_clip", 256), ("small_coca", 256)):
        m = load_openclip(parse_model_ref(f"openclip:{world}/models/{name}.json", pretrained="random"))
        with torch.no_grad():
            assert m.model.encode_image(images).shape == (4, dim)


def test_eval_set_is_readable_in_clip_benchmark_webdataset_layout(world: Path) -> None:
    import webdataset as wds

    ev = world / "eval"
    n = int((ev / "test" / "nshards.txt").read_text())
    assert n == 3  # 70 samples, 32 per shard
    classes = (ev / "classnames.txt").read_text().splitlines()
    assert len(classes) == N_CLASSES == 48 and "red circle" in classes
    assert all("{c}" in t for t in (ev / "zeroshot_classification_templates.txt").read_text().splitlines())
    urls = [str(ev / "test" / f"{i}.tar") for i in range(n)]
    rows = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "txt"))
    assert len(rows) == 70
    for img, cls, txt in rows:
        assert img.size == (32, 32)
        colour, shape = classes[int(cls)].split(" ")
        assert colour in txt and shape in txt  # the retrieval caption names the class
    assert len({int(c) for _, c, _ in rows}) == N_CLASSES  # balanced: every class appears


def test_retrieval_view_links_the_eval_tars_for_clip_benchmark_and_capcurate_eval(world: Path) -> None:
    from capcurate.train.evalset import open_eval_set

    view = world / "eval_retrieval"
    assert (view / "dataset_type.txt").read_text() == "retrieval\n"  # what clip_benchmark's wds loader reads
    assert (view / "test" / "nshards.txt").read_text() == (world / "eval" / "test" / "nshards.txt").read_text()
    for i in range(3):
        link = view / "test" / f"{i}.tar"
        assert link.read_bytes() == (world / "eval" / "test" / f"{i}.tar").read_bytes()
        assert not link.is_symlink() or not Path(link.readlink()).is_absolute()  # the world can move
    ev = open_eval_set(view)
    assert not ev.classnames and sum(len(s.texts) for s in ev.samples()) == 70  # retrieval only


def test_seed_split_is_written_as_training_shards(world: Path) -> None:
    manifest = json.loads((world / "seed" / "manifest.json").read_text())
    sizes = json.loads((world / "seed" / "sizes.json").read_text())
    assert manifest["total_samples"] == 30 and sizes == {"00000.tar": 30}
    from capcurate.shards import index_tar

    idx = index_tar(world / "seed" / "00000.tar")
    assert all("." not in k and set(m) == {"jpg", "txt", "json"} for k, m in idx.samples.items())


def test_urls_point_at_the_images_under_the_base_url(world: Path) -> None:
    import pyarrow.parquet as pq

    rows = pq.read_table(world / "urls.parquet").to_pylist()
    assert len(rows) == 60 and len({r["uid"] for r in rows}) == 60
    for r in rows:
        assert r["url"].startswith("http://127.0.0.1:8000/images/")
        assert (world / r["url"][len("http://127.0.0.1:8000/"):]).is_file()
    assert set(r["noise_kind"] for r in rows) <= set(KINDS)


def test_synth_cli_writes_a_world_and_refuses_to_overwrite_it(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from capcurate.cli import app

    runner = CliRunner()
    args = ["synth", "-o", str(tmp_path / "w"), "--n-images", "20", "--seed-size", "5", "--eval-size", "64",
            "--image-size", "32", "--noise-profile", "clean", "--base-url", "http://127.0.0.1:9/", "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["counts"]["alt-text correct"] == 20 and summary["counts"]["eval classes"] == N_CLASSES
    res = runner.invoke(app, args)
    assert res.exit_code == 3 and "--overwrite" in res.output
    res = runner.invoke(app, [*args, "--overwrite", "--rate-boilerplate", "0.5"])
    assert res.exit_code == 0, res.output
    # clean has no other kinds to rescale into except 'correct': half boilerplate, half correct
    assert json.loads(res.stdout)["details"]["noise rates"]["boilerplate"] == 0.5
    res = runner.invoke(app, [*args, "--overwrite", "--rate-correct", "0.9", "--rate-partial", "0.9"])
    assert res.exit_code == 2 and "more than 1" in res.output


def test_objects_stay_inside_the_image_apart_from_each_other_and_on_their_positions_line() -> None:
    import math

    from capcurate.world.render import ANCHORS, JITTER, RADIUS, _centres

    rng = random.Random(5)
    for _ in range(3000):
        scene = sample_scene(rng)
        centres = _centres(scene, rng)
        r = RADIUS[scene.size]
        assert len(centres) == scene.count
        assert all(r - 0.02 <= c <= 1 - r + 0.02 for xy in centres for c in xy), (scene, centres)
        if scene.count == 2:
            assert math.dist(*centres) > 2 * r, (scene, centres)  # two objects never overlap
        axis, other = ANCHORS[scene.position]
        across = [y if axis == "x" else x for x, y in centres]
        assert all(abs(a - other) <= JITTER for a in across), (scene, centres)
    # the lines of different positions are further apart than two jitters: no image is ambiguous
    lines = {(axis, other) for axis, other in ANCHORS.values()}
    assert len(lines) == len(ANCHORS)
    for axis in ("x", "y"):
        others = sorted(o for a, o in lines if a == axis)
        assert all(b - a > 2 * JITTER for a, b in zip(others, others[1:], strict=False))


def test_contact_sheet_shows_the_seed_images_at_model_pixels_with_their_captions(tmp_path: Path) -> None:
    import io

    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from capcurate.cli import app
    from capcurate.world.generate import ItemSpec, make_items

    res = CliRunner().invoke(app, ["synth", "-o", str(tmp_path / "w"), "--n-images", "4", "--seed-size", "4",
                                   "--eval-size", "0", "--image-size", "48", "--contact-sheet", "--json"])
    assert res.exit_code == 0, res.output
    sheet_path = Path(json.loads(res.stdout)["details"]["contact_sheet"])
    sheet = np.asarray(Image.open(sheet_path).convert("RGB"))
    assert sheet.shape[1] == 8 * (192 + 8) + 8 and sheet.shape[0] == 6 * (192 + 4 * 12 + 6 + 8) + 8  # 48 cells
    # cell 0 is seed image 0 scaled by 4 with nearest neighbour: every 4x4 block is one model pixel
    first = make_items((ItemSpec("seed", 0, 48, None), 0, 1))[0]
    pixels = np.asarray(Image.open(io.BytesIO(first["image"])).convert("RGB"))
    assert (sheet[8:8 + 192, 8:8 + 192] == np.kron(pixels, np.ones((4, 4, 1), dtype=np.uint8))).all()
    # the caption under it is drawn (dark text on the white band)
    assert (sheet[8 + 192:8 + 192 + 48, 8:8 + 192] < 100).any()
    from capcurate.world.contact_sheet import contact_sheet

    with pytest.raises(ValueError, match="at least one image"):
        contact_sheet([], tmp_path / "empty.png")


def test_rate_options_reach_the_world_through_the_cli(tmp_path) -> None:
    """--rate-wrong-attribute, --rate-wrong-object and --rate-decorate: the drawn kinds follow them, a
    decorated alt-text carries a file name or shop text, and synth.json records the rates."""
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from capcurate.cli import app

    def run(out: str, *rates: str) -> list[dict]:
        res = CliRunner().invoke(app, ["synth", "-o", str(tmp_path / out), "--n-images", "300", "--seed-size", "0",
                                       "--eval-size", "0", "--image-size", "32", "--noise-profile", "clean",
                                       "--base-url", "http://127.0.0.1:9/", "--json", *rates])
        assert res.exit_code == 0, res.output
        return pq.read_table(tmp_path / out / "urls.parquet").to_pylist()

    rows = run("w", "--rate-wrong-attribute", "0.5", "--rate-wrong-object", "0.5", "--rate-decorate", "0")
    kinds = Counter(r["noise_kind"] for r in rows)
    assert set(kinds) == {"wrong_attribute", "wrong_object"} and 100 < kinds["wrong_object"] < 200
    wrong = [r for r in rows if r["noise_kind"] == "wrong_object"]
    assert all(r["true_shape"] not in r["caption"] for r in wrong)  # another shape named instead
    assert all(r["caption"] != r["true_caption"] for r in rows)
    from capcurate.world.noise import FILE_EXTS, SHOP_SUFFIXES

    def extra(caption: str) -> bool:  # a file name or shop text added to the description
        return any(s in caption for s in SHOP_SUFFIXES) or any(f".{e}" in caption for e in FILE_EXTS)

    plain = run("p", "--rate-decorate", "0")
    decorated = run("d", "--rate-decorate", "1")
    assert not any(extra(r["caption"]) for r in plain) and all(extra(r["caption"]) for r in decorated)
    assert {r["noise_kind"] for r in plain + decorated} == {"correct"}  # clean profile: decoration only
    rates = json.loads((tmp_path / "d" / "synth.json").read_text())["parameters"]["noise_rates"]
    assert rates["decorate"] == 1.0 and rates["correct"] == 1.0


def test_pool_shards_ingest_to_the_worlds_uids_and_alt_texts(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from capcurate.stages.ingest import ingest

    world = tmp_path / "world"
    s = synth(world, seed=5, workers=1, pool_shards=True, **{**SMALL, "seed_size": 4, "eval_size": 4})
    assert s.details["pool_shards"] == str(world / "pool")
    summary = ingest(str(world / "pool"), output=str(tmp_path / "ds"))
    assert summary.counts["ok"] == SMALL["n_images"]
    urls = pq.read_table(world / "urls.parquet").to_pylist()
    samples = [r for f in sorted((tmp_path / "ds" / "samples").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert [(r["uid"], r["url"], r["caption"]) for r in samples] == [(r["uid"], r["url"], r["caption"]) for r in urls]
    # the pool shards carry what a crawl gives, never the truth
    assert not any(k.startswith("true_") for k in samples[0])


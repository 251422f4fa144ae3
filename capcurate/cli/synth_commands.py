"""``capcurate synth``: make the CapWorld demo world."""

from __future__ import annotations

import typer

from .app import JSON_HELP, app, run_command


@app.command()
def synth(
    out: str = typer.Option(..., "-o", "--output", help="Folder to write the world into (created if missing)."),
    n_images: int = typer.Option(20000, "--n-images", help="Images in the web-like pool (urls.parquet + images/)."),
    image_size: int = typer.Option(64, "--image-size", help="Side of every rendered image in pixels (32-1024)."),
    noise_profile: str = typer.Option(
        "web", "--noise-profile",
        help="Preset alt-text noise rates: web (most alt-texts do not describe the image), noisy, mild, clean "
             "(every alt-text is a true caption). The --rate-* options override single rates."),
    rate_correct: float = typer.Option(None, "--rate-correct", help="Share of alt-texts that are a true caption."),
    rate_partial: float = typer.Option(None, "--rate-partial",
                                       help="Share that is true but incomplete, e.g. 'red circles'."),
    rate_wrong_attribute: float = typer.Option(
        None, "--rate-wrong-attribute", help="Share describing the right object with one wrong colour/size/position/count."),
    rate_wrong_object: float = typer.Option(None, "--rate-wrong-object", help="Share naming the wrong shape."),
    rate_boilerplate: float = typer.Option(
        None, "--rate-boilerplate", help="Share that is irrelevant: file names, 'click to enlarge', shop text."),
    rate_decorate: float = typer.Option(
        None, "--rate-decorate", help="Chance that a non-boilerplate alt-text also gets a file name or shop text added."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed and options give byte-identical files."),
    base_url: str = typer.Option(
        "http://127.0.0.1:8000", "--base-url",
        help="URL prefix written into urls.parquet: where OUT will be served (e.g. python -m http.server -d OUT)."),
    seed_size: int = typer.Option(2000, "--seed-size",
                                  help="Images in the clean seed split (true captions) that captioner and scorer train on."),
    eval_size: int = typer.Option(1000, "--eval-size", help="Images in the held-out labelled eval set."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per tar shard of the seed and eval splits."),
    workers: int = typer.Option(None, "--workers", help="Processes that render images (default: CPU count, at most 8)."),
    duplicate_rate: float = typer.Option(0.0, "--duplicate-rate", help=(
        "Share of pool images (at most 0.5) that copy an earlier one: exact bytes, resized + re-encoded, or the "
        "same scene drawn again; urls.parquet records duplicate_of (uid) and duplicate_kind as ground truth.")),
    contact_sheet: bool = typer.Option(False, "--contact-sheet", help=(
        "Also write OUT/contact_sheet.png: the first 48 seed images at the pixels the models see (scaled up "
        "by whole pixels), each with its true caption, so a person can check every named attribute is visible.")),
    pool_shards: bool = typer.Option(False, "--pool-shards", help=(
        "Also write OUT/pool/: the pool as webdataset shards (image, alt-text, json with uid and url), to adopt "
        "with 'capcurate ingest OUT/pool -o DATASET' where serving and downloading is not possible.")),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a world already in OUT."),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Render CapWorld: a compositional world of shapes with true captions and noisy web alt-texts.

    Writes OUT/images/ and OUT/urls.parquet (the pool to serve over HTTP and download), OUT/seed/ (a clean split with true captions, as training shards), OUT/eval/ (clip_benchmark's webdataset layout: zero-shot classes '<colour> <shape>' with templates, retrieval captions), OUT/eval_retrieval/ (the same tars as a retrieval dataset), OUT/tokenizer/ (the world's word-level tokenizer) and OUT/models/{tiny,small}_{clip,coca}.json (open_clip configs: use them as openclip:OUT/models/tiny_clip.json; tiny for a CPU, small for a GPU). --contact-sheet adds OUT/contact_sheet.png, --pool-shards OUT/pool/.

    Example: capcurate synth -o world --n-images 20000 --noise-profile web --seed 0
    """
    from ..stages.synth import synth as run

    rates = {"correct": rate_correct, "partial": rate_partial, "wrong_attribute": rate_wrong_attribute,
             "wrong_object": rate_wrong_object, "boilerplate": rate_boilerplate, "decorate": rate_decorate}
    run_command(lambda: run(out, n_images=n_images, image_size=image_size, noise_profile=noise_profile,
                            rates=rates, seed=seed, base_url=base_url, seed_size=seed_size, eval_size=eval_size,
                            shard_size=shard_size, workers=workers, duplicate_rate=duplicate_rate,
                            contact_sheet=contact_sheet, pool_shards=pool_shards, overwrite=overwrite),
                json_out=json)

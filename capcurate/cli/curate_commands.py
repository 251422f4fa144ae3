"""``capcurate mix``, ``capcurate shard`` and ``capcurate report``: from scored captions to training shards."""

from __future__ import annotations

import typer

from .app import ENGINE_HELP, JSON_HELP, MAX_RETRIES_HELP, PART_HELP, app, part_option, run_command

STRATEGY_HELP = (
    "How to pair each image with a caption: raw (alt-text only), synthetic (one captioner's caption), "
    "raw-top+synthetic (raw for the --top-fraction best raw pairs by CLIP score, synthetic for the rest), "
    "best (whichever caption the scorer rates highest), both (each image twice, raw and synthetic), "
    "concat (raw and synthetic in one caption), random (synthetic with probability --p, else raw), "
    "sample (every image once with all its captions kept: shard writes them into the .json and train draws one "
    "per step with --caption-probs)."
)


@app.command()
def mix(
    dataset: str = typer.Argument(..., help="Dataset directory (made by download/ingest), local or a URL (s3://bucket/prefix)."),
    strategy: str = typer.Option(..., "--strategy", "-s", help=STRATEGY_HELP),
    score: str = typer.Option(None, "--score", help="Scorer name whose score_<SCORER>_* columns rank and "
                              "threshold captions (as given to `capcurate score --name`). Defaults to the "
                              "only scorer when there is one."),
    top_fraction: float = typer.Option(None, "--top-fraction", help="Fraction (0-1] of images, ranked by "
                                       "raw-caption score, that keep their raw caption (raw-top+synthetic; "
                                       "with raw: keep only that fraction)."),
    min_score: float = typer.Option(None, "--min-score", help="Minimum score of a raw pair (for best: of "
                                    "the winning pair); also the synthetic threshold unless "
                                    "--synthetic-min-score is given."),
    synthetic: str = typer.Option(None, "--synthetic", help="Captions name to mix in (as given to "
                                  "`capcurate recaption --name`); best accepts a comma-separated list and "
                                  "defaults to all. With several captions per image, the best-scoring one "
                                  "is used when the scorer recorded it."),
    synthetic_min_score: float = typer.Option(None, "--synthetic-min-score",
                                              help="Minimum score of a synthetic pair."),
    p: float = typer.Option(0.5, "--p", help="random: probability of taking the synthetic caption."),
    seed: int = typer.Option(0, "--seed", help="random: seed of the per-image coin (a hash of seed and uid)."),
    separator: str = typer.Option(" ", "--separator", help="concat: text put between raw and synthetic."),
    caption_probs: str = typer.Option(None, "--caption-probs", help="sample: probability of each caption at train "
                                      "time, for raw then each --synthetic name, e.g. 0.2,0.8 (sum 1; default "
                                      "equal); recorded so shards and train carry the recipe."),
    from_selection: str = typer.Option(None, "--from-selection", help="Only images in this selection "
                                       "(e.g. one made by `capcurate filter`)."),
    where: str = typer.Option(None, "--where", help="Only images matching this DuckDB predicate over the "
                              "samples view, e.g. \"width >= 64\"."),
    name: str = typer.Option(None, "--name", help="Selection name to write (selections/<NAME>.parquet); "
                             "default mix_<strategy>."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a selection of that name made "
                                   "with other parameters."),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Mix raw and synthetic captions into a selection (uid, caption, caption_source).

    Example: capcurate mix mydata --strategy raw-top+synthetic --score l14 --top-fraction 0.3
    --synthetic blip --synthetic-min-score 0.25 --name mixA
    """
    from ..stages.mix import mix as mix_fn

    run_command(lambda: mix_fn(
        dataset, strategy, score=score, top_fraction=top_fraction, min_score=min_score,
        synthetic=synthetic, synthetic_min_score=synthetic_min_score, p=p, seed=seed, separator=separator,
        caption_probs=caption_probs,
        from_selection=from_selection, where=where, name=name, overwrite=overwrite,
    ), json_out=json)


@app.command()
def shard(
    dataset: str = typer.Argument(..., help="Dataset directory holding the selection and source shards, local or a URL (s3://bucket/prefix)."),
    selection: str = typer.Option(..., "--selection", help="Selection to write (made by mix or filter)."),
    out: str = typer.Option(..., "--output", "-o", help="Output folder or URL prefix (s3://...) for 00000.tar ..., manifest.json "
                             "and sizes.json."),
    samples_per_shard: int = typer.Option(10000, "--samples-per-shard", help="Samples per output tar."),
    min_shards: int = typer.Option(1, "--min-shards", help="Write at least this many shards (fewer "
                                   "samples per shard if needed): a trainer needs shards >= dataloader "
                                   "workers x GPUs."),
    shuffle: bool = typer.Option(False, "--shuffle/--no-shuffle", help="Shuffle the whole selection "
                                 "across shards (deterministic for a --seed); default keeps selection order."),
    seed: int = typer.Option(0, "--seed", help="Seed of --shuffle."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards in OUT written from another "
                                   "selection or with other parameters (the same ones resume)."),
    engine: str = typer.Option("local", "--engine", help=ENGINE_HELP),
    max_retries: int = typer.Option(2, "--max-retries", help=MAX_RETRIES_HELP),
    captions: str = typer.Option(None, "--captions", help="Also write these captions into each sample's .json, "
                                 "one key each (raw = the alt-text, else a recaption --name), e.g. raw,blip, for "
                                 "`train --caption-keys`; the .txt keeps the selection's caption. Default: the "
                                 "recipe of a `mix --strategy sample` selection, else none."),
    part: str = part_option(f"{PART_HELP} The last part to finish writes manifest.json."),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Write a selection as webdataset training shards, copying image bytes without re-encoding.

    Each sample is <key>.jpg|png|webp (the source bytes), <key>.txt (the caption) and <key>.json (uid,
    caption_source, scores). Readable by webdataset and by open_clip's trainer:
    python -m open_clip_train.main --dataset-type webdataset --train-data 'OUT/{00000..00009}.tar'
    """
    from ..stages.shard import shard as shard_fn

    run_command(lambda: shard_fn(
        dataset, selection, out, samples_per_shard=samples_per_shard, min_shards=min_shards,
        shuffle=shuffle, seed=seed, overwrite=overwrite, engine=engine, part=part, max_retries=max_retries,
        captions=captions,
    ), json_out=json)


@app.command()
def report(
    dataset: str = typer.Argument(..., help="Dataset directory, local or a URL (s3://bucket/prefix)."),
    out: str = typer.Option("report.html", "--output", "-o", help="HTML file to write, local or a URL (s3://bucket/report.html)."),
    selection: str = typer.Option(None, "--selection", help="Show this selection's samples (and the "
                                  "caption it chose for each)."),
    where: str = typer.Option(None, "--where", help="DuckDB predicate over the samples view, e.g. "
                              "\"score_l14_raw < 0.2\"."),
    limit: int = typer.Option(200, "--limit", help="Samples in the grid (histograms use every match)."),
    order_by: str = typer.Option(None, "--order-by", help="SQL ordering of the grid, e.g. "
                                 "\"score_l14_raw DESC\"; default: by uid (a stable pseudo-random order)."),
    thumb_size: int = typer.Option(160, "--thumb-size", help="Longest side of the embedded thumbnails."),
    dedup: str = typer.Option(None, "--dedup", help="Show the duplicate groups of this dedup run "
                              "(dedup/NAME.parquet): each group's kept image first, then its duplicates with "
                              "kind and similarity."),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Write one self-contained HTML page: thumbnails with raw and synthetic captions and scores side by
    side, plus histograms of every score column."""
    from ..stages.report import report as report_fn

    run_command(lambda: report_fn(
        dataset, out, selection=selection, where=where, limit=limit, order_by=order_by,
        thumb_size=thumb_size, dedup=dedup,
    ), json_out=json)

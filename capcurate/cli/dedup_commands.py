"""``capcurate dedup``."""

from __future__ import annotations

import typer

from .app import JSON_HELP, WORKERS_HELP, app, run_command


@app.command()
def dedup(
    dataset: str = typer.Argument(..., help="Dataset directory, local or a URL (s3://bucket/prefix)."),
    name: str = typer.Option(..., "--name", "-n", help=(
        "Writes selections/<name>.parquet (the kept rows) and dedup/<name>.parquet (the groups).")),
    exact: bool = typer.Option(False, "--exact", help="Exact duplicates: the same sha256 of the image bytes."),
    near: bool = typer.Option(False, "--near", help=(
        "Near duplicates: perceptual hashes (pHash) within --hamming bits, confirmed by colour; finds resized, "
        "re-encoded, slightly cropped (up to 5% a side) and brightened or darkened copies.")),
    captions: bool = typer.Option(False, "--captions", help=(
        "Caption duplicates: the same alt-text (case and white space ignored) on several images, e.g. "
        "boilerplate; one image per caption is kept.")),
    semantic: str = typer.Option(None, "--semantic", help=(
        "Semantic duplicates (SemDeDup) on the image embeddings saved by score --name SCORER --save-embeddings.")),
    hamming: int = typer.Option(8, "--hamming", help=(
        "--near: most differing bits (of 64) between an image's pHash and another's pHash of the whole frame or "
        "of one of its 95% windows, for a candidate pair; higher finds more copies, cropped ones most, and "
        "costs more pairs to confirm (a 256-bit pHash of the matched window and the colours confirm each).")),
    eps: float = typer.Option(0.05, "--eps", help=(
        "--semantic: pairs above cosine similarity 1 - eps within a k-means cluster are duplicates (higher "
        "removes more).")),
    keep: str = typer.Option("hard", "--keep", help=(
        "--semantic: which member of a group stays: hard (farthest from its cluster centre), easy (nearest) "
        "or random (seeded by --seed).")),
    clusters: str = typer.Option("auto", "--clusters", help=(
        "--semantic: k-means clusters, or auto (one per 1,000 images).")),
    train_size: str = typer.Option("auto", "--train-size", help=(
        "--semantic: embeddings k-means trains on (a seeded sample), or auto (50 per cluster); every image "
        "is then assigned in streaming.")),
    seed: int = typer.Option(0, "--seed", help="--semantic: seed of the k-means sample, k-means and --keep random."),
    workers: str = typer.Option("auto", "--workers", help=WORKERS_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing selection/dedup file of that name."),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Remove duplicate images: exact, near (perceptual hash), caption and semantic (SemDeDup).

    Kinds run in that order, each over what the previous kept; every group keeps one member (exact, near,
    captions: the largest image, then the first in manifest order). Prints how many each kind removed and
    the peak anonymous memory (mapped embedding pages not counted).

    Example: capcurate dedup pool --exact --near --semantic l14 --eps 0.05 --keep hard --name dedup
    """
    def go():
        from ..stages.dedup import dedup as run

        return run(dataset, name, exact=exact, near=near, captions=captions, semantic=semantic, hamming=hamming,
                   eps=eps, keep=keep, clusters=clusters, train_size=train_size, seed=seed, workers=workers,
                   overwrite=overwrite)

    run_command(go, json_out=json)

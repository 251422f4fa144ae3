"""``capcurate score`` and ``capcurate filter``."""

from __future__ import annotations

import typer

from .app import (
    COMPILE_HELP,
    DECODE_HELP,
    DEVICE_HELP,
    ENGINE_HELP,
    JSON_HELP,
    MAX_RETRIES_HELP,
    PRECISION_HELP,
    PRETRAINED_HELP,
    WORKERS_HELP,
    app,
    part_option,
    run_command,
)


@app.command()
def score(
    dataset: str = typer.Argument(..., help=(
        "Dataset directory (made by download or ingest), local or a URL (s3://bucket/prefix).")),
    model: str = typer.Option(..., "--model", "-m", help=(
        "Scoring model: openclip:ARCH/TAG (e.g. openclip:ViT-L-14/openai), openclip:CONFIG.json with "
        "--pretrained FILE, hf:HUB_ID_OR_DIR (a transformers CLIPModel or SigLIP model), or a capcurate "
        "training run directory.")),
    name: str = typer.Option(..., "--name", "-n", help=(
        "Name of this scorer; columns are called score_<name>_<source> (e.g. score_l14_raw).")),
    pretrained: str = typer.Option(None, "--pretrained", help=PRETRAINED_HELP),
    captions: str = typer.Option(None, "--captions", help=(
        "Comma-separated caption columns to score: 'raw' (the alt-text) and/or recaption names "
        "(e.g. raw,blip). Default: raw and every captions/<name> that exists. Re-running with a new name "
        "adds only that column.")),
    num_captions: int = typer.Option(1, "--num-captions", help=(
        "Score up to this many captions per sample of a recaption run with several; adds "
        "scores_<name>_<source> (list) and best_<name>_<source> (0-based index of the best).")),
    batch_size: str = typer.Option("auto", "--batch-size", help=(
        "Images (and texts) per forward pass, or auto: 256 on a GPU, 64 on the CPU.")),
    workers: str = typer.Option("auto", "--workers", help=WORKERS_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    decode: str = typer.Option("auto", "--decode", help=DECODE_HELP),
    compile: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    save_embeddings: bool = typer.Option(False, "--save-embeddings", help=(
        "Also keep L2-normalised float16 image and text embeddings in embeddings/<name>/ (for dedup or "
        "clustering, and so a caption column added later reuses the image embeddings).")),
    engine: str = typer.Option("local", "--engine", help=ENGINE_HELP),
    max_retries: int = typer.Option(2, "--max-retries", help=MAX_RETRIES_HELP),
    part: str = part_option(),
    num_actors: int = typer.Option(None, "--num-actors", help="Ray actors (default: one per GPU, else per CPU)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=(
        "Replace scores/<name> made with other parameters (otherwise refused; same parameters resume).")),
    scratch: str = typer.Option(None, "--scratch", help=(
        "A dataset in object storage: local folder where each shard's tar is staged (downloaded once, "
        "deleted when its shard is done); default: the system temp dir.")),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Score every image against each caption column with a CLIP-style model.

    Writes scores/<name>/NNNNN.parquet: score_<name>_<source> is the plain cosine similarity of the
    image and caption embeddings (NULL for a failed image or an empty caption). Finished shards are
    skipped, so an interrupted run resumes when re-run.
    """
    def go():
        from ..stages.score import score as run

        return run(dataset, model, name, pretrained=pretrained, captions=captions, num_captions=num_captions,
                   batch_size=batch_size, workers=workers, device=device, precision=precision, decode=decode,
                   save_embeddings=save_embeddings, engine=engine, part=part, overwrite=overwrite,
                   num_actors=num_actors, compile=compile, max_retries=max_retries, scratch=scratch)

    run_command(go, json_out=json)


@app.command("filter")
def filter_command(
    dataset: str = typer.Argument(..., help="Dataset directory, local or a URL (s3://bucket/prefix)."),
    name: str = typer.Option(..., "--name", "-n", help="Selection to write: selections/<name>.parquet."),
    min_score: float = typer.Option(None, "--min-score", help="Keep samples whose --score is at least this."),
    score: str = typer.Option(None, "--score", help=(
        "Score column as SCORER:SOURCE (e.g. b32:raw -> score_b32_raw); may be left out when only one "
        "score column exists.")),
    top_fraction: float = typer.Option(None, "--top-fraction", help=(
        "Keep the best fraction F of the pool by --score (e.g. 0.3); the threshold is the (1-F) quantile "
        "over the whole pool, computed in DuckDB and printed.")),
    where: str = typer.Option(None, "--where", help=(
        "Any DuckDB predicate over the samples view, e.g. \"width >= 200 AND caption NOT ILIKE '%stock%'\". "
        "Also sees train_caption and caption_source.")),
    from_selection: str = typer.Option(None, "--from-selection", help=(
        "Start from an earlier selection's rows (and their captions) instead of the whole pool.")),
    basic: bool = typer.Option(False, "--basic", help=(
        "DataComp basic filtering: English caption, more than 2 words and 5 characters, smaller image side "
        ">= 200 and aspect ratio <= 3 (original size when known). Bounds: the options below.")),
    language: str = typer.Option("en", "--language", help="--basic: required caption language (py3langid code); '' skips it."),
    min_words: int = typer.Option(3, "--min-words", help="--basic: at least this many words."),
    min_chars: int = typer.Option(6, "--min-chars", help="--basic: at least this many characters."),
    min_side: int = typer.Option(200, "--min-side", help="--basic: smaller image side in pixels, at least."),
    max_aspect_ratio: float = typer.Option(3.0, "--max-aspect-ratio", help="--basic: longer/shorter side, at most."),
    cluster: str = typer.Option(None, "--cluster", help=(
        "DataComp image-based clustering on the image embeddings saved by score --name SCORER --save-embeddings: "
        "English caption of 2+ words and 6+ characters, k-means on the pool, keep images in the clusters "
        "nearest to the --targets (or --target-classes) embeddings.")),
    targets: str = typer.Option(None, "--targets", help=(
        "--cluster: target images (a capcurate dataset, a folder of image tars such as an eval set) embedded "
        "with the scorer's model, or a .npy of target embeddings.")),
    target_classes: str = typer.Option(None, "--target-classes", help=(
        "--cluster: text file of class names, one per line, embedded as 'a photo of a <name>.' by the "
        "scorer's text tower (instead of --targets).")),
    clusters: int = typer.Option(None, "--clusters", help=(
        "--cluster: k-means clusters (DataComp: 100000); default one per 100 caption-filtered images, at "
        "most 100000. More clusters keep a tighter neighbourhood of the targets.")),
    sample_ratio: float = typer.Option(1.0, "--sample-ratio", help=(
        "--cluster: fraction of the caption-filtered images k-means trains on (then capped by --train-size).")),
    train_size: int = typer.Option(1_000_000, "--train-size", help=(
        "--cluster: most images k-means trains on (a seeded sample; 1M x 768 float32 = 3 GB); all are then "
        "assigned in streaming.")),
    seed: int = typer.Option(0, "--seed", help="--cluster: seed of the k-means sample and initialisation."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing selection of that name."),
    threads: int = typer.Option(None, "--threads", help="DuckDB threads (default: all cores)."),
    memory_limit: str = typer.Option(None, "--memory-limit", help="DuckDB memory limit, e.g. 4GB (spills beyond)."),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Select samples with SQL rules (score threshold, top fraction, DataComp basic, image clustering, --where).

    Prints how many samples pass each rule on its own and how many pass them all, and writes
    selections/<name>.parquet (uid, caption, caption_source, shard, key, and the score used).
    Failed downloads are never kept.
    """
    def go():
        from ..stages.basic_filter import BasicFilter
        from ..stages.cluster_filter import ClusterFilter
        from ..stages.filter import filter as run

        bounds = BasicFilter(language or None, min_words, min_chars, min_side, max_aspect_ratio) if basic else False
        clustering = ClusterFilter(cluster, targets, str(target_classes) if target_classes else None, clusters,
                                   sample_ratio, train_size, seed) if cluster else None
        return run(dataset, name, min_score=min_score, score=score, top_fraction=top_fraction, where=where,
                   from_selection=from_selection, basic=bounds, cluster=clustering, overwrite=overwrite,
                   threads=threads, memory_limit=memory_limit)

    run_command(go, json_out=json)

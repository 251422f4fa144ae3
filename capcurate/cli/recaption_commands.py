"""``capcurate recaption``: write synthetic captions for every image of a dataset."""

from __future__ import annotations

import typer

from .app import (
    DECODE_HELP,
    DEVICE_HELP,
    ENGINE_HELP,
    JSON_HELP,
    MAX_RETRIES_HELP,
    PRECISION_HELP,
    PRETRAINED_HELP,
    RECAPTION_COMPILE_HELP,
    WORKERS_HELP,
    app,
    part_option,
    run_command,
)


@app.command()
def recaption(
    dataset: str = typer.Argument(..., help=(
        "Dataset directory (made by download/ingest), local or a URL (s3://bucket/prefix).")),
    model: str = typer.Option(
        ..., "--model", "-m",
        help="Captioning model: hf:<hub-id-or-dir> (BLIP, BLIP-2, GIT, or a VLM: Qwen2-VL, Qwen2.5-VL, LLaVA, "
             "Idefics3/SmolVLM, PaliGemma, Florence-2, other image-text-to-text models), "
             "openclip:<coca-arch>/<tag>, openclip:<config.json> with --pretrained (CoCa), or an open_clip model folder."),
    name: str = typer.Option(
        ..., "--name", "-n",
        help="Name of this caption set: files go to captions/NAME/, the query column is cap_NAME."),
    pretrained: str = typer.Option(None, "--pretrained", help=PRETRAINED_HELP),
    decoding: str = typer.Option(
        "beam", "--decoding",
        help="greedy (most likely token each step), beam (beam search), nucleus (sample from the top-p "
             "mass) or topk (sample from the k most likely tokens)."),
    num_beams: int = typer.Option(3, "--num-beams", help="Beams kept by --decoding beam."),
    top_p: float = typer.Option(0.9, "--top-p", help="Probability mass kept by --decoding nucleus."),
    top_k: int = typer.Option(50, "--top-k", help="Tokens kept by --decoding topk."),
    temperature: float = typer.Option(
        1.0, "--temperature", help="Sampling temperature (nucleus/topk): <1 sharper, >1 more varied."),
    repetition_penalty: float = typer.Option(
        1.0, "--repetition-penalty", help="Divide the scores of tokens already used by this (1 = off)."),
    min_new_tokens: int = typer.Option(0, "--min-new-tokens", help="Forbid ending a caption before this."),
    max_new_tokens: int = typer.Option(
        30, "--max-new-tokens",
        help="Longest caption, in tokens (30 fits --style short; give --style dense 160 or more: below that "
             "a warning). Captions that hit it are counted in the summary (captions_truncated)."),
    num_captions: int = typer.Option(
        1, "--num-captions",
        help="Captions per image (beam: the N best beams; nucleus/topk: N samples). All are kept in "
             "caps_NAME, the first in cap_NAME."),
    length_penalty: float = typer.Option(
        1.0, "--length-penalty", help="Beam search: >1 favours longer captions, <1 shorter."),
    prompt: str = typer.Option(
        None, "--prompt",
        help="Chat-template VLMs: the instruction (the user turn), e.g. 'Describe this image in one "
             "sentence.'; PaliGemma/Florence-2: their task prompt ('caption en', '<CAPTION>'); BLIP-2/GIT/"
             "CoCa: text the caption starts from, e.g. 'a photo of'. Only the answer is stored."),
    system: str = typer.Option(
        None, "--system", help="Chat-template VLMs: a system turn before the instruction."),
    style: str = typer.Option(
        None, "--style",
        help="VLMs without --prompt: short (one alt-text-like sentence; the default) or dense (a detailed "
             "paragraph); the exact instruction is in docs/recaption.md and the lineage."),
    max_pixels: int = typer.Option(
        None, "--max-pixels",
        help="VLMs: most pixels of each image the processor keeps (fewer image tokens: faster), set on its "
             "resolution control: the area (Qwen2-VL/2.5-VL/3-VL), the longest edge (Idefics3/SmolVLM, "
             "Pixtral/Mistral3) or the tile count (InternVL, Llama 4). Default: 448x448 = 200704 where that is "
             "below the processor's own; refused where the input size is fixed (LLaVA, Gemma3...)."),
    min_pixels: int = typer.Option(
        None, "--min-pixels", help="Area-budget VLMs (the Qwen-VL family): smallest image area, in pixels."),
    seed: int = typer.Option(
        0, "--seed", help="Seed for sampling: each image draws from a hash of (seed, uid), so the same seed gives "
                          "the same captions whatever the batch size, order or --part."),
    batch_size: str = typer.Option(
        "auto", "--batch-size",
        help="Images per model call, or 'auto': on a GPU the largest batch up to 512 that fits (searched "
             "once at the pixel budget in use, with back-off on out-of-memory); on the CPU 16. A batch that "
             "fails is split down to the image at fault, which gets a row with the reason."),
    workers: str = typer.Option("auto", "--workers", help=WORKERS_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    decode: str = typer.Option("auto", "--decode", help=DECODE_HELP),
    compile: bool = typer.Option(False, "--compile", help=RECAPTION_COMPILE_HELP),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code",
        help="Allow a transformers model to run code shipped with it (only for models you trust)."),
    engine: str = typer.Option("local", "--engine", help=ENGINE_HELP),
    max_retries: int = typer.Option(2, "--max-retries", help=MAX_RETRIES_HELP),
    part: str = part_option(),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing caption set NAME made with other parameters."),
    scratch: str = typer.Option(None, "--scratch", help=(
        "A dataset in object storage: local folder where each shard's tar is staged (downloaded once, "
        "deleted when its shard is done); default: the system temp dir.")),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Caption every image with an image captioner; one captions/NAME/<shard>.parquet per shard.

    Re-running the same command resumes: finished shards are skipped. Undecodable images, and images
    the model's processor refuses, get a row with an empty caption and the reason in the error column.
    The summary counts generated tokens (tokens/s) and captions cut at --max-new-tokens.

    Example: capcurate recaption mydata --model hf:Salesforce/blip-image-captioning-large --name blip
    """
    from ..stages.recaption import recaption as run

    run_command(lambda: run(
        dataset, model=model, name=name, pretrained=pretrained, decoding=decoding, num_beams=num_beams,
        top_p=top_p, top_k=top_k, temperature=temperature, repetition_penalty=repetition_penalty,
        min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens, num_captions=num_captions,
        length_penalty=length_penalty, prompt=prompt, system=system, style=style, max_pixels=max_pixels,
        min_pixels=min_pixels, seed=seed, batch_size=batch_size,
        workers=workers, device=device, precision=precision, decode=decode, trust_remote_code=trust_remote_code,
        engine=engine, part=part, overwrite=overwrite, compile=compile, max_retries=max_retries,
        scratch=scratch,
    ), json_out=json)

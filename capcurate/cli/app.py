"""The Typer application and the one place that turns results and errors into output and exit codes.

Exit codes: 0 success; 1 the stage ran but failed (a full disk too); 2 bad input (an output that is
read-only or denied too); 3 output exists (use --overwrite / --force); 4 model could not be loaded;
130 interrupted by Ctrl-C, 143 by SIGTERM (re-run the same command to resume).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from ..errors import CapcurateError

app = typer.Typer(
    name="capcurate",
    help=(
        "Curate image-text datasets for CLIP pretraining.\n\n"
        "A dataset is a directory; each command is a stage that reads it and adds files to it:\n"
        "download -> recaption -> score -> filter -> mix -> shard -> train -> eval."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is plain: "[/<tag>]" in an option must not parse as markup
)

stdout = Console()
stderr = Console(stderr=True)

JSON_HELP = "Print a machine-readable JSON summary on stdout instead of a table."
# per-shard stages share the engines (capcurate.engines), so they share these two options' meaning
ENGINE_HELP = ("local (this process) or ray (a Ray cluster: actors each load the model once, one GPU each). "
               "ray joins the cluster at $RAY_ADDRESS (host:port, ray://host:port or auto) and otherwise starts "
               "a private local one; an address that does not answer is an error (exit 2).")
# where a model runs, the same words everywhere (capcurate.devices resolves them)
DEVICE_HELP = "auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N."
PRECISION_HELP = "auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16 or fp16: the dtype the model runs in."
WORKERS_HELP = ("Processes reading and decoding images, or auto: one per CPU core this process may use, minus "
                "one (0 decodes in the main process).")
DECODE_HELP = ("auto (gpu when the model runs on CUDA, else cpu), gpu (JPEGs decoded in batches by nvJPEG; other "
               "formats on the CPU), cpu (libjpeg-turbo/libpng in the workers) or draft (CPU, JPEGs scaled down "
               "while decoding: faster, pixels differ slightly from the model's own preprocessing).")
COMPILE_HELP = ("torch.compile the image tower: faster per image on a GPU after tens of seconds of compiling, so "
                "it pays on large runs.")
RECAPTION_COMPILE_HELP = (COMPILE_HELP[:-1] + "; decoders transformers can compile (BLIP-2's language model, "
                          "Qwen2-VL, LLaVA, Florence-2) also get a static KV cache and a compiled decoding step with "
                          "greedy or sampled decoding. VLMs compile only their decoding step (their images vary in size).")
MAX_RETRIES_HELP = ("With --engine ray: times a shard is retried on a fresh actor when its actor dies (killed, out of "
                    "memory, node lost); a shard that raises is not retried.")
PRETRAINED_HELP = ("open_clip weights: a pretrained tag, a local .pt/.safetensors file, or its URL (s3://..., "
                   "downloaded once into the cache). An open_clip model without "
                   "weights is refused; 'random' (or random:SEED) asks for seeded random weights (tests, demos).")
PART_HELP = ("Only shards i, i+N, ... of the sorted list, as i/N with 0 <= i < N (e.g. SLURM array task i "
             "of N); run every part to finish.")


def _check_part(value: str | None) -> str | None:
    """--part is checked while the command line is parsed: a bad one stops before any work or write."""
    from ..engines import parse_part
    from ..errors import InputError

    try:
        parse_part(value)
    except InputError as e:
        raise fail(str(e), e.exit_code) from None
    return value


def part_option(help: str = PART_HELP) -> Any:
    """The one --part option of every per-shard command (validated by ``engines.parse_part``)."""
    return typer.Option(None, "--part", help=help, callback=_check_part)


def fail(message: str, code: int = 2) -> typer.Exit:
    from rich.markup import escape

    # escaped: messages quote user input and forms like "openclip:<arch>[/<tag>]" that rich would parse
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def run_command(fn: Callable[[], Any], *, json_out: bool = False,
                render: Callable[[Any], None] | None = None) -> Any:
    """Call a library function; print its summary; map known errors to one line and an exit code."""
    import duckdb

    from ..oserrors import explain_os_error, explain_unicode_error
    from .interrupts import EXIT_SIGINT, EXIT_SIGTERM, close_lineage, sigterm_as_interrupt

    with sigterm_as_interrupt() as signals:
        try:
            try:
                result = fn()
            except Exception:
                if signals:  # SIGTERM arrived and a worker's death surfaced first: still an interrupt
                    raise KeyboardInterrupt from None
                raise
        except CapcurateError as e:
            raise fail(str(e), e.exit_code) from None
        except duckdb.Error as e:
            known = explain_os_error(e)  # COPY ... TO on a full disk is no SQL error
            if known is not None:
                raise fail(*known) from None
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "parquet" in line.lower() and not isinstance(e, duckdb.ParserException):  # a damaged file, not SQL
                line += " (capcurate doctor DATASET --repair moves damaged files aside; their stages make them again)"
            raise fail(line, 2) from None
        except KeyboardInterrupt:
            name = "SIGTERM" if signals else "SIGINT"
            close_lineage(name)  # the card says the run is over, and why
            stderr.print(f"interrupted ({name}); finished shards are kept, re-run the same command to resume",
                         soft_wrap=True)
            raise typer.Exit(EXIT_SIGTERM if signals else EXIT_SIGINT) from None
        except Exception as e:
            # object storage: missing credentials, a bucket that does not exist, a denied write -> one line
            from ..storage import explain

            msg = explain(e)
            if msg is not None:
                raise fail(msg, 2) from None
            # a full disk, a read-only or denied output, a file that is not UTF-8 -> one line
            known = explain_os_error(e)
            if known is not None:
                raise fail(*known) from None
            msg = explain_unicode_error(e)
            if msg is not None:
                raise fail(msg, 2) from None
            raise
    if result is None:
        return None
    if json_out and hasattr(result, "to_json"):
        sys.stdout.write(result.to_json() + "\n")
    elif render is not None:
        render(result)
    elif hasattr(result, "render"):
        result.render(stdout)
    if getattr(result, "ok", True) is False:
        raise typer.Exit(1)
    return result


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        stdout.print(f"capcurate {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print capcurate's version and exit."),
) -> None:
    """Curate image-text datasets for CLIP pretraining."""

"""A stage's command line as a cluster node must run it: checked here, paths absolute, no ``--part``.

The stage's own click command parses the arguments, so a typo fails on the submitting host (exit 2)
instead of in N array tasks an hour later. The command line is then rebuilt from what was given:
values of path-valued parameters become absolute (a node's working directory is not the submitter's),
model references naming a local folder or file too; URLs (``s3://...``) and hub ids stay as they are.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

# parameters that always hold a local path or a URL, whether or not it exists yet (an output)
PATH_PARAMS = frozenset({"dataset", "path", "output", "out", "scratch"})
# parameters that may hold a path: made absolute only when they name something that exists here
MAYBE_PATH_PARAMS = frozenset({"model", "pretrained"})
MODEL_PREFIXES = ("hf:", "openclip:")
# set by the launcher per task, or meaningless in a batch log
LAUNCHER_PARAMS = frozenset({"part", "json"})


@dataclass
class StageCall:
    """One stage invocation: its name, the rebuilt arguments (no --part) and the parsed values."""

    stage: str
    argv: list[str]
    params: dict[str, Any]

    @property
    def dataset(self) -> str | None:
        """The dataset whose card records this stage's lineage (ingest writes into -o)."""
        value = self.params.get("output") if self.stage == "ingest" else self.params.get("dataset")
        return None if value is None else str(value)


def part_stages(group: Any) -> list[str]:
    """Commands of ``group`` that take ``--part``: those a launcher can split into tasks."""
    return sorted(n for n, c in group.commands.items() if any("--part" in p.opts for p in c.params))


def stage_call(group: Any, stage: str, args: list[str]) -> StageCall:
    """Parse ``capcurate STAGE ARGS`` with the stage's own command; refuse what an array cannot run."""
    splittable = part_stages(group)
    cmd = group.commands.get(stage)
    if cmd is None:
        raise InputError(f"unknown stage {stage!r}: launch runs one of {', '.join(splittable)}")
    if stage not in splittable:
        raise InputError(f"capcurate {stage} does not take --part (its work is not split by shards), so it cannot "
                         f"run as an array; stages that can: {', '.join(splittable)}")
    try:
        ctx = cmd.make_context(f"capcurate {stage}", list(args), resilient_parsing=False)
    except Exception as e:  # click's usage errors (Typer vendors its own click: matched by shape, not class)
        if hasattr(e, "format_message"):
            raise InputError(f"capcurate {stage}: {e.format_message()}") from None
        if type(e).__name__ == "Exit":  # --help among the stage's arguments
            raise InputError(f"capcurate {stage} --help: run it without launch") from None
        raise
    given = [p for p in cmd.params if getattr(ctx.get_parameter_source(p.name), "name", None) == "COMMANDLINE"]
    names = {p.name for p in given}
    if "part" in names:
        raise InputError("leave --part out: task i of --array N runs --part i/N")
    if "overwrite" in names:
        raise InputError("--overwrite cannot run as an array (each task would delete what the others wrote): "
                         "choose a new --name (or -o), or delete the old outputs, then launch without it")
    arguments: list[str] = []
    options: list[str] = []
    for p in given:
        if p.name in LAUNCHER_PARAMS:
            continue
        value = ctx.params[p.name]
        if p.param_type_name == "argument":
            values = list(value) if p.nargs != 1 else [value]
            arguments += [_resolve(p.name, _text(v)) for v in values]
            continue
        flag = _long(p.opts)
        if getattr(p, "is_flag", False):
            if value:
                options.append(flag)
            elif p.secondary_opts:
                options.append(_long(p.secondary_opts))
            continue
        for v in (value if getattr(p, "multiple", False) else [value]):
            options += [flag, _resolve(p.name, _text(v))]
    return StageCall(stage, arguments + options, dict(ctx.params))


def _long(opts: list[str]) -> str:
    return max(opts, key=len)


def _text(v: Any) -> str:
    return str(v.value if isinstance(v, enum.Enum) else v)


def _resolve(name: str | None, value: str) -> str:
    """An absolute path for a parameter that names a local path; anything else unchanged."""
    if "://" in value:
        return value
    if name in PATH_PARAMS:
        return os.path.abspath(os.path.expanduser(value))
    if name in MAYBE_PATH_PARAMS:
        prefix = next((p for p in MODEL_PREFIXES if value.startswith(p)), "")
        rest = os.path.expanduser(value[len(prefix):])
        if rest and os.path.exists(rest):
            return prefix + os.path.abspath(rest)
    return value

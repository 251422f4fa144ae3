"""Regenerate docs/cli.md from the commands' own --help, so the page never drifts from the code.

    python tools/gen_cli_docs.py          # rewrite docs/cli.md
    python tools/gen_cli_docs.py --check  # exit 1 if docs/cli.md is stale (the test suite runs this)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["COLUMNS"] = "100"
os.environ["NO_COLOR"] = "1"
os.environ["TERM"] = "dumb"

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def render() -> str:
    import typer.main
    from typer.testing import CliRunner

    from capcurate.cli import app

    runner = CliRunner()
    group = typer.main.get_command(app)
    parts = [
        "# Command line reference\n",
        "Generated from each command's `--help` by `tools/gen_cli_docs.py`; a test fails when it is stale.\n",
        "```text\n" + _help(runner, app, []) + "```\n",
    ]
    for name in sorted(group.commands):
        parts.append(f"## capcurate {name}\n")
        parts.append("```text\n" + _help(runner, app, [name]) + "```\n")
        for sub in sorted(getattr(group.commands[name], "commands", {})):  # a group: `launch slurm`, ...
            parts.append(f"## capcurate {name} {sub}\n")
            parts.append("```text\n" + _help(runner, app, [name, sub]) + "```\n")
    return "\n".join(parts)


def _help(runner, app, args: list[str]) -> str:
    res = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"},
                        terminal_width=100)
    text = "\n".join(line.rstrip() for line in res.output.splitlines())
    return text.strip("\n") + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not DOC.exists() or DOC.read_text() != text:
            print("docs/cli.md is stale: run python tools/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

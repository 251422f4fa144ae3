"""``torchrun --nproc-per-node N -m capcurate.train SHARDS -o RUN ...``: the ``train`` command per rank."""

from __future__ import annotations

import sys


def main() -> None:
    from ..cli import app

    # the same options as `capcurate train`; rank 0 prints the summary, the others stay quiet
    app(args=["train", *sys.argv[1:]], prog_name="capcurate.train")


if __name__ == "__main__":
    main()

"""DuckDB views over a dataset's Parquet files; no copy of the data is made to query it.

Views:
  manifest             samples/*.parquet (raw columns, one row per candidate)
  captions_<name>      captions/<name>/*.parquet
  scores_<name>        scores/<name>/*.parquet
  selection_<name>     selections/<name>.parquet
  samples              the wide join on uid: manifest columns, cap_<name> / caps_<name>, score columns

Extension point: a new table family is one ``Family`` entry in ``FAMILIES`` saying which folder holds
it and which of its columns join into ``samples``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

if TYPE_CHECKING:
    from .dataset import Dataset


def sql_string(s: str | Path) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def parquet_source(glob: str | Path) -> str:
    return f"read_parquet({sql_string(glob)}, union_by_name = true)"


@dataclass(frozen=True)
class Family:
    """A folder of per-name, per-shard Parquet files that joins into ``samples`` on uid."""

    folder: str
    view_prefix: str
    # (table alias, name, the family table's columns) -> select expressions for the wide view
    wide_columns: Callable[[str, str, list[str]], list[str]]


def _caption_columns(alias: str, name: str, cols: list[str]) -> list[str]:
    out = []
    if "caption" in cols:
        out.append(f"{alias}.caption AS {ident('cap_' + name)}")
    if "captions" in cols:
        out.append(f"{alias}.captions AS {ident('caps_' + name)}")
    return out


def _score_columns(alias: str, name: str, cols: list[str]) -> list[str]:
    # score files already prefix their columns with the scorer name (score_<name>_<source>)
    return [f"{alias}.{ident(c)}" for c in cols if c != "uid"]


FAMILIES: list[Family] = [
    Family("captions", "captions_", _caption_columns),
    Family("scores", "scores_", _score_columns),
]


def _columns(con: duckdb.DuckDBPyConnection, view: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {ident(view)}").fetchall()]


def connect(ds: Dataset, *, database: str = ":memory:", threads: int | None = None,
            memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """Open DuckDB with every view of ``ds`` defined."""
    con = duckdb.connect(database)
    from .storage import register_duckdb

    register_duckdb(con, ds.root)  # a dataset in object storage: DuckDB reads it through fsspec
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if memory_limit:
        try:
            con.execute(f"SET memory_limit = {sql_string(memory_limit)}")
        except duckdb.Error as e:
            from .errors import InputError

            con.close()
            msg = str(e).split(":", 1)[-1].strip()
            raise InputError(f"--memory-limit {memory_limit!r}: {msg}") from None
    if ds.shard_ids():
        con.execute(f"CREATE VIEW manifest AS SELECT * FROM {parquet_source(ds.samples_dir / '*.parquet')}")
    else:
        # An empty dataset still answers queries (with no rows) instead of failing on a missing glob.
        cols = ", ".join(f"NULL::VARCHAR AS {ident(c)}" for c in
                         ("uid", "key", "shard", "url", "caption", "status", "error_message"))
        con.execute(f"CREATE VIEW manifest AS SELECT {cols} WHERE false")

    select = ["m.*"]
    joins = []
    for fam in FAMILIES:
        for i, name in enumerate(ds.names(fam.folder)):
            view = fam.view_prefix + name
            glob = ds.root / fam.folder / name / "*.parquet"
            con.execute(f"CREATE VIEW {ident(view)} AS SELECT * FROM {parquet_source(glob)}")
            alias = f"{fam.folder[0]}{i}"
            select += fam.wide_columns(alias, name, _columns(con, view))
            joins.append(f"LEFT JOIN {ident(view)} {alias} ON {alias}.uid = m.uid")
    con.execute(f"CREATE VIEW samples AS SELECT {', '.join(select)} FROM manifest m {' '.join(joins)}")

    for name in ds.selection_names():
        con.execute(
            f"CREATE VIEW {ident('selection_' + name)} AS SELECT * FROM "
            f"read_parquet({sql_string(ds.selection_path(name))})"
        )
    return con

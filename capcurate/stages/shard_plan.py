"""Plan of ``capcurate shard``: which selection row goes to which output shard, and where its bytes lie.

Everything is done in DuckDB over Parquet (out of core), so planning a shuffle of a billion rows needs
no more memory than DuckDB's limit:

1. selection rows joined to the manifest on uid (rows with no downloaded image are counted missing);
2. each source tar that is needed is indexed once (member offsets, header walk only) into Parquet;
3. rows joined to that index (keys absent from a tar are counted missing), ordered (selection order,
   or a hash of (seed, uid, caption_source) for ``--shuffle``), numbered, and routed to output shard
   ``position // samples_per_shard``;
4. written partitioned by output shard, so writing shard i reads only its own plan rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..dataset import Dataset
from ..shards import IMAGE_EXTS, index_tar
from ..views import ident, sql_string

MISSING_EXAMPLES = 10


@dataclass
class ShardPlan:
    """What the writer needs: where the plan lies, expected samples per output shard, what is missing."""

    plan_dir: Path
    samples_per_shard: int
    shard_sizes: list[int]
    missing: dict[str, int] = field(default_factory=dict)
    missing_examples: list[str] = field(default_factory=list)
    damaged_sources: dict[str, str] = field(default_factory=dict)
    # source shard -> a local copy of its tar (a dataset in object storage; see stage_sources)
    staged_sources: dict[str, Path] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.shard_sizes)

    def rows_dir(self, out_index: int) -> Path:
        """DuckDB's hive-partitioned output: one folder of Parquet files per output shard."""
        return self.plan_dir / "rows" / f"out_shard={out_index}"

    def sources_for(self, shard_ids: list[str]) -> list[str]:
        """The source shards the given output shards (``00012`` ...) draw their images from."""
        import pyarrow.parquet as pq

        needed: set[str] = set()
        for sid in shard_ids:
            folder = self.rows_dir(int(sid))
            for f in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
                needed.update(v for v in pq.read_table(f, columns=["shard"]).column("shard").to_pylist() if v)
        return sorted(needed)


def stage_sources(ds: Dataset, sources: list[str], folder: Path) -> dict[str, Path]:
    """Download each source tar of a dataset in object storage once into ``folder`` (one GET per tar, up
    to 8 at once).

    The plan indexes the local copies, and the writer reads members with ``os.pread`` as it does locally: an output shard draws samples
    from all over the sources (more so with ``--shuffle``), so reading them straight from the store would
    cost one GET per sample.
    """
    from .. import storage

    folder.mkdir(parents=True, exist_ok=True)

    def fetch(shard: str) -> tuple[str, Path | None]:
        src = storage.path(ds.shard_path(shard))
        dst = folder / f"{shard}.tar"
        try:
            src.fs.get_file(src.path, str(dst))
        except FileNotFoundError:
            return shard, None  # indexed as missing: its samples are counted, not fatal
        return shard, dst

    return {shard: dst for shard, dst in storage.map_reads(fetch, list(sources), remote=True) if dst is not None}


def build_plan(ds: Dataset, selection: str, work_dir: Path, *, samples_per_shard: int, min_shards: int,
               shuffle: bool, seed: int, captions: list[str] | None = None) -> ShardPlan:
    """Write the plan under ``work_dir`` and return its summary (see the module docstring)."""
    con = ds.connect()
    try:
        con.execute(f"SET temp_directory = {sql_string(work_dir / 'duckdb_tmp')}")
        con.execute("SET preserve_insertion_order = false")
        score_cols = [
            r[0] for r in con.execute("DESCRIBE samples").fetchall()
            if r[0].startswith("score_") and r[1] in ("FLOAT", "DOUBLE")
        ]
        scores = ", ".join(f"{sql_string(c)}, round(s.{ident(c)}::DOUBLE, 6)" for c in score_cols)
        con.execute(
            "CREATE TEMP TABLE wanted AS SELECT sel.file_row_number AS sel_row, sel.uid, sel.caption, "
            "sel.caption_source, m.shard, m.key FROM read_parquet("
            f"{sql_string(ds.selection_path(selection))}, file_row_number = true) sel "
            "LEFT JOIN (SELECT uid, shard, key FROM manifest WHERE status = 'success' "
            "QUALIFY row_number() OVER (PARTITION BY uid ORDER BY shard, key) = 1) m USING (uid)"
        )
        sources = [r[0] for r in con.execute(
            "SELECT DISTINCT shard FROM wanted WHERE shard IS NOT NULL ORDER BY 1").fetchall()]
        staged = stage_sources(ds, sources, work_dir / "sources") if ds.remote else {}
        damaged = _index_sources(ds, sources, work_dir / "index", staged)
        index = (f"read_parquet({sql_string(work_dir / 'index' / '*.parquet')})" if sources else
                 "(SELECT NULL::VARCHAR AS shard, NULL::VARCHAR AS key, NULL::VARCHAR AS ext, "
                 "NULL::BIGINT AS byte_offset, NULL::BIGINT AS byte_size WHERE false)")
        con.execute(
            "CREATE TEMP TABLE located AS SELECT w.*, i.ext, i.byte_offset, i.byte_size FROM wanted w "
            f"LEFT JOIN {index} i ON i.shard = w.shard AND i.key = w.key"
        )
        missing = dict(con.execute(
            "SELECT CASE WHEN shard IS NULL THEN 'not_downloaded' ELSE 'not_in_shards' END, count(*) "
            "FROM located WHERE byte_offset IS NULL GROUP BY 1").fetchall())
        examples = [r[0] for r in con.execute(
            f"SELECT uid FROM located WHERE byte_offset IS NULL ORDER BY sel_row LIMIT {MISSING_EXAMPLES}"
        ).fetchall()]
        total = con.execute("SELECT count(*) FROM located WHERE byte_offset IS NOT NULL").fetchone()[0]

        per_shard = samples_per_shard
        if total and math.ceil(total / per_shard) < min_shards:
            per_shard = max(1, math.ceil(total / min_shards))
        # md5 of (seed, uid, source) is a random rank that does not depend on row order or memory
        order = (f"md5(concat({int(seed)}, ':', l.uid, ':', l.caption_source)), l.sel_row" if shuffle
                 else "l.sel_row")
        # shard --captions: every chosen caption under its own key, for train-time choice
        chosen = "".join(f"{sql_string(c)}, s.{ident('caption' if c == 'raw' else 'cap_' + c)}, "
                         for c in captions or [])
        meta = (f"json_object('uid', l.uid, 'caption_source', l.caption_source, {chosen}"
                f"'scores', json_object({scores}), "
                "'source', json_object('shard', l.shard, 'key', l.key))")
        con.execute(
            f"COPY (SELECT *, position // {per_shard} AS out_shard FROM ("
            f"SELECT row_number() OVER (ORDER BY {order}) - 1 AS position, l.caption, l.shard, l.ext, "
            f"l.byte_offset, l.byte_size, {meta} AS meta FROM located l LEFT JOIN samples s ON s.uid = l.uid "
            f"AND s.shard = l.shard AND s.key = l.key WHERE l.byte_offset IS NOT NULL)) "
            f"TO {sql_string(work_dir / 'rows')} (FORMAT parquet, PARTITION_BY (out_shard))"
        )
    finally:
        con.close()
    n_out = math.ceil(total / per_shard) if total else 0
    sizes_list = [min(per_shard, total - i * per_shard) for i in range(n_out)]
    return ShardPlan(work_dir, per_shard, sizes_list, missing, examples, damaged, staged)


def _index_sources(ds: Dataset, sources: list[str], index_dir: Path,
                   staged: dict[str, Path] | None = None) -> dict[str, str]:
    """Index each needed source tar once (image members only; its staged copy when the dataset is in a
    store); returns damaged tars and why."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    damaged = {}
    index_dir.mkdir(parents=True, exist_ok=True)
    for shard in sources:
        path = (staged or {}).get(shard) or ds.shard_path(shard)
        if not path.is_file():
            damaged[shard] = "tar file missing"
            continue
        idx = index_tar(path)
        if idx.truncated:
            damaged[shard] = idx.error or "truncated"
        rows = {"shard": [], "key": [], "ext": [], "byte_offset": [], "byte_size": []}
        for key, members in idx.samples.items():
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if ext is None:
                continue
            rows["shard"].append(shard)
            rows["key"].append(key)
            rows["ext"].append(ext)
            rows["byte_offset"].append(members[ext].offset)
            rows["byte_size"].append(members[ext].size)
        # scratch of this run's plan folder (made afresh by every run): no atomic write, no fsync
        pq.write_table(pa.table(rows, schema=pa.schema([
            ("shard", pa.string()), ("key", pa.string()), ("ext", pa.string()),
            ("byte_offset", pa.int64()), ("byte_size", pa.int64())])), index_dir / f"{shard}.parquet")
    return damaged


"""Reading the URL list: which format, which columns, how many rows, before img2dataset sees it.

Checking here gives the user one clear line (missing column, empty file) instead of a traceback from
deep inside img2dataset's worker processes, and tells the driver how many shards to expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import InputError

# img2dataset's input_format names, longest suffix first so "csv.gz" wins over "gz"
FORMATS = ("parquet", "csv.gz", "tsv.gz", "txt.gz", "jsonl.gz", "csv", "tsv", "txt", "jsonl")

# img2dataset refuses these in save_additional_columns: it writes them itself
RESERVED = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
            "error_message", "exif", "md5", "sha256", "sha512"}


@dataclass
class UrlList:
    path: Path
    input_format: str
    files: list[Path]
    columns: list[str]
    rows_per_file: list[int] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return sum(self.rows_per_file)

    def expected_shards(self, samples_per_shard: int) -> list[int]:
        """Shard ids img2dataset will write: numbered on across input files, as its Reader does."""
        ids, start = [], 0
        for n in self.rows_per_file:
            k = math.ceil(n / samples_per_shard)
            ids += range(start, start + k)
            start += k
        return ids


def detect_format(path: Path) -> str:
    name = path.name.lower()
    for fmt in FORMATS:
        if name.endswith("." + fmt):
            return fmt
    raise InputError(
        f"{path}: unknown URL list format; expected a file ending in one of "
        f"{', '.join('.' + f for f in FORMATS)}"
    )


def _columns_and_rows(path: Path, fmt: str) -> tuple[list[str], int]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        meta = pq.ParquetFile(path)
        return list(meta.schema_arrow.names), meta.metadata.num_rows
    if fmt.startswith("txt"):
        import gzip

        opener = gzip.open if fmt.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            return ["url"], sum(1 for line in fh if line.strip())
    if fmt.startswith("jsonl"):
        import pyarrow.json as pajson

        try:
            table = pajson.read_json(path)
        except Exception as e:  # pyarrow raises ArrowInvalid on an empty or malformed file
            if path.stat().st_size == 0 or not path.read_bytes().strip():
                return [], 0
            raise InputError(f"{path}: cannot read JSON lines: {e}") from None
        return table.column_names, table.num_rows
    parse = pacsv.ParseOptions(delimiter="\t" if fmt.startswith("tsv") else ",")
    try:
        reader = pacsv.open_csv(path, parse_options=parse)
    except Exception as e:
        if "Empty CSV file" in str(e):
            return [], 0
        raise InputError(f"{path}: cannot read {fmt.split('.')[0].upper()}: {e}") from None
    rows = sum(batch.num_rows for batch in reader)
    return reader.schema.names, rows


def read_url_list(path: str | Path) -> UrlList:
    """Inspect a URL list file, or a folder of files of one format, without loading it whole."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"URL list {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        fmts = {detect_format(p) for p in files if any(p.name.lower().endswith("." + f) for f in FORMATS)}
        if len(fmts) != 1:
            found = ", ".join(sorted(fmts)) or "none"
            raise InputError(f"{path}: expected URL list files of one format in the folder, found: {found}")
        fmt = fmts.pop()
        files = [p for p in files if p.name.lower().endswith("." + fmt)]
    else:
        fmt = detect_format(path)
        files = [path]
    columns: list[str] = []
    rows = []
    for f in files:
        cols, n = _columns_and_rows(f, fmt)
        if n and columns and cols != columns:
            raise InputError(f"{f}: columns {cols} differ from {files[0].name}'s {columns}")
        columns = columns or cols
        rows.append(n)
    return UrlList(path, fmt, files, columns, rows)


@dataclass
class ColumnPlan:
    """How the input's columns map onto img2dataset's arguments and the manifest."""

    url_col: str
    caption_col: str | None
    uid_col: str | None
    extra: list[str]     # passed as save_additional_columns, kept in the manifest
    dropped: list[str]   # names img2dataset reserves for itself


def plan_columns(urls: UrlList, url_col: str, caption_col: str | None, uid_col: str | None) -> ColumnPlan:
    cols = urls.columns
    have = ", ".join(cols) or "(none)"
    if urls.input_format.startswith("txt"):
        return ColumnPlan("url", None, None, [], [])
    if url_col not in cols:
        raise InputError(f"URL column {url_col!r} not found in {urls.path}; columns are: {have} (use --url-col)")
    if caption_col is None:
        caption_col = next((c for c in ("caption", "text", "TEXT") if c in cols), None)
    elif caption_col not in cols:
        raise InputError(f"caption column {caption_col!r} not found in {urls.path}; columns are: {have}")
    if uid_col is not None and uid_col not in cols:
        if uid_col != "uid":  # the default is used only when present
            raise InputError(f"uid column {uid_col!r} not found in {urls.path}; columns are: {have}")
        uid_col = None
    rest = [c for c in cols if c not in (url_col, caption_col)]
    extra = [c for c in rest if c not in RESERVED]
    dropped = [c for c in rest if c in RESERVED]
    return ColumnPlan(url_col, caption_col, uid_col, extra, dropped)

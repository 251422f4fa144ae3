"""The dataset directory contract (docs/architecture.md): paths, the card, and DuckDB views.

    DATASET/
      capcurate.json                 card + lineage (capcurate.card)
      shards/NNNNN.tar               image bytes, webdataset layout
      samples/NNNNN.parquet          one row per candidate (the manifest)
      captions/<name>/NNNNN.parquet  uid, caption, captions          -> view captions_<name>
      scores/<name>/NNNNN.parquet    uid, score_<name>_<source>, ...  -> view scores_<name>
      embeddings/<name>/NNNNN.*.npy  optional embeddings
      selections/<name>.parquet      uid, caption, caption_source     -> view selection_<name>

A stage adds files; it never rewrites another stage's. Every per-shard file is the completion marker
of that shard's work.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

from . import atomic, storage
from .card import CARD_NAME, LOCK_NAME, Card  # noqa: F401  (CARD_NAME: re-exported)
from .errors import DatasetError, InputError, OutputExistsError

SAMPLE_COLUMNS = [
    "uid", "key", "shard", "url", "caption", "status", "error_message",
    "width", "height", "original_width", "original_height", "sha256",
]


def samples_schema(extra: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """The manifest schema; extra input columns (kept from the URL list) follow the fixed ones."""
    import pyarrow as pa

    fields = [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("key", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),
    ]
    for name, typ in (extra or {}).items():
        if name not in SAMPLE_COLUMNS:
            fields.append(pa.field(name, typ))
    return pa.schema(fields)


NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


def check_name(name: str, what: str = "name") -> str:
    """Names become SQL column suffixes (cap_<name>, score_<name>_<source>), so keep them identifiers."""
    if not NAME_RE.match(name or ""):
        raise InputError(
            f"invalid {what} {name!r}: use a letter followed by letters, digits or '_' (at most 63)"
        )
    return name


def shard_file_name(shard_id: str, suffix: str = ".parquet") -> str:
    return f"{shard_id}{suffix}"


class Dataset:
    """A capcurate dataset directory. Open with ``Dataset(path)``; make one with ``Dataset.create``."""

    def __init__(self, root: str | Path | Any, *, must_exist: bool = True):
        self.root = storage.path(root)
        self.remote = storage.is_remote(self.root)
        self.card = Card(self.root)
        if must_exist:
            if self.remote:
                if not self.card.exists():
                    storage.check_container(self.root)
                    raise DatasetError(f"dataset {self.root} does not exist (no {CARD_NAME} there)")
            elif not self.root.is_dir():
                raise DatasetError(f"dataset directory {self.root} does not exist")
            self.card.read()  # validates format

    @classmethod
    def create(cls, root: str | Path | Any, *, force: bool = False, sources: list[dict[str, Any]] | None = None,
               allow_existing_dataset: bool = True) -> Dataset:
        """Create (or reopen) a dataset directory (or prefix in object storage).

        A folder that exists, is not empty and is not a capcurate dataset is refused unless ``force``:
        we never write into somebody else's files by accident.
        """
        root = storage.path(root)
        storage.check_writable(root)
        card = Card(root)
        if not card.exists():
            if storage.is_remote(root):
                storage.check_container(root)
                foreign = [n for n in storage.list_entries(root) if n != LOCK_NAME]
            else:
                if root.exists() and not root.is_dir():
                    raise DatasetError(f"{root} exists and is not a directory")
                # another --part may be creating this dataset right now: its lock and temp files do not count
                foreign = [p.name for p in root.iterdir() if p.name != LOCK_NAME
                           and not atomic.is_temp_name(p.name)] if root.is_dir() else []
            if foreign and not force and not card.exists():
                raise OutputExistsError(
                    f"{root} exists, is not empty and is not a capcurate dataset; pass --force to use it anyway"
                )
            storage.ensure_dir(root)
            with card.locked():  # several processes may create one dataset at once: one card wins
                if not card.exists() and card.create(sources):
                    return cls(root)
        if not allow_existing_dataset:
            raise OutputExistsError(f"{root} is already a capcurate dataset")
        ds = cls(root)
        for s in sources or []:
            ds.card.add_source(s)
        return ds

    # -- paths -------------------------------------------------------------------------------------
    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    def family_dir(self, family: str, name: str) -> Any:
        """``captions/<name>``, ``scores/<name>``, ``embeddings/<name>``."""
        return self.root / family / check_name(name)

    def selection_path(self, name: str) -> Path:
        return self.root / "selections" / f"{check_name(name, 'selection name')}.parquet"

    def shard_path(self, shard_id: str) -> Path:
        return self.shards_dir / f"{shard_id}.tar"

    def samples_path(self, shard_id: str) -> Path:
        return self.samples_dir / shard_file_name(shard_id)

    def shard_ids(self) -> list[str]:
        """Ids of the shards that have a manifest (the unit of work of every later stage): one listing."""
        return sorted(n[: -len(".parquet")] for n in storage.list_names(self.samples_dir, ".parquet"))

    def names(self, family: str) -> list[str]:
        """Names present in a family folder (``captions``, ``scores``) that hold at least one Parquet file."""
        base = self.root / family
        return sorted(n for n in storage.list_dirs(base) if storage.list_names(base / n, ".parquet"))

    def selection_names(self) -> list[str]:
        return sorted(n[: -len(".parquet")] for n in storage.list_names(self.root / "selections", ".parquet"))

    def remove_family_output(self, family: str, name: str) -> None:
        """Delete a previous output of that name (only called under --overwrite)."""
        storage.rmtree(self.family_dir(family, name))

    def claim_images(self, stage: str, params: dict[str, Any], *, overwrite: bool) -> str:
        """Claim ``shards/`` + ``samples/`` for a stage that writes images (download, ingest).

        The overwrite rule of every output (``Card.claim_output``): same parameters resume, other
        parameters are refused unless ``overwrite``, which empties both folders first. Returns the id of
        the lineage entry the stage finishes with ``card.finish_entry``.
        """
        def exists() -> bool:
            return bool(self.shard_ids()) or bool(storage.list_entries(self.shards_dir))

        def remove() -> None:
            storage.rmtree(self.shards_dir)
            storage.rmtree(self.samples_dir)

        _mode, entry = self.card.claim(stage=stage, family="shards", name=stage, params=params,
                                       overwrite=overwrite, exists=exists, remove=remove)
        return entry

    # -- querying ----------------------------------------------------------------------------------
    def connect(self, **kwargs: Any):
        """An in-memory DuckDB connection with the dataset's views (see ``capcurate.views``)."""
        from .views import connect

        return connect(self, **kwargs)

    def query(self, sql: str, params: list[Any] | None = None):
        """Run SQL over the views and return a pyarrow Table."""
        con = self.connect()
        try:
            # duckdb 2: Arrow output from a relation avoids the extra copy a DB-API result makes
            return con.sql(sql, params=params or None).to_arrow_table()
        finally:
            con.close()

    def columns(self, view: str = "samples") -> list[str]:
        con = self.connect()
        try:
            return [r[0] for r in con.execute(f'DESCRIBE "{view}"').fetchall()]
        finally:
            con.close()

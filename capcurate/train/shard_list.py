"""Which shards a training run reads: a directory, a brace pattern, or the manifest.json / sizes.json
that ``capcurate shard`` and open_clip write, with their sample counts and caption recipe."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import storage
from ..errors import InputError
from ..shards import IMAGE_EXTS, index_tar, split_member_name

TEXT_EXTS = ("txt", "text", "caption")


@dataclass
class ShardList:
    urls: list[str]
    num_samples: int | None  # from manifest.json / sizes.json, or counted, or None for remote URLs
    source: str              # how the list was found, for the run record
    caption_recipe: dict[str, Any] | None = None  # manifest.json's {"keys": [...], "probs": [...] | None}
    # the .json caption keys manifest.json records (``()``: written without ``shard --captions``);
    # None where nothing records them (sizes.json, a folder, a pattern): then the first sample says
    caption_keys: tuple[str, ...] | None = None


def resolve_shards(spec: str) -> ShardList:
    """A brace pattern, a directory of .tar files, or a manifest.json / sizes.json from ``capcurate shard``.

    Each may be local or a URL (``s3://bucket/shards``, ``s3://bucket/shards/manifest.json``,
    ``'s3://bucket/shards/{00000..00009}.tar'``); a folder in a store is listed once, and the shards a
    manifest or pattern names are checked against one listing per folder, never probed one by one.
    """
    if _in_store(spec):
        return _resolve_remote(spec)
    import webdataset as wds

    p = Path(spec)
    if p.is_file() and p.suffix == ".json":
        return _from_json(p)
    if p.is_dir():
        for name in ("manifest.json", "sizes.json"):
            if (p / name).is_file():
                return _from_json(p / name)
        tars = sorted(str(t) for t in p.glob("*.tar"))
        if not tars:
            raise InputError(f"{p} holds no .tar shards (and no manifest.json or sizes.json)")
        return ShardList(tars, None, "directory")
    urls = wds.shardlists.expand_urls(spec)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    missing += _missing_remote([u for u in urls if _in_store(u)])
    if missing:
        raise InputError(
            f"training data {spec!r}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]}); "
            "expected a shard directory, a manifest.json, or a brace pattern like 'shards/{00000..00009}.tar'"
        )
    return ShardList(list(urls), None, "pattern")


def _in_store(url: str) -> bool:
    """An object-store URL (s3://, gs://, az://, hf://...) that can be listed; http(s) and pipe: cannot."""
    return storage.is_remote(url) and storage.scheme_of(url) not in ("http", "https", "pipe")


def _resolve_remote(spec: str) -> ShardList:
    """``resolve_shards`` for a URL: a folder (prefix), a .json in a store, or a brace pattern of URLs."""
    import webdataset as wds

    if "{" in spec:
        urls = wds.shardlists.expand_urls(spec)
        missing = _missing_remote(urls)
        if missing:
            raise InputError(f"training data {spec!r}: {len(missing)} of {len(urls)} shards do not exist (first: "
                             f"{missing[0]})")
        return ShardList(list(urls), None, "pattern")
    p = storage.path(spec)
    if p.name.endswith(".json"):
        return _from_json(p)
    if p.name.endswith(".tar"):
        if _missing_remote([spec]):
            raise InputError(f"training data {spec!r} does not exist")
        return ShardList([spec], None, "pattern")
    names = storage.list_names(p)
    for name in ("manifest.json", "sizes.json"):
        if name in names:
            return _from_json(p / name, listed=names)
    tars = sorted(n for n in names if n.endswith(".tar"))
    if not tars:
        storage.check_container(p)  # a missing bucket says so
        raise InputError(f"{spec} holds no .tar shards (and no manifest.json or sizes.json)")
    return ShardList([str(p / n) for n in tars], None, "directory")


def _missing_remote(urls: list[str]) -> list[str]:
    """The URLs among ``urls`` that do not exist: one listing per folder they live in."""
    by_folder: dict[str, list[str]] = {}
    for u in urls:
        folder, _, _name = u.rstrip("/").rpartition("/")
        by_folder.setdefault(folder, []).append(u)
    missing = []
    for folder, members in by_folder.items():
        if "://" not in folder:
            continue
        names = storage.list_names(folder)
        if not names:
            storage.check_container(folder)  # a missing bucket is one line, not "N shards missing"
        missing += [u for u in members if u.rstrip("/").rpartition("/")[2] not in names]
    return missing


def _from_json(path: Any, listed: set[str] | None = None) -> ShardList:
    remote = storage.is_remote(path)
    try:
        obj = json.loads(storage.path(path).read_text() if remote else path.read_text())
    except FileNotFoundError:
        if remote:
            storage.check_container(path)
        raise InputError(f"cannot read {path}: it does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {storage.explain(e) or e}") from None
    recipe, keys = None, None
    if isinstance(obj, dict) and "shards" in obj:  # capcurate shard's manifest.json
        names = [(s["name"], int(s["samples"])) for s in obj["shards"]]
        recipe = obj.get("captions")
        if "captions" in obj:  # manifests older than the recipe say nothing either way
            keys = tuple(recipe["keys"]) if isinstance(recipe, dict) and recipe.get("keys") else ()
    elif isinstance(obj, dict) and all(isinstance(v, int) for v in obj.values()):  # open_clip sizes.json
        names = list(obj.items())
    else:
        raise InputError(f"{path}: expected capcurate's manifest.json ({{'shards': [...]}}) or sizes.json")
    urls = [str(path.parent / n) for n, _ in names]
    if remote:
        if listed is not None and all("/" not in n for n, _ in names):
            missing = [u for (n, _), u in zip(names, urls, strict=True) if n not in listed]
        else:
            missing = _missing_remote(urls)
    else:
        missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise InputError(f"{path} lists {len(missing)} shards that do not exist (first: {missing[0]})")
    return ShardList(urls, sum(n for _, n in names), path.name, recipe, keys)


def count_samples(urls: list[str]) -> int:
    """Samples with an image, counted from tar headers (no decoding); local shards only (a store would
    have to read every tar whole: there, the manifest.json / sizes.json says the counts)."""
    total = 0
    for u in urls:
        idx = index_tar(u)
        total += sum(1 for k in idx.samples if idx.image_ext(k))
    return total


def _first_members(url: str, probe: int) -> dict[str, set[str]]:
    """{key: extensions} of the first ``probe`` samples: a local tar's index, or the head of a stored tar
    streamed (a GET or two, never the whole object)."""
    if not storage.is_remote(url):
        idx = index_tar(url)
        return {k: set(idx.samples[k]) for k in list(idx.samples)[:probe]}
    import tarfile

    src = _open_head(url)
    found: dict[str, set[str]] = {}
    try:
        with src, tarfile.open(fileobj=src, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_member_name(m.name)
                if key not in found and len(found) == probe:
                    break
                found.setdefault(key, set()).add(ext)
    except (tarfile.TarError, EOFError, OSError):
        pass  # a damaged tar: what was read is judged; the stream counts the damage
    return found


def _open_head(url: str) -> Any:
    """A binary stream of a shard's head: the local file, or 1 MiB ranged reads of a stored object."""
    if not storage.is_remote(url):
        return open(url, "rb")
    q = storage.path(url)
    try:
        return q.fs.open(q.path, "rb", block_size=2**20)
    except Exception as e:
        raise InputError(f"cannot open shard {url}: {storage.explain(e) or f'{type(e).__name__}: {e}'}") from None


def first_json_keys(url: str, probe: int = 64) -> tuple[str, ...] | None:
    """The keys holding text in the first ``.json`` member of a shard (its caption keys, among others);
    ``()`` when its first ``probe`` members hold no ``.json``; None when the shard cannot be looked at
    here (http or pipe: URLs, a damaged head)."""
    import tarfile

    if url.startswith("pipe:") or ("://" in url and not _in_store(url)):
        return None
    try:
        with _open_head(url) as src, tarfile.open(fileobj=src, mode="r|") as tf:
            for i, m in enumerate(tf):
                if i >= probe:
                    break
                if m.isfile() and split_member_name(m.name)[1] == "json":
                    f = tf.extractfile(m)
                    meta = json.loads(f.read()) if f else None
                    return tuple(k for k, v in meta.items() if isinstance(v, str)) if isinstance(meta, dict) else ()
    except (tarfile.TarError, EOFError, OSError, ValueError):
        return None  # a damaged head: the stream counts the damage, the choice is not judged here
    return ()


def check_members(url: str, probe: int = 16) -> None:
    """Fail early, with the members found, when a shard has no image or no text members."""
    if url.startswith("pipe:") or ("://" in url and not _in_store(url)):
        return
    samples = _first_members(url, probe)
    keys = list(samples)
    found = sorted({e for k in keys for e in samples[k]})
    if not keys:
        raise InputError(f"shard {url} holds no samples")
    if not any(e in found for e in IMAGE_EXTS):
        raise InputError(f"shard {url} has no image members ({'/'.join(IMAGE_EXTS)}); found extensions: "
                         f"{', '.join(found) or 'none'} (keys e.g. {', '.join(keys[:3])})")
    if not any(e in found for e in TEXT_EXTS):
        raise InputError(f"shard {url} has no text members (.txt); found extensions: {', '.join(found)} "
                         f"(keys e.g. {', '.join(keys[:3])}); training needs a caption per image")

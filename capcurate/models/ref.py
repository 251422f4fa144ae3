"""Parse the model references a user types (DESIGN.md section 3).

    hf:<hub-id-or-local-dir>          transformers model (captioner or CLIP-style scorer)
    openclip:<arch>                   open_clip architecture, weights from --pretrained (tag or file)
                                      (--pretrained random[:SEED]: random weights, asked for explicitly)
    openclip:<arch>/<tag>             open_clip architecture with a pretrained tag
    openclip:<config.json>            a custom open_clip model config file (tiny models)
    <run dir> | <open_clip dir>       a capcurate training run (RUN/model) or a folder holding
                                      open_clip_config.json + weights (open_clip's local-dir layout)
    <hf dir>                          a folder with a transformers config.json
    <URL>                             any of these folders in a store (s3://bucket/runs/x, gs://..., az://...),
                                      also as hf:<URL> or openclip:<URL>

A URL is downloaded once into a local cache folder (``$CAPCURATE_CACHE/models``, default
``~/.cache/capcurate/models``) named by the URL and its objects' ETags, so a changed model downloads again
and an unchanged one never does; it then loads exactly as the local folder would. This module is the only
place that knows a model came from a store: ``ModelRef.url`` and ``version`` say so, and lineage records them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import InputError, ModelLoadError

OPENCLIP_CONFIG = "open_clip_config.json"
CACHE_ENV = "CAPCURATE_CACHE"
RANDOM = "random"  # --pretrained random[:SEED]: a randomly initialised model, seeded (tests, CapWorld demos)


def random_seed(pretrained: str | None) -> int | None:
    """The seed of ``--pretrained random`` (0) or ``random:SEED``; None for real weights."""
    if pretrained is None or not (pretrained == RANDOM or pretrained.startswith(RANDOM + ":")):
        return None
    tail = pretrained[len(RANDOM) + 1:] if pretrained != RANDOM else "0"
    if not tail.isdigit():
        raise InputError(f"--pretrained {pretrained}: expected random or random:SEED (a non-negative integer)")
    return int(tail)


def check_weights(ref: ModelRef) -> ModelRef:
    """Refuse an open_clip model that would load without weights: open_clip then initialises it at random
    and says so only to a logger nobody configured, so scores and captions would be noise, exit 0."""
    if ref.kind == "openclip" and ref.local_dir is None and not ref.pretrained:
        raise InputError(
            f"{ref.text} has no weights: pass --pretrained FILE_OR_TAG (or openclip:ARCH/TAG); "
            "--pretrained random (or random:SEED) builds it with seeded random weights, for tests and demos")
    random_seed(ref.pretrained)  # a malformed random:SEED is refused here too
    return ref


@dataclass(frozen=True)
class ModelRef:
    kind: str                    # "hf" | "openclip"
    name: str                    # hub id / local dir (hf); arch, config path or local-dir path (openclip)
    pretrained: str | None = None  # open_clip pretrained tag or weights file
    local_dir: Path | None = None  # open_clip local-dir (run export or saved folder)
    text: str = ""               # the reference as the user typed it
    url: str | None = None       # the store folder the model was downloaded from (name/local_dir: the cache)
    version: str | None = None   # a hash of the downloaded objects' names, sizes and ETags
    pretrained_url: str | None = None      # --pretrained given as a URL (pretrained: its cached copy)
    pretrained_version: str | None = None  # a hash of that object's URL, size and ETag

    def describe(self) -> dict[str, str | None]:
        """What lineage records about where the weights came from."""
        out = {
            "reference": self.text,
            "kind": self.kind,
            "name": self.name,
            "pretrained": self.pretrained,
            "local_dir": str(self.local_dir) if self.local_dir else None,
        }
        if self.url:
            out.update(url=self.url, version=self.version)
        if self.pretrained_url:
            out.update(pretrained_url=self.pretrained_url, pretrained_version=self.pretrained_version)
        return out


def parse_model_ref(text: str, pretrained: str | None = None) -> ModelRef:
    """Turn a reference string into a ``ModelRef``; raise ModelLoadError with the accepted forms."""
    if not text:
        raise ModelLoadError("empty model reference; use hf:<id-or-dir>, openclip:<arch>[/<tag>] or a run dir")
    if pretrained and _is_url(pretrained):  # weights in object storage (or any fsspec URL): a cached copy
        local, version = fetch_model_file(pretrained)
        ref = _parse(text, str(local))
        return check_weights(replace(ref, pretrained_url=pretrained, pretrained_version=version))
    return check_weights(_parse(text, pretrained))


def _parse(text: str, pretrained: str | None) -> ModelRef:
    if _is_url(text):
        folder, version = fetch_model_folder(text)
        return replace(_parse(str(folder), pretrained), text=text, url=text, version=version)
    if text.startswith("hf:"):
        name = text[3:]
        if not name:
            raise ModelLoadError("hf: needs a hub id or a local directory, e.g. hf:Salesforce/blip-image-captioning-base")
        if _is_url(name):
            folder, version = fetch_model_folder(name)
            return ModelRef("hf", str(folder), text=text, url=name, version=version)
        return ModelRef("hf", name, text=text)
    if text.startswith("openclip:"):
        spec = text[len("openclip:"):]
        if not spec:
            raise ModelLoadError("openclip: needs an architecture, e.g. openclip:ViT-B-32/openai")
        if _is_url(spec):
            folder, version = fetch_model_folder(spec)
            ref = _openclip_dir(folder / "model" if (folder / "model" / OPENCLIP_CONFIG).is_file() else folder, text)
            return replace(ref, url=spec, version=version)
        if spec.startswith("local-dir:"):
            return _openclip_dir(Path(spec[len("local-dir:"):]), text)
        p = Path(spec)
        if p.suffix == ".json" or p.is_file():
            if not p.is_file():
                raise ModelLoadError(f"open_clip model config {p} not found")
            return ModelRef("openclip", str(p), pretrained=pretrained, text=text)
        if p.is_dir():
            return _openclip_dir(p, text)
        arch, _, tag = spec.partition("/")
        return ModelRef("openclip", arch, pretrained=pretrained or (tag or None), text=text)
    p = Path(text)
    if p.is_dir():
        if (p / "model" / OPENCLIP_CONFIG).is_file():
            return _openclip_dir(p / "model", text)
        if (p / OPENCLIP_CONFIG).is_file():
            return _openclip_dir(p, text)
        if (p / "config.json").is_file():
            return ModelRef("hf", str(p), text=text)
        raise ModelLoadError(
            f"{p} is a directory but holds no model: expected a capcurate run (model/{OPENCLIP_CONFIG}), "
            f"an open_clip folder ({OPENCLIP_CONFIG}) or a transformers folder (config.json)"
        )
    raise ModelLoadError(
        f"cannot resolve model reference {text!r}: use hf:<hub-id-or-dir>, openclip:<arch>[/<tag>], "
        "openclip:<config.json>, or the path of a capcurate run directory"
    )


def _openclip_dir(path: Path, text: str) -> ModelRef:
    if not (path / OPENCLIP_CONFIG).is_file():
        raise ModelLoadError(f"{path} has no {OPENCLIP_CONFIG}")
    return ModelRef("openclip", f"local-dir:{path}", local_dir=path, text=text)


# -- models in object storage ----------------------------------------------------------------------
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _is_url(text: str) -> bool:
    return bool(_URL.match(text))


def cache_root() -> Path:
    """Where models from URLs are kept: ``$CAPCURATE_CACHE/models``, else ``~/.cache/capcurate/models``."""
    base = os.environ.get(CACHE_ENV)
    return Path(base).expanduser() / "models" if base else Path.home() / ".cache" / "capcurate" / "models"


def _tag(info: dict[str, Any]) -> str:
    for k in ("ETag", "etag", "md5Hash", "content_md5", "LastModified", "last_modified", "mtime", "updated"):
        if info.get(k):
            return str(info[k]).strip('"')
    return ""


def _model_files(url: str, files: dict[str, dict[str, Any]]) -> list[str]:
    """The objects (relative names) of the model a URL names: a run's ``model/`` only, else the folder."""
    names = [n for n in files if not any(part.startswith(".") for part in n.split("/"))]
    if f"model/{OPENCLIP_CONFIG}" in files:
        return sorted(n for n in names if n.startswith("model/"))
    if OPENCLIP_CONFIG in files:
        return sorted(n for n in names if "/" not in n)
    if "config.json" in files:
        return sorted(names)
    raise ModelLoadError(
        f"{url} holds no model: expected a capcurate run (model/{OPENCLIP_CONFIG}), an open_clip folder "
        f"({OPENCLIP_CONFIG}) or a transformers folder (config.json)"
    )


def fetch_model_folder(url: str) -> tuple[Path, str]:
    """The local copy of the model folder at ``url`` (downloaded on first use) and its version key.

    One listing says which objects make the model and their ETags; the cache folder is named by a hash
    of the URL and those, so a re-uploaded model is fetched again. The download goes into a temp folder
    renamed into place when complete, so a folder in the cache is whole, and concurrent processes
    (``--part`` runs, Ray actors on one host) at worst download twice.
    """
    from .. import storage
    from ..errors import InputError

    q = storage.path(url)
    if not storage.is_remote(q):  # file:// names a local folder
        return Path(q), ""
    try:
        listing = q.fs.find(q.path, detail=True)
    except Exception as e:  # credentials, endpoint, permission
        cause = storage.explain(e)
        if cause:
            raise InputError(f"{url}: {cause}") from None
        raise ModelLoadError(f"cannot list {url}: {type(e).__name__}: {e}") from None
    prefix = q.path.rstrip("/") + "/"
    files = {p[len(prefix):]: info for p, info in listing.items() if p.startswith(prefix)}
    if not files:
        storage.check_container(q)
        raise ModelLoadError(f"{url}: no model there (nothing under this prefix)")
    take = _model_files(url, files)
    key = hashlib.sha256("\n".join([url.rstrip("/")] + [f"{n}\t{files[n].get('size')}\t{_tag(files[n])}"
                                                        for n in take]).encode()).hexdigest()
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", q.name or "model")[:40]
    dest = cache_root() / f"{label}-{key[:20]}"
    if dest.is_dir():
        return dest, key
    _download(q.fs, [(prefix + name, name) for name in take], dest, url)
    return dest, key


def local_weights(pretrained: str | None) -> str | None:
    """``--pretrained`` as open_clip takes it: a URL becomes its cached local copy; a tag or a path stays."""
    return str(fetch_model_file(pretrained)[0]) if pretrained and _is_url(pretrained) else pretrained


def fetch_model_file(url: str) -> tuple[Path, str]:
    """The local copy of one weights object at ``url`` (``--pretrained s3://bucket/w.safetensors``),
    downloaded on first use, and its version key (a hash of the URL, size and ETag: a re-uploaded file is
    fetched again)."""
    from .. import storage

    q = storage.path(url)
    if not storage.is_remote(q):  # file:// names a local file
        return Path(q), ""
    try:
        info = q.fs.info(q.path)
    except FileNotFoundError:
        raise ModelLoadError(f"--pretrained {url}: no such object") from None
    except Exception as e:  # credentials, endpoint, permission
        cause = storage.explain(e)
        if cause:
            raise InputError(f"{url}: {cause}") from None
        raise ModelLoadError(f"cannot read {url}: {type(e).__name__}: {e}") from None
    if info.get("type") == "directory":
        raise ModelLoadError(f"--pretrained {url} is a folder: name the weights file in it")
    key = hashlib.sha256(f"{url}\t{info.get('size')}\t{_tag(info)}".encode()).hexdigest()
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", q.name or "weights")[:40]
    dest = cache_root() / f"{label}-{key[:20]}"
    if not dest.is_dir():
        _download(q.fs, [(q.path, q.name)], dest, url)
    return dest / q.name, key


def _download(fs: Any, objects: list[tuple[str, str]], dest: Path, url: str) -> None:
    """Download ``objects`` ((remote path, name in ``dest``)) into a temp folder renamed to ``dest`` when
    complete, so a folder in the cache is whole; concurrent processes (``--part`` runs, Ray actors on one
    host) at worst download twice."""
    from .. import storage
    from ..atomic import owner_tag

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}~{owner_tag()}~{uuid.uuid4().hex[:8]}.tmp"
    try:
        for remote, name in objects:
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not another process's finished copy: a real failure
                raise
    except Exception as e:
        cause = storage.explain(e)
        if cause:
            raise InputError(f"{url}: {cause}") from None
        if isinstance(e, (InputError, ModelLoadError)):
            raise
        raise ModelLoadError(f"cannot download {url}: {type(e).__name__}: {e}") from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)

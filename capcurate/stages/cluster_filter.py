"""DataComp's image-based clustering filter (Gadre et al. 2023; ``baselines/image_based_clustering.py`` and
``baselines/apply_filter.py`` of mlfoundations/datacomp), on a scorer's saved float16 embeddings.

1. a light caption filter: English, at least 2 words and 6 characters (DataComp: more than 1 word and
   more than 5 characters; words are fastText's tokens, ``caption_words``, as DataComp counts them);
2. k-means (faiss, ``NITER`` Lloyd iterations, seeded) on the image embeddings of a sample of the rows
   that pass it (``sample_ratio`` of them, at most ``train_size``);
3. target clusters: the centroid with the largest dot product for each target embedding (DataComp: the
   ImageNet-1k training images embedded with the same L/14; here the images of ``targets``, a dataset
   or eval-set directory or a .npy of embeddings, or the text embeddings of ``target_classes``);
4. every pool image whose own largest-dot-product centroid is a target cluster is kept (with the caption
   filter of step 1: ``capcurate.stages.filter`` adds both as rules).

The target set is embedded with the model the scores lineage of that scorer records, so pool and targets
share one embedding space. Deviation: DataComp samples the k-means rows with replacement; here without.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .. import storage
from ..dataset import Dataset
from ..errors import InputError
from .caption_words import word_count_sql
from .dedup.embeddings import EmbeddingStore, peak_memory_mb
from .dedup.kmeans import CentroidIndex, assign_shards, gather_sample, train_kmeans

CLASS_TEMPLATE = "a photo of a {}."
DEFAULT_TRAIN_SIZE = 1_000_000   # 1M x 768 float32 = 3 GB: the largest allocation of a run
ROWS_PER_CLUSTER = 100           # --clusters auto (DataComp: 100,000 clusters for pools of 12.8M and up)


@dataclass(frozen=True)
class ClusterFilter:
    scorer: str
    targets: str | None = None
    target_classes: str | None = None
    clusters: int | None = None      # None: one per ROWS_PER_CLUSTER caption-filtered rows, at most 100,000
    sample_ratio: float = 1.0
    train_size: int = DEFAULT_TRAIN_SIZE
    seed: int = 0
    language: str = "en"
    min_words: int = 2
    min_chars: int = 6

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        if (self.targets is None) == (self.target_classes is None):
            raise InputError("--cluster needs exactly one of --targets DIR_OR_NPY and --target-classes FILE")
        if not 0 < self.sample_ratio <= 1:
            raise InputError(f"--sample-ratio must be in (0, 1], got {self.sample_ratio}")
        if self.train_size < 1 or (self.clusters is not None and self.clusters < 1):
            raise InputError("--train-size and --clusters must be positive")

    def caption_rules(self, caption: str) -> list[tuple[str, str]]:
        rules = [(f"cluster: caption words >= {self.min_words}",
                  f"{word_count_sql(caption)} >= {int(self.min_words)}"),
                 (f"cluster: caption chars >= {self.min_chars}", f"length({caption}) >= {int(self.min_chars)}")]
        if self.language:
            rules.insert(0, (f"cluster: caption language = {self.language}",
                             f"{caption} IN (SELECT text FROM __capcurate_lang WHERE lang = '{self.language}')"))
        return rules


def target_clusters(ds: Dataset, cf: ClusterFilter, eligible_uids: Any) -> tuple[Any, dict[str, Any]]:
    """(Arrow table of the uids in target clusters, details); ``eligible_uids``: rows passing the caption filter."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t0 = time.time()
    store = EmbeddingStore(ds, cf.scorer)
    shards = list(store.shards())
    masks = [s.ok & pc.is_in(pa.array(s.uids, pa.string()), value_set=eligible_uids).to_numpy(zero_copy_only=False)
             for s in shards]
    n = int(sum(int(m.sum()) for m in masks))
    if n == 0:
        raise InputError(f"no row passes the caption filter and has an embedding in embeddings/{cf.scorer}")
    k = cf.clusters or min(100_000, max(1, math.ceil(n / ROWS_PER_CLUSTER)))
    size = min(cf.train_size, max(1, round(n * cf.sample_ratio)))
    sample = gather_sample(shards, masks, size, cf.seed, store.dim)
    centroids = train_kmeans(sample, k, seed=cf.seed)
    del sample
    t_kmeans = time.time() - t0

    targets = embed_targets(ds, cf)
    if targets.shape[1] != store.dim:
        raise InputError(f"target embeddings have {targets.shape[1]} dimensions, embeddings/{cf.scorer} has {store.dim}")
    index = CentroidIndex(centroids, "ip")
    wanted = np.unique(index.nearest(targets)[0])
    is_target = np.zeros(k, bool)
    is_target[wanted] = True

    kept: list[Any] = []

    def collect(shard: Any, labels: np.ndarray) -> None:
        hit = (labels >= 0) & is_target[np.maximum(labels, 0)]
        kept.append(pa.array([u for u, h in zip(shard.uids, hit, strict=True) if h], pa.string()))

    assign_shards(shards, index, collect)
    table = pa.table({"uid": pa.concat_arrays(kept) if kept else pa.array([], pa.string())})
    details = {"clusters": k, "kmeans_rows": min(size, n), "caption_filtered_embedded": n, "targets": len(targets),
               "target_clusters": int(len(wanted)), "in_target_clusters": table.num_rows,
               "kmeans_seconds": round(t_kmeans, 2), "peak_memory_mb": round(peak_memory_mb(), 1),
               "missing_embedding_shards": store.missing_shards}
    return table, details


def embed_targets(ds: Dataset, cf: ClusterFilter) -> np.ndarray:
    """L2-normalised float32 target embeddings: a .npy as it is, else made with the scorer's own model."""
    if cf.targets and str(cf.targets).endswith(".npy"):
        from .score_columns import load_npy

        path = storage.path(cf.targets)
        if not path.is_file():
            raise InputError(f"--targets {path}: no such file")
        x = load_npy(path).astype(np.float32)
        if x.ndim != 2 or not len(x):
            raise InputError(f"--targets {path}: expected a 2-d array of embeddings, got shape {x.shape}")
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    scorer, device = _load_scorer(ds, cf.scorer)
    if cf.target_classes:
        path = storage.path(cf.target_classes)
        if not path.is_file():
            raise InputError(f"--target-classes {path}: no such file")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not names:
            raise InputError(f"--target-classes {path} has no class names (one per line)")
        return scorer.encode_texts([CLASS_TEMPLATE.format(c) for c in names]).float().numpy()
    return _embed_images(scorer, device, _target_works(storage.path(cf.targets)))


def _load_scorer(ds: Dataset, name: str) -> Any:
    from ..devices import resolve_device
    from ..models.scorers import load_scorer

    entries = [e for e in ds.card.lineage("scores", name) if (e.get("parameters") or {}).get("model")]
    if not entries:
        raise InputError(f"no lineage entry for scores/{name}: cannot tell which model to embed the targets with "
                         "(pass --targets FILE.npy with embeddings instead)")
    params = entries[-1]["parameters"]
    device = resolve_device("auto")
    precision = params.get("precision") if device.startswith("cuda") else "fp32"
    return load_scorer(params["model"], pretrained=params.get("pretrained"), device=device,
                       precision=precision or "fp32"), device


def _target_works(root: Any) -> list[Any]:
    """Image entries of a capcurate dataset (downloaded rows) or of every tar under a folder (an eval set)."""
    from ..inputs import ShardWork
    from ..shards import index_tar

    if not root.exists():
        raise InputError(f"--targets {root} does not exist")
    if (root / "capcurate.json").is_file():
        tds = Dataset(root)
        works = []
        for sid in tds.shard_ids():
            m = storage.read_table(tds.samples_path(sid), columns=["key", "status"]).to_pylist()
            works.append(ShardWork(sid, str(tds.shard_path(sid)),
                                   [(str(i), r["key"]) for i, r in enumerate(m) if r["status"] == "success"]))
        return works
    tars = sorted(root.rglob("*.tar")) if root.is_dir() else [root]
    works = []
    for i, tar in enumerate(tars):
        idx = index_tar(tar)
        works.append(ShardWork(str(i), str(tar), [(str(j), k) for j, k in enumerate(idx.samples) if idx.image_ext(k)]))
    if not any(w.entries for w in works):
        raise InputError(f"--targets {root}: no images found (expected a capcurate dataset, tars of images or a .npy)")
    return works


def _embed_images(scorer: Any, device: str, works: list[Any]) -> np.ndarray:
    import torch

    from ..devices import resolve_decode, resolve_workers
    from ..inputs import ImageStream, Preprocess

    stream = ImageStream(works, Preprocess(scorer.spec, scorer.preprocess), batch_size=64,
                         workers=resolve_workers("auto"), device=device, dtype=scorer.input_dtype,
                         decode=resolve_decode("auto", device))
    out = []
    with torch.no_grad():
        for batch in stream:
            if batch.items:
                out.append(scorer.encode_images(batch.pixels).float().numpy())
    if not out:
        raise InputError("no target image could be decoded")
    return np.concatenate(out)

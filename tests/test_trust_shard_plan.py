"""A shard output directory records its plan's sources: parts of one output never mix two plans (issue 22,
item 4: ``shard --part 0/2``, the selection's shards change, ``shard --part 1/2``)."""

from __future__ import annotations

import json
import shutil

import pytest
from curate_fixtures import build_scored_dataset

from capcurate.errors import OutputExistsError
from capcurate.shards import iter_samples
from capcurate.stages.mix import mix
from capcurate.stages.shard import shard


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = build_scored_dataset(tmp_path_factory.mktemp("plan") / "ds")
    mix(root, "both", synthetic="blip", name="both")
    return root


def _repair_shard(root) -> None:
    """What doctor --repair does to a damaged shard: its tar and manifest are removed."""
    (root / "shards" / "00001.tar").unlink()
    (root / "samples" / "00001.parquet").unlink()


def test_a_part_after_the_selections_shards_changed_is_refused_naming_the_sources(mixed, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(mixed, root)
    out = tmp_path / "out"
    shard(root, "both", out, samples_per_shard=3, part="0/2")
    _repair_shard(root)
    with pytest.raises(OutputExistsError, match=r"sources\.samples.*sources\.shards|sources\.shards"):
        shard(root, "both", out, samples_per_shard=3, part="1/2")


def test_overwrite_rebuilds_a_changed_plan_whole_so_the_index_files_match_the_tars(mixed, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(mixed, root)
    out = tmp_path / "out"
    shard(root, "both", out, samples_per_shard=3, part="0/2")
    _repair_shard(root)
    shard(root, "both", out, samples_per_shard=3, part="1/2", overwrite=True)
    last = shard(root, "both", out, samples_per_shard=3, part="0/2")  # the same (new) plan: resumed
    assert last.details["complete"] and last.details["mode"] == "resume"
    keys = [k for t in sorted(out.glob("*.tar")) for k, _ in iter_samples(t)]
    sizes = json.loads((out / "sizes.json").read_text())
    assert len(keys) == len(set(keys)) == sum(sizes.values())  # nothing repeated, sizes.json tells the truth
    assert sorted(sizes) == sorted(t.name for t in out.glob("*.tar"))


def test_a_part_after_a_rescore_is_refused_naming_the_scores(mixed, tmp_path):
    """Each sample's json carries the score columns: parts of one output must come from the same scores."""
    import pyarrow.parquet as pq

    from capcurate import atomic

    root = tmp_path / "ds"
    shutil.copytree(mixed, root)
    out = tmp_path / "out"
    shard(root, "both", out, samples_per_shard=3, part="0/2")
    (name,) = [p.name for p in (root / "scores").iterdir() if p.is_dir()]
    f = sorted((root / "scores" / name).glob("*.parquet"))[0]
    atomic.write_parquet(f, pq.read_table(f))   # what score --overwrite does: the same file name, rewritten
    with pytest.raises(OutputExistsError, match=rf"sources\.scores/{name}"):
        shard(root, "both", out, samples_per_shard=3, part="1/2")

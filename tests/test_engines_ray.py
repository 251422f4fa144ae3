"""--engine ray on a real multi-process cluster: a head and one worker node (1 CPU each, loopback, their own
temp dir and ports) started by this module, joined through RAY_ADDRESS. The Ray engine writes the same
files as the local engine, with relative paths, and records where each actor ran."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import build_dataset, make_image_bytes
from scorer_fixtures import save_tiny_openclip
from typer.testing import CliRunner

from capcurate.errors import ModelLoadError
from capcurate.stages.score import score

ray = pytest.importorskip("ray", reason="Ray is the optional scale-out engine: pip install 'capcurate[ray]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(root: str, *args: str) -> subprocess.Popen:
    """``ray start --block`` in its own process group, so teardown ends exactly the processes it started."""
    ports = [f"--{opt}={_free_port()}" for opt in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "metrics-export-port", "runtime-env-agent-port")]
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
           "--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats", *ports, *args]
    log = open(Path(root) / f"node{len(os.listdir(root))}.log", "w")  # noqa: SIM115 (closed with the node)
    # a token another Ray run left in ~/.ray would switch the nodes (not this driver) to token auth
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.fixture(scope="module")
def ray_cluster():
    # short: Ray's socket paths under the temp dir must fit in 107 bytes
    root = tempfile.mkdtemp(prefix="ccray-", dir="/tmp")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    nodes = [_start_node(root, "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={root}")]
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and nodes[0].poll() is None, "the Ray head did not start"
                time.sleep(0.2)
        nodes.append(_start_node(root, f"--address={address}"))
        os.environ.update(RAY_ADDRESS=address, RAY_AUTH_MODE="disabled")
        ray.init(address=address, log_to_driver=False)
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, "the Ray worker node did not join"
            time.sleep(0.2)
        # the job classes below live in this file, which the Ray workers cannot import
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        yield address
    finally:
        ray.shutdown()
        for node in nodes:  # `ray start --block` does not stop on SIGTERM in time; its group is ours alone
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)


def _entry(ds: Path, family: str, name: str) -> dict:
    card = json.loads((ds / "capcurate.json").read_text())
    return [e for e in card["lineage"] if e.get("family") == family and e.get("name") == name][-1]


def test_score_with_relative_paths_on_two_nodes_equals_local_and_records_each_actor(tmp_path, ray_cluster,
                                                                                    monkeypatch):
    cfg, weights = save_tiny_openclip(tmp_path / "model")
    samples = [{"caption": f"a photo of thing {i}", "image": make_image_bytes(i)} for i in range(12)]
    samples.append({"caption": "broken", "image": b"not an image"})
    local = build_dataset(tmp_path / "local", samples, per_shard=4)
    shutil.copytree(local, tmp_path / "remote")
    score(local, f"openclip:{cfg}", pretrained=str(weights), name="tiny", batch_size=4, workers=0)

    # the actors' working directory is the driver's at connect time, not this one: relative paths must
    # be made absolute on the driver, or every actor fails to find the model
    monkeypatch.chdir(tmp_path)
    common = dict(pretrained="model/" + weights.name, name="tiny", batch_size=4)
    summary = score("remote", f"openclip:model/{cfg.name}", engine="ray", num_actors=2, **common)

    remote = tmp_path / "remote"
    assert summary.ok and summary.counts["shards_processed"] == 4
    for shard in ("00000", "00001", "00002", "00003"):
        a = pq.read_table(local / "scores" / "tiny" / f"{shard}.parquet").to_pylist()
        b = pq.read_table(remote / "scores" / "tiny" / f"{shard}.parquet").to_pylist()
        assert [r["uid"] for r in a] == [r["uid"] for r in b]
        for ra, rb in zip(a, b, strict=True):
            if ra["score_tiny_raw"] is None:
                assert rb["score_tiny_raw"] is None and rb["error_tiny"]
            else:
                assert rb["score_tiny_raw"] == pytest.approx(ra["score_tiny_raw"], abs=1e-5)

    entry = _entry(remote, "scores", "tiny")
    assert (entry["device"], entry["precision"]) == ("cpu", "fp32")  # resolved on the actors, not "auto"
    actors = entry["actors"]
    assert len(actors) == 2 and len({a["node"] for a in actors}) == 2  # one actor on each node
    # decode workers sized from the 1 CPU Ray gave each actor, not from the machine's cores
    assert {(a["cpus"], a["workers"]) for a in actors} == {(1, 1)}

    # a second ray run finds every shard done and processes nothing
    again = score("remote", f"openclip:model/{cfg.name}", engine="ray", num_actors=2, **common)
    assert again.counts["shards_processed"] == 0 and again.counts["shards_skipped"] == 4


def test_recaption_on_ray_resolves_device_on_the_actor_and_equals_local(tmp_path, ray_cluster, monkeypatch):
    from captioner_fixtures import build_tiny_blip

    from capcurate.stages.recaption import RecaptionJob, recaption
    from capcurate.stages.shard import ShardWriteJob

    ref = build_tiny_blip(tmp_path / "model")
    samples = [{"caption": f"a photo of thing {i}", "image": make_image_bytes(i)} for i in range(8)]
    local = build_dataset(tmp_path / "local", samples, per_shard=4)
    shutil.copytree(local, tmp_path / "remote")
    common = dict(name="b", decoding="greedy", max_new_tokens=4, workers=0)
    recaption(local, model=ref, **common)
    monkeypatch.chdir(tmp_path)
    relative = "hf:" + os.path.relpath(ref.removeprefix("hf:"), tmp_path)
    s = recaption("remote", model=relative, engine="ray", **common)  # device/precision "auto" resolved by actors
    assert s.ok and s.counts["shards_processed"] == 2
    for shard in ("00000", "00001"):
        a = pq.read_table(local / "captions" / "b" / f"{shard}.parquet").to_pylist()
        b = pq.read_table(tmp_path / "remote" / "captions" / "b" / f"{shard}.parquet").to_pylist()
        assert a == b
    entry = _entry(tmp_path / "remote", "captions", "b")
    assert (entry["device"], entry["precision"], entry["parameters"]["model"]) == ("cpu", "fp32", relative)
    assert all(a["device"] == "cpu" and a["batch_size"] == 16 for a in entry["actors"])
    # model stages ask Ray for a GPU where there is one; shard copying never does
    assert RecaptionJob("r", "n", ref, None, None).uses_gpu
    assert not RecaptionJob("r", "n", ref, None, None, device="cpu").uses_gpu
    assert not getattr(ShardWriteJob, "uses_gpu", False)


class SlowCountingJob:
    """Writes one marker file per shard; the actor working on ``kill_shard`` kills itself (kill -9) the
    first time, after 0.2 s of work, as an out-of-memory kill or a lost node would end it."""

    def __init__(self, root, kill_shard: str | None = None, always_kill: bool = False):
        self.root, self.kill_shard, self.always_kill = root, kill_shard, always_kill

    def output_path(self, sid):
        return self.root / f"{sid}.done"

    def setup(self):
        pass

    def process(self, sid):
        import os
        import signal
        import time

        (self.root / f"{sid}.attempt.{os.getpid()}").touch()
        time.sleep(0.2)
        if sid == self.kill_shard and (self.always_kill or not (self.root / "killed").exists()):
            (self.root / "killed").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        self.output_path(sid).write_text(sid)
        return {"rows": 1}


def test_ray_replaces_a_killed_actor_and_retries_only_its_shard(tmp_path, ray_cluster):
    from capcurate.engines import run_job

    ids = [f"{i:05d}" for i in range(6)]
    result = run_job(SlowCountingJob(tmp_path, kill_shard="00002"), ids, engine="ray", num_actors=2,
                     max_retries=1)
    assert sorted(result.processed) == ids and not result.failed
    assert result.counts["rows"] == 6 and result.counts["ray_actors_replaced"] == 1
    attempts = {sid: len(list(tmp_path.glob(f"{sid}.attempt.*"))) for sid in ids}
    assert attempts == {**dict.fromkeys(ids, 1), "00002": 2}  # one shard of work lost, nothing else redone

    # an actor that dies every time: the shard fails after --max-retries, the other shards still finish
    again = tmp_path / "again"
    again.mkdir()
    result = run_job(SlowCountingJob(again, kill_shard="00001", always_kill=True), ids[:3], engine="ray",
                     num_actors=2, max_retries=0)
    assert sorted(result.processed) == ["00000", "00002"]
    assert "died 1 times (--max-retries 0)" in result.failed["00001"]


class StreamingJob:
    """A job that streams (``process_many``): each call leaves a file naming the shards it was given."""

    def __init__(self, root):
        self.root = root

    def output_path(self, sid):
        return self.root / f"{sid}.done"

    def setup(self):
        pass

    def process_many(self, shard_ids):
        import os

        (self.root / f"window.{os.getpid()}.{shard_ids[0]}").write_text(",".join(shard_ids))
        for sid in shard_ids:
            self.output_path(sid).write_text(sid)
            yield sid, {"rows": 1}


def test_each_actor_streams_a_window_of_shards_through_one_input_pipeline(tmp_path, ray_cluster):
    from capcurate.engines import run_job

    ids = [f"{i:05d}" for i in range(6)]
    result = run_job(StreamingJob(tmp_path), ids, engine="ray", num_actors=2)
    assert sorted(result.processed) == ids and result.counts["rows"] == 6
    windows = sorted(p.read_text() for p in tmp_path.glob("window.*"))
    # two calls of three shards each, not six one-shard calls that restart the decode workers
    assert windows == ["00000,00001,00002", "00003,00004,00005"]


class BrokenStreamJob(StreamingJob):
    """``process_many`` raises before its first shard (not one shard's failure: the whole window's)."""

    def process_many(self, shard_ids):
        raise OSError("scratch disk full")
        yield  # a generator, as process_many is


def test_a_job_that_raises_outside_a_shard_fails_its_window_not_the_run(tmp_path, ray_cluster):
    from capcurate.engines import run_job

    ids = [f"{i:05d}" for i in range(4)]
    result = run_job(BrokenStreamJob(tmp_path), ids, engine="ray", num_actors=2)
    assert not result.processed and sorted(result.failed) == ids
    assert all("scratch disk full" in why for why in result.failed.values()), result.failed


class UnloadableJob:
    """Its set-up fails as a model that cannot be loaded does; each attempt leaves a file."""

    def __init__(self, root):
        self.root = root

    def output_path(self, sid):
        return self.root / f"{sid}.done"

    def setup(self):
        import os

        (self.root / f"setup.{os.getpid()}").touch()
        raise ModelLoadError("hf:./no-such-model: not found")

    def process(self, sid):
        raise AssertionError("no shard may run without its model")


def test_a_model_that_cannot_load_fails_once_with_the_actors_error_and_exit_4(tmp_path, ray_cluster):
    from capcurate.cli import app
    from capcurate.engines import ActorSetupError, run_job

    ids = [f"{i:05d}" for i in range(6)]
    with pytest.raises(ActorSetupError) as err:
        run_job(UnloadableJob(tmp_path), ids, engine="ray", num_actors=2)
    assert err.value.exit_code == 4 and "hf:./no-such-model: not found (Ray actor on" in str(err.value)
    assert len(list(tmp_path.glob("setup.*"))) <= 2  # once per actor at most, never once per shard

    # through the CLI: one line, exit 4, and the run leaves no lineage entry and no output
    ds = build_dataset(tmp_path / "ds", [{"caption": "x", "image": make_image_bytes(0)}], per_shard=4)
    before = (ds / "capcurate.json").read_text()
    r = CliRunner().invoke(app, ["score", str(ds), "--model", f"hf:{tmp_path / 'no-such-model'}", "--name", "s",
                                 "--engine", "ray"])
    assert r.exit_code == 4, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Ray actor on" in r.output
    assert (ds / "capcurate.json").read_text() == before and not (ds / "scores" / "s").exists()


@pytest.mark.parametrize("command", ["ingest", "recaption", "shard"])
def test_a_ray_address_that_does_not_answer_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, command):
    import capcurate
    from capcurate.cli import app

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not be asked to connect"))
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")  # nothing listens there
    ds = build_dataset(tmp_path / "ds", [{"caption": "x", "image": make_image_bytes(0)}], per_shard=4)
    if command == "shard":
        capcurate.filter(ds, "all", where="true")
    before = sorted(p.relative_to(ds) for p in ds.rglob("*"))
    card = (ds / "capcurate.json").read_text()
    args = {"ingest": ["ingest", str(ds / "shards"), "-o", str(tmp_path / "out")],
            "recaption": ["recaption", str(ds), "--model", "hf:x", "--name", "n"],
            "shard": ["shard", str(ds), "--selection", "all", "-o", str(tmp_path / "out")]}[command]
    r = CliRunner().invoke(app, [*args, "--engine", "ray"])
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "does not answer" in r.output
    assert not (tmp_path / "out").exists()
    assert sorted(p.relative_to(ds) for p in ds.rglob("*")) == before and (ds / "capcurate.json").read_text() == card


def test_without_ray_address_a_private_local_instance_is_started(monkeypatch):
    from capcurate.engines.ray import connect

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(k.get("address")))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    connect()
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # asked for by name: join the cluster on this machine
    connect()
    # never Ray's default (address=None), which joins whatever cluster `ray start` left on this machine
    assert calls == ["local", "auto"]


@pytest.mark.parametrize("command", ["recaption", "score", "ingest", "shard"])
def test_max_retries_must_not_be_negative(tmp_path, command):
    from capcurate.cli import app

    args = {"recaption": ["recaption", str(tmp_path), "--model", "hf:x", "--name", "n"],
            "score": ["score", str(tmp_path), "--model", "openclip:x", "--name", "n"],
            "ingest": ["ingest", str(tmp_path), "-o", str(tmp_path / "out")],
            "shard": ["shard", str(tmp_path), "--selection", "s", "-o", str(tmp_path / "out")]}[command]
    r = CliRunner().invoke(app, [*args, "--engine", "ray", "--max-retries", "-1"])
    assert r.exit_code == 2 and "--max-retries must be 0 or more, got -1" in r.output, r.output


def test_download_with_the_ray_distributor(tmp_path, ray_cluster):
    """img2dataset's ray distributor (``download --distributor ray``) fetches every shard on the cluster."""
    import pyarrow as pa
    from http_fixtures import add_good_images, serve

    from capcurate.dataset import Dataset
    from capcurate.stages.download import download

    with serve() as srv:
        rows = add_good_images(srv, 6)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "u.parquet")
        s = download(tmp_path / "u.parquet", tmp_path / "ds", timeout=3, threads=4, image_size=32,
                     samples_per_shard=3, distributor="ray")
    assert s.ok and (s.counts["ok"], s.counts["shards"]) == (6, 2)
    got = Dataset(tmp_path / "ds").query("SELECT url, status FROM manifest").to_pylist()
    assert sorted(r["url"] for r in got) == sorted(r["url"] for r in rows)
    assert {r["status"] for r in got} == {"success"}


class EnvJob(StreamingJob):
    """Records, from inside the actor, what its environment says."""

    def setup(self):
        pass

    def placement(self):
        return {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "CAPCURATE_PROBE", "CAPCURATE_CPUS", "PATHX")}


def test_actors_get_the_drivers_storage_and_capcurate_settings(tmp_path, ray_cluster, monkeypatch):
    """Set in the driver after the nodes started (as on a real cluster, where `ray start` ran elsewhere)."""
    from capcurate.engines import run_job

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("CAPCURATE_PROBE", "from the driver")
    monkeypatch.setenv("CAPCURATE_CPUS", "99")   # not forwarded: each actor counts the CPUs Ray gave it
    monkeypatch.setenv("PATHX", "not forwarded")
    result = run_job(EnvJob(tmp_path), ["00000", "00001"], engine="ray", num_actors=2)
    assert sorted(result.processed) == ["00000", "00001"]
    seen = [{k: p.get(k) for k in ("AWS_ENDPOINT_URL", "CAPCURATE_PROBE", "CAPCURATE_CPUS", "PATHX")}
            for p in result.placements]
    assert seen and all(s == {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "CAPCURATE_PROBE": "from the driver",
                              "CAPCURATE_CPUS": "1", "PATHX": None} for s in seen), seen

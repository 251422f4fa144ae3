"""An open_clip model with no weights is refused (exit 2, one line) unless ``--pretrained random`` asks for
one: then its weights are seeded (two runs score alike) and lineage records that they were random."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from train_fixtures import tiny_clip_config, tiny_coca_config, write_eval_set
from typer.testing import CliRunner

from capcurate.cli import app
from capcurate.dataset import Dataset
from capcurate.errors import InputError

runner = CliRunner()


def _one_line(r, code: int) -> str:
    out = r.output.strip()
    assert r.exit_code == code and len(out.splitlines()) == 1 and "Traceback" not in out, (r.exit_code, out)
    return out


def test_score_eval_and_coca_recaption_refuse_a_model_without_weights(tiny_dataset: Path, tmp_path: Path) -> None:
    clip, coca = tiny_clip_config(tmp_path), tiny_coca_config(tmp_path)
    card = (tiny_dataset / "capcurate.json").read_bytes()
    evalset = write_eval_set(tmp_path / "eval", per_class=1)
    for args in (["score", str(tiny_dataset), "--model", f"openclip:{clip}", "--name", "s"],
                 ["score", str(tiny_dataset), "--model", "openclip:ViT-B-32", "--name", "s"],
                 ["recaption", str(tiny_dataset), "--model", f"openclip:{coca}", "--name", "c"],
                 ["eval", f"openclip:{clip}", "--data", str(evalset), "-o", str(tmp_path / "r.json")]):
        line = _one_line(runner.invoke(app, args), 2)
        assert "has no weights" in line and "--pretrained random" in line
    r = runner.invoke(app, ["score", str(tiny_dataset), "--model", f"openclip:{clip}", "--name", "s",
                            "--pretrained", "random:x"])
    assert "random:SEED" in _one_line(r, 2)
    assert (tiny_dataset / "capcurate.json").read_bytes() == card
    assert not (tiny_dataset / "scores").exists() and not (tiny_dataset / "captions").exists()
    assert not (tmp_path / "r.json").exists()


def test_pretrained_random_is_seeded_and_recorded_in_lineage(tiny_dataset: Path, tmp_path: Path) -> None:
    from capcurate.models.openclip_loader import load_openclip
    from capcurate.models.ref import parse_model_ref
    from capcurate.stages.score import score

    cfg = tiny_clip_config(tmp_path)
    common = dict(captions="raw", workers=0, batch_size=8, device="cpu", precision="fp32")
    score(tiny_dataset, f"openclip:{cfg}", "a", pretrained="random", **common)
    score(tiny_dataset, f"openclip:{cfg}", "b", pretrained="random", **common)
    col = {n: pq.read_table(tiny_dataset / "scores" / n / "00000.parquet").column(f"score_{n}_raw").to_pylist()
           for n in "ab"}
    assert col["a"] == col["b"]
    (entry,) = Dataset(tiny_dataset).card.lineage("scores", "a")
    assert entry["parameters"]["pretrained"] == "random" and entry["model"]["pretrained"] == "random"
    import torch

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    zero = load_openclip(parse_model_ref(f"openclip:{cfg}", pretrained="random")).model.state_dict()
    assert torch.rand(1) == before  # the caller's random state is left alone
    one = load_openclip(parse_model_ref(f"openclip:{cfg}", pretrained="random:1")).model.state_dict()
    again = load_openclip(parse_model_ref(f"openclip:{cfg}", pretrained="random:0")).model.state_dict()
    assert all(torch.equal(zero[k], again[k]) for k in zero)
    assert not torch.equal(zero["text_projection"], one["text_projection"])
    with pytest.raises(InputError, match="has no weights"):
        parse_model_ref(f"openclip:{cfg}")

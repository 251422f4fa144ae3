"""Parse the model references a user types (DESIGN.md section 3).

    hf:<hub-id-or-local-dir>          transformers model (captioner or CLIP-style scorer)
    openclip:<arch>                   open_clip architecture, weights from --pretrained (tag or file)
    openclip:<arch>/<tag>             open_clip architecture with a pretrained tag
    openclip:<config.json>            a custom open_clip model config file (tiny models)
    <run dir> | <open_clip dir>       a capcurate training run (RUN/model) or a folder holding
                                      open_clip_config.json + weights (open_clip's local-dir layout)
    <hf dir>                          a folder with a transformers config.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

OPENCLIP_CONFIG = "open_clip_config.json"


@dataclass(frozen=True)
class ModelRef:
    kind: str                    # "hf" | "openclip"
    name: str                    # hub id / local dir (hf); arch, config path or local-dir path (openclip)
    pretrained: str | None = None  # open_clip pretrained tag or weights file
    local_dir: Path | None = None  # open_clip local-dir (run export or saved folder)
    text: str = ""               # the reference as the user typed it

    def describe(self) -> dict[str, str | None]:
        """What lineage records about where the weights came from."""
        return {
            "reference": self.text,
            "kind": self.kind,
            "name": self.name,
            "pretrained": self.pretrained,
            "local_dir": str(self.local_dir) if self.local_dir else None,
        }


def parse_model_ref(text: str, pretrained: str | None = None) -> ModelRef:
    """Turn a reference string into a ``ModelRef``; raise ModelLoadError with the accepted forms."""
    if not text:
        raise ModelLoadError("empty model reference; use hf:<id-or-dir>, openclip:<arch>[/<tag>] or a run dir")
    if text.startswith("hf:"):
        name = text[3:]
        if not name:
            raise ModelLoadError("hf: needs a hub id or a local directory, e.g. hf:Salesforce/blip-image-captioning-base")
        return ModelRef("hf", name, text=text)
    if text.startswith("openclip:"):
        spec = text[len("openclip:"):]
        if not spec:
            raise ModelLoadError("openclip: needs an architecture, e.g. openclip:ViT-B-32/openai")
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

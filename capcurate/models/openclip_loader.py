"""Load open_clip models (CLIP and CoCa) from any capcurate reference, and export them.

open_clip's own factory does the work: built-in architecture names with pretrained tags or weight
files, custom JSON configs (registered with ``add_model_config``) and its ``local-dir:`` layout
(``open_clip_config.json`` + ``open_clip_model.safetensors`` + tokenizer files), which is also what
``capcurate train`` exports into ``RUN/model``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import atomic
from ..errors import ModelLoadError
from .ref import OPENCLIP_CONFIG, ModelRef, check_weights, random_seed


@dataclass
class OpenClipBundle:
    model: torch.nn.Module
    preprocess: Any          # eval transform: PIL image -> tensor
    preprocess_train: Any
    tokenizer: Any           # callable: list[str] -> LongTensor [n, context_length]
    model_name: str          # what open_clip was asked for
    model_cfg: dict[str, Any]


_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_WEIGHTED = (*_CONVS, torch.nn.Linear)


def input_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a tower's pixel input must have: that of the first layer that consumes it.

    A model made with ``precision='bf16'/'fp16'`` is not uniformly low precision: open_clip converts
    only convolutions, linear layers, attention projections and a few projection parameters, and keeps
    class/positional embeddings, LayerNorms (and a CoCa decoder's ``text_projection``) in float32; a
    transformers model may keep ``_keep_in_fp32_modules``. So ``next(model.parameters()).dtype`` says
    nothing about the input: ask the patch/stem convolution (ViT ``conv1``, ResNet stem, timm's first
    conv or linear layer, transformers' patch embedding), found as the first such layer in module order.
    """
    stem = getattr(module, "conv1", None)
    if isinstance(stem, _WEIGHTED):
        return stem.weight.dtype
    # a convolution first: in a whole dual encoder a text tower's linear layers may come before it
    for kinds in (_CONVS, _WEIGHTED):
        for m in module.modules():
            if isinstance(m, kinds) and m.weight.is_floating_point():
                return m.weight.dtype
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def align_low_precision(model: torch.nn.Module) -> None:
    """Give the parameters open_clip's ``precision=`` conversion forgets the dtype of their layers.

    open_clip 3.3 converts ``text_projection`` of CLIP and TextTransformer but not that of CoCa's
    MultimodalTransformer, nor the learned ``query`` of an AttentionalPooler (CoCa's image tower), nor
    the ``cls_emb`` a CoCa text tower appends (``torch.cat`` then promotes the tokens to float32); their
    forwards then mix low-precision activations with float32 matrices (a dtype error). Each is matched
    to the dtype of the linear layers beside it; embeddings stay float32 as open_clip means.

    LayerNorms keep float32 weights too, and open_clip builds the towers' norms as ``LayerNormFp32``
    (input cast to float32) at low precision, but not an AttentionalPooler's ``ln_q``/``ln_k``: a plain
    LayerNorm given bf16/fp16 input and float32 weights works on the CPU and fails on CUDA ("expected
    scalar type BFloat16 but found Float"). Such norms become ``LayerNormFp32``.
    """
    from open_clip.transformer import (
        AttentionalPooler,
        LayerNorm,
        LayerNormFp32,
        MultimodalTransformer,
        TextTransformer,
    )

    forgotten = {AttentionalPooler: "query", MultimodalTransformer: "text_projection", TextTransformer: "cls_emb"}
    for m in model.modules():
        if type(m) in (LayerNorm, torch.nn.LayerNorm) and m.weight is not None and m.weight.dtype == torch.float32:
            m.__class__ = LayerNormFp32  # same parameters; normalises in float32 and casts back
            continue
        attr = forgotten.get(type(m))
        p = getattr(m, attr, None) if attr else None
        if isinstance(p, torch.nn.Parameter) and p.is_floating_point():
            want = input_dtype(m)
            if p.dtype != want:
                p.data = p.data.to(want)


def open_clip_preprocess_cfg(model: torch.nn.Module) -> dict[str, Any]:
    """The eval preprocessing open_clip attached to ``model`` (size, mean/std, interpolation, resize mode)."""
    import open_clip

    return dict(open_clip.get_model_preprocess_cfg(model))


# configs registered here with their capcurate keys (models/conv_stem.py), which open_clip never sees
_FULL_CONFIGS: dict[str, dict[str, Any]] = {}


def register_config(name: str, cfg: dict[str, Any]) -> str:
    """Register ``cfg`` with open_clip under ``name``, minus capcurate's own keys (kept for ``model_config``)."""
    import tempfile

    import open_clip

    from .conv_stem import split_config

    plain, _ = split_config(cfg)
    # open_clip registers files only; it reads them as they are added, so the copy need not outlive this
    with tempfile.TemporaryDirectory(prefix="capcurate-config-") as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(plain))
        open_clip.add_model_config(path)
    if plain != cfg:
        _FULL_CONFIGS[name] = json.loads(json.dumps(cfg))
    else:
        _FULL_CONFIGS.pop(name, None)
    return name


def register_config_file(path: Path) -> str:
    """Register a model config .json with open_clip; returns the name it is known by (the file's stem)."""
    import open_clip

    from .conv_stem import wants_conv_stem

    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read model config {path}: {e}") from None
    if wants_conv_stem(cfg):
        return register_config(Path(path).stem, cfg)
    open_clip.add_model_config(path)  # a plain open_clip config: registered as it is
    _FULL_CONFIGS.pop(Path(path).stem, None)
    return Path(path).stem


def model_config(model_name: str) -> dict[str, Any]:
    import open_clip

    if model_name.startswith("local-dir:"):
        cfg = json.loads((Path(model_name[len("local-dir:"):]) / OPENCLIP_CONFIG).read_text())
        return cfg["model_cfg"]
    if model_name in _FULL_CONFIGS:
        return _FULL_CONFIGS[model_name]
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ModelLoadError(
            f"unknown open_clip architecture {model_name!r}; see open_clip.list_models() or pass a config .json"
        )
    return cfg


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """``--pretrained random:SEED``: the same random weights on every run, without touching the caller's
    random state (only the CPU generator draws them: open_clip builds on the CPU, then moves the model)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_openclip(ref: ModelRef, *, device: str | torch.device = "cpu", precision: str = "fp32") -> OpenClipBundle:
    """Load an open_clip model in eval mode with its transforms and tokenizer."""
    import open_clip

    if ref.kind != "openclip":
        raise ModelLoadError(f"{ref.text} is not an open_clip reference")
    name = ref.name
    if name.endswith(".json"):
        name = register_config_file(Path(name))
    cfg = model_config(name)
    seed = random_seed(check_weights(ref).pretrained)
    pretrained = None if seed is not None else ref.pretrained
    from .conv_stem import wants_conv_stem

    if wants_conv_stem(cfg):
        return _load_with_conv_stem(ref, name, cfg, device, precision)
    try:
        with _seeded(seed):
            model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, precision=precision,
                load_weights=True,
            )
            if seed is not None:
                init_coca_decoder(model)  # open_clip leaves a random CoCa's decoder projection uninitialised
        tokenizer = open_clip.get_tokenizer(name)
    except RuntimeError as e:
        raise ModelLoadError(f"cannot load {ref.text}: {str(e).splitlines()[0]}") from None
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = " (offline: no weights can be downloaded; pass a local file with --pretrained)" \
            if "offline" in msg.lower() or "connect" in msg.lower() or "hub" in msg.lower() else ""
        raise ModelLoadError(f"cannot load {ref.text}: {msg}{hint}") from None
    if precision in ("bf16", "fp16", "pure_bf16", "pure_fp16"):
        align_low_precision(model)
    model.eval()
    return OpenClipBundle(model, preprocess, preprocess_train, tokenizer, name, cfg)


def _load_with_conv_stem(ref: ModelRef, name: str, cfg: dict[str, Any], device: str | torch.device,
                         precision: str) -> OpenClipBundle:
    """open_clip cannot build a conv-stem model from its config: build the plain one, swap the stem in,
    then load the weights and convert the precision as open_clip's ``create_model`` would."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from .conv_stem import apply_conv_stem

    seed = random_seed(ref.pretrained)
    weights: str | None = None if seed is not None else ref.pretrained
    preprocess_cfg: dict[str, Any] = {}
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        meta = json.loads((folder / OPENCLIP_CONFIG).read_text())
        preprocess_cfg = meta.get("preprocess_cfg") or {}
        cfg = json.loads(json.dumps(cfg))
        if (folder / "tokenizer.json").is_file():  # the folder's own tokenizer, wherever the run moved
            cfg.setdefault("text_cfg", {})["hf_tokenizer_name"] = str(folder.resolve())
        name = register_config(f"capcurate-local-{abs(hash(str(folder.resolve()))):x}", cfg)
        weights = str(folder / "open_clip_model.safetensors")
    if weights is not None and not Path(weights).is_file():
        raise ModelLoadError(f"cannot load {ref.text}: a conv-stem model loads from a weights file, not {weights!r}")
    try:
        with _seeded(seed):
            model = open_clip.create_model(name, pretrained=None, precision="fp32", device="cpu")
            apply_conv_stem(model)
            if seed is not None:
                init_coca_decoder(model)
        if weights is not None:
            open_clip.load_checkpoint(model, weights)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load {ref.text}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if precision in ("bf16", "fp16"):
        open_clip.model.convert_weights_to_lp(model, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        align_low_precision(model)
    elif precision in ("pure_bf16", "pure_fp16"):
        model.to(torch.bfloat16 if precision == "pure_bf16" else torch.float16)
    model.to(device).eval()
    if preprocess_cfg:
        open_clip.set_model_preprocess_cfg(model, {**open_clip.get_model_preprocess_cfg(model), **preprocess_cfg})
    pp = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
    return OpenClipBundle(model, image_transform_v2(pp, is_train=False), image_transform_v2(pp, is_train=True),
                          tokenizer, name, cfg)


def export_openclip_dir(model: torch.nn.Module, model_cfg: dict[str, Any], out_dir: Any,
                        *, preprocess_cfg: dict[str, Any] | None = None,
                        tokenizer_dir: str | Path | None = None) -> Any:
    """Write ``out_dir`` (a local folder or a URL) in open_clip's local-dir layout so any open_clip user can
    load it. Each file is committed whole (rename, or one upload on a store); the config comes last."""
    import shutil

    from safetensors.torch import save_file

    from .. import storage

    out = storage.path(out_dir)
    remote = storage.is_remote(out)
    storage.ensure_dir(out)
    cfg = json.loads(json.dumps(model_cfg))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name != OPENCLIP_CONFIG:
                if remote:
                    storage.upload(f, out / f.name)
                else:
                    shutil.copy2(f, out / f.name)
        # absolute: open_clip's add_model_config + get_tokenizer(name) reads this path as is, so a path
        # relative to where training ran would break loading from any other directory
        # (``local-dir:`` loading ignores it and uses the folder itself, so a moved run still loads; a
        # folder in a bucket is loaded from its download, by ``local-dir:``)
        cfg.setdefault("text_cfg", {})["hf_tokenizer_name"] = str(out) if remote else str(out.resolve())
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic.atomic_path(out / "open_clip_model.safetensors") as tmp:
        save_file(state, str(tmp))
    atomic.write_json(out / OPENCLIP_CONFIG, {"model_cfg": cfg, "preprocess_cfg": preprocess_cfg or {}})
    return out


def init_coca_decoder(model: torch.nn.Module) -> bool:
    """Initialise a random CoCa's multimodal decoder the way open_clip intends; True if it had one.

    open_clip 3.3's MultimodalTransformer allocates ``text_projection`` with ``torch.empty`` and its own
    ``init_parameters()`` is never called (and fails: it refers to a ``.transformer`` it does not have),
    so a freshly created CoCa starts from uninitialised memory and can give NaN logits.
    """
    dec = getattr(model, "text_decoder", None)
    if dec is None or not hasattr(dec, "cross_attn"):
        return False
    width, layers = dec.width, dec.layers
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
    with torch.no_grad():
        for block in [*dec.resblocks, *dec.cross_attn]:
            torch.nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            torch.nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            torch.nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if dec.text_projection is not None:
            torch.nn.init.normal_(dec.text_projection, std=width ** -0.5)
    return True

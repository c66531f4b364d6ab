"""CLIP in the federation: what the CLIP methods share (algorithms/clip_zeroshot.py,
clip_linear.py, fedclip.py, facmic.py, fedmedclip.py, and models.py's `--model clip:NAME`).

1. Loading (`resolve_model`, `resolve_weights`, `ClipBackbone`). `--clip-model` is any
   open_clip model name (default ViT-B-32), a name registered with
   `open_clip.add_model_config`, or the path of a .json model config (open_clip's format,
   or an open_clip_config.json with a `model_cfg`). `--pretrained` is an open_clip tag
   (`openai`, `laion2b_s34b_b79k`, ...), a local checkpoint (.pt/.pth/.bin/.safetensors),
   `local-dir:PATH` (a folder holding one, as open_clip writes them), or `none` (random
   initialisation from the run seed, only when asked for). A tag is looked up in the local
   caches first (Hugging Face hub cache, ~/.cache/clip); where its weights are not on this
   machine and cannot be downloaded the run stops with a one-line error that names the tag
   and says how to pass a local file. A named tag never falls back to random weights.
   OpenAI weights run with QuickGELU as open_clip runs them (the rule: `resolve_weights`);
   a local folder's preprocess mean/std are used; `hf-hub:` names are refused in one line.
2. Class prompts (`prompt_class_names`, `ClipBackbone.text_features`): T_c =
   normalise(mean_t normalise(CLIP_text(template_t.format(name_c)))), default template
   "a picture of a {}" (the public codes' of FedCLIP and FedMedCLIP; the article agrees
   with the name, `fill_prompt`: "a picture of an actinic keratosis"), with readable
   clinical names for the ISIC/HAM classes and readable folder names for imagefolder;
   class names that are mere numbers (medmnist) are refused unless `--class-names` gives
   them.
3. The frozen-feature cache (`FeatureStore`, `ClipBackbone.image_features`): image
   features I = CLIP_img(preprocess(x)) are computed once per (image content, model
   config, weights, preprocessing, torch/open_clip versions, device type), with a progress
   bar, and stored on disk under the data cache folder (`--feature-cache auto`: beside
   the decoded-image cache, else $FEDMED_CACHE or ~/.cache/fedmed) as shards written
   atomically (tmp file + os.replace). Every round, every CLIP algorithm and every later
   run reads them back; the CLIP towers are then never run again (with text features also
   cached, a warm run does not even build the CLIP model).
4. What every adapter method computes: I~ = normalise(a * I) (`adapt`) and the symmetric
   image-text contrastive loss. Each method's own modules live in its file (FedCLIP's
   attention adapter in algorithms/fedclip.py, FACMIC's feature-attention module and LMMD
   in algorithms/facmic.py, FedMedCLIP's masked layers and fp16 + zlib packing in
   algorithms/fedmedclip.py), so one file can be copied with its method.
5. `ClipMethod`: the Algorithm base of the CLIP methods (features in `setup`, `batch`
   returns cached features, zero-shot head, paper optimiser with per-round LR decay).

Specification: ../shared/methods/fedmedclip.md. Equations are numbered there by section.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fedmed
from fedmed import Algorithm, UsageError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_FORMAT = 3                    # 3: images encoded in fixed blocks of ENCODE_BLOCK (encode_images)
ENCODE_BLOCK = 16                   # images in every forward pass of the image tower (padded)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def flag(default, help: str):
    """A dataclass field whose help text run.py shows in --help."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class ClipArgs:
    """Flags shared by every CLIP method (same names, types and meanings everywhere)."""
    clip_model: str = flag("ViT-B-32", "open_clip model name, or the path of a .json "
                           "open_clip model config")
    pretrained: str = flag("openai", "open_clip tag (e.g. openai), a local checkpoint "
                           ".pt/.bin/.safetensors (OpenAI's as a plain state dict: use "
                           "--clip-model NAME-quickgelu), local-dir:PATH, or none (random weights)")
    prompts: str = flag("a picture of a {}", "class-prompt template(s), '|'-separated; {} is "
                        "the class name")
    class_names: str = flag("", "comma-separated readable class names for the prompts, in "
                            "label order (default: the dataset's, made readable)")
    logit_scale: float = flag(100.0, "s: scale of the CLIP cosine logits (exp of OpenAI "
                              "CLIP's logit_scale)")
    clip_preprocess: str = flag("clip", "clip (the weights' mean/std) | imagenet (FedMedCLIP "
                                "public code)")
    feature_cache: str = flag("auto", "folder of the frozen CLIP feature cache; auto: beside "
                              "the image cache ($FEDMED_CACHE or ~/.cache/fedmed); none: memory only")
    feature_batch_size: int = flag(64, "images per forward pass when extracting CLIP features")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- 1. loading

@dataclass
class ModelSpec:
    name: str                       # the name open_clip knows it by (after registration)
    config: dict                    # embed_dim, vision_cfg, text_cfg, ...
    path: str | None = None         # the .json it came from, if any

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def image_size(self) -> int:
        s = self.config["vision_cfg"].get("image_size", 224)
        if isinstance(s, (list, tuple)):
            if len(set(s)) != 1:
                raise UsageError(f"--clip-model {self.name}: image_size {list(s)} is not square; "
                                 "FedMed drives towers with square inputs only")
            s = s[0]
        return int(s)


def _open_clip_dir() -> Path | None:
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
    return Path(list(spec.submodule_search_locations)[0]) if spec else None


def _read_json(path: Path, flag: str) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {path}: cannot be read as JSON ({type(e).__name__}); give an "
                         "open_clip model config (.json with embed_dim, vision_cfg, text_cfg)")
    cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UsageError(f"{flag} {path}: not an open_clip model config (needs embed_dim, "
                         "vision_cfg and text_cfg)")
    return cfg


def resolve_model(name: str) -> ModelSpec:
    """The architecture named by --clip-model, without building it (importing open_clip
    only when the name is neither a .json file nor one of its shipped configs). An
    `hf-hub:` name is refused in one line: FedMed never fetches a model from the hub (open_clip
    would try the network and fail in a long traceback offline); its folder is given instead."""
    if name.startswith("hf-hub:"):
        raise UsageError(f"--clip-model {name}: models are not fetched from the Hugging Face hub; "
                         "download that repo's folder where there is network and pass --clip-model "
                         "FOLDER/open_clip_config.json --pretrained local-dir:FOLDER")
    if name.endswith(".json"):
        p = Path(name).expanduser()
        if not p.is_file():
            raise UsageError(f"--clip-model {name}: no such file; give an open_clip model "
                             "name (e.g. ViT-B-32) or the path of a .json model config")
        name = p.resolve().parent.name if p.name == "open_clip_config.json" else p.stem
        return ModelSpec(name, _read_json(p, "--clip-model"), str(p.resolve()))
    if "open_clip" in sys.modules:                       # configs registered at run time
        cfg = sys.modules["open_clip"].get_model_config(name)
        if cfg is not None:
            return ModelSpec(name, cfg)
    d = _open_clip_dir()
    if d is not None and (d / "model_configs" / f"{name}.json").is_file():
        return ModelSpec(name, _read_json(d / "model_configs" / f"{name}.json", "--clip-model"))
    import open_clip
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        known = open_clip.list_models()
        near = [m for m in known if m.lower().startswith(name.lower()[:5])][:5] or known[:5]
        raise UsageError(f"--clip-model {name!r} is not an open_clip model (e.g. "
                         f"{', '.join(near)}); give one of open_clip.list_models() or a .json config")
    return ModelSpec(name, cfg)


def _register(spec: ModelSpec):
    """Make open_clip know `spec.name` (a .json config is added to its registry)."""
    import open_clip
    if spec.path is not None:
        known = open_clip.get_model_config(spec.name)
        if known is None:
            path = Path(spec.path)
            with open(path) as f:
                nested = "model_cfg" in json.load(f)
            if nested:                                   # open_clip_config.json: open_clip's
                import tempfile                          # registry reads flat configs only
                path = Path(tempfile.mkdtemp(prefix="fedmed-clip-cfg-")) / f"{spec.name}.json"
                path.write_text(json.dumps(spec.config))
            open_clip.add_model_config(path)
        elif known != spec.config:
            raise UsageError(f"--clip-model {spec.path}: another model config is already named "
                             f"{spec.name!r}; rename the file")
    return open_clip


@dataclass
class WeightsSpec:
    kind: str                        # none | file | tag
    path: str | None                 # checkpoint file to load
    identity: str                    # what the feature cache key records
    tag: str | None = None
    quick_gelu: bool = False
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD


def _file_identity(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive, the format of OpenAI's `clip.load` files (~/.cache/clip/
    ViT-B-32.pt): a zip whose top folder holds constants.pkl (a torch.save state dict
    never does)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _dir_config(d: Path, pretrained: str) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) of a local folder's open_clip_config.json."""
    f = d / "open_clip_config.json"
    raw = {}
    try:
        with open(f) as fh:
            raw = json.load(fh)
    except (OSError, ValueError):
        pass                                               # _read_json reports it
    pre = raw.get("preprocess_cfg", {}) if isinstance(raw, dict) else {}
    if not isinstance(pre, dict) or any(
            k in pre and not (isinstance(pre[k], (list, tuple)) and len(pre[k]) == 3
                              and all(isinstance(v, (int, float)) and v == v for v in pre[k])
                              and (k == "mean" or all(v > 0 for v in pre[k])))
            for k in ("mean", "std")):
        raise UsageError(f"--pretrained {pretrained}: the preprocess_cfg of {f} needs mean and std "
                         "as three numbers each (std > 0); fix the file or remove preprocess_cfg")
    return _read_json(f, "--pretrained"), pre


def _find_in_dir(d: Path) -> str | None:
    pref = ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
            "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
            "pytorch_model.bin", "pytorch_model.pth", "model.pth"]
    for n in pref:
        if (d / n).is_file():
            return str(d / n)
    files = sorted(p for p in d.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    return str(files[0]) if files else None


def _tag_local_file(pcfg: dict) -> str | None:
    """The checkpoint of a tag (its open_clip pretrained config `pcfg`) if it is already on this machine (no network access)."""
    if pcfg.get("file") and os.path.isfile(pcfg["file"]):
        return pcfg["file"]
    hub = pcfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            hf_hub_download = None
        if hf_hub_download is not None:
            repo, filename = os.path.split(hub)
            names = [filename] if filename else ["open_clip_model.safetensors",
                                                  "open_clip_pytorch_model.bin"]
            if filename.endswith((".bin", ".pth")):
                names.insert(0, filename[:-4] + ".safetensors")
            for n in names:
                try:
                    return hf_hub_download(repo, n, local_files_only=True)
                except Exception:  # noqa: BLE001 - not in the local cache
                    pass
    url = pcfg.get("url", "")
    if url:
        p = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(p):
            return p
    return None


def _online(host: str = "huggingface.co") -> bool:
    import socket
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _arch(cfg: dict) -> dict:
    """A model config without its activation choice, which comes with the weights."""
    return {k: v for k, v in cfg.items() if k != "quick_gelu"}


def resolve_weights(spec: ModelSpec, pretrained: str, seed: int) -> WeightsSpec:
    """What --pretrained names, checked now (run.py calls it before any image is touched):
    a tag's file is found locally (or downloaded when online); a checkpoint file is read
    and must fit `spec` (on the meta device: no weights are materialised, no model built).

    QuickGELU (OpenAI's CLIP activation; open_clip runs OpenAI weights with it): on when
    the model config says so (`--clip-model ViT-B-32-quickgelu`), when the tag says so
    (`openai`), when a local-dir's open_clip_config.json says so, or when the file is a
    TorchScript archive (only OpenAI's `clip.load` writes CLIP in that format). A plain
    state-dict file says nothing about its activation: it runs as --clip-model says, so
    OpenAI weights saved as a state dict need --clip-model NAME-quickgelu."""
    p = (pretrained or "").strip()
    if p.lower() == "none":
        return WeightsSpec("none", None, f"random-init:seed={seed}")
    if p.startswith("local-dir:"):
        d = Path(p[len("local-dir:"):]).expanduser()
        if not d.is_dir():
            raise UsageError(f"--pretrained {p}: {d} is not a folder; give local-dir:FOLDER "
                             "holding an open_clip checkpoint, or a checkpoint file")
        quick_gelu, pre = False, {}
        if (d / "open_clip_config.json").is_file():
            cfg, pre = _dir_config(d, p)
            if _arch(cfg) != _arch(spec.config):
                raise UsageError(f"--pretrained {p}: its open_clip_config.json describes another "
                                 f"architecture than --clip-model {spec.name}; pass --clip-model "
                                 f"{d / 'open_clip_config.json'}")
            quick_gelu = bool(cfg.get("quick_gelu", False))
        f = _find_in_dir(d)
        if f is None:
            raise UsageError(f"--pretrained {p}: no checkpoint (.safetensors/.bin/.pth/.pt) in "
                             f"{d}; put the weights file there or pass the file itself")
        return _file_weights(spec, f, quick_gelu, tuple(pre.get("mean", OPENAI_MEAN)),
                             tuple(pre.get("std", OPENAI_STD)))
    if os.path.isfile(p):
        return _file_weights(spec, p)
    if p.endswith(CHECKPOINT_SUFFIXES) or os.sep in p:
        raise UsageError(f"--pretrained {p}: no such file; give an existing checkpoint file, "
                         "local-dir:FOLDER, an open_clip tag, or none")
    import open_clip
    from open_clip import pretrained as ocp
    pcfg = ocp.get_pretrained_cfg(spec.name, p)
    if not pcfg:
        tags = ocp.list_pretrained_tags_by_model(spec.name)
        shown = ", ".join(tags[:6]) + (", ..." if len(tags) > 6 else "") if tags else "none"
        raise UsageError(f"--pretrained {p!r} is neither a file nor an open_clip tag of "
                         f"{spec.name} (its tags: {shown}); pass a local "
                         "checkpoint file, local-dir:FOLDER, or none for random weights")
    f = _tag_local_file(pcfg)
    if f is None and _online():
        try:
            f = ocp.download_pretrained(pcfg)
        except Exception:  # noqa: BLE001 - reported below as the one-line error
            f = None
    quick_gelu = bool(pcfg.get("quick_gelu", False))
    if not f:
        how = "--pretrained PATH"
        if quick_gelu and not spec.config.get("quick_gelu"):   # a state dict says nothing of it
            qg = f"{spec.name}-quickgelu"
            how = (f"--clip-model {qg} --pretrained PATH (these weights run with QuickGELU)"
                   if open_clip.get_model_config(qg) is not None else
                   "--pretrained local-dir:FOLDER whose open_clip_config.json has model_cfg "
                   "quick_gelu true (these weights run with QuickGELU)")
        raise UsageError(f"--pretrained {p}: the {spec.name} weights of tag '{p}' are not on this "
                         "machine and need a download, which failed (no network?); download them where "
                         f"there is one (open_clip.create_model('{spec.name}', pretrained='{p}')) "
                         f"and pass the checkpoint file with {how}")
    del open_clip
    return WeightsSpec("tag", f, f"tag:{p}:" + _file_identity(f), tag=p,
                       quick_gelu=quick_gelu or _is_torchscript(f),
                       mean=tuple(pcfg.get("mean", OPENAI_MEAN)), std=tuple(pcfg.get("std", OPENAI_STD)))


_CHECKED: set = set()                # (file identity, config, QuickGELU) that fit (this process)


def _file_weights(spec: ModelSpec, f: str, quick_gelu: bool = False, mean=OPENAI_MEAN,
                  std=OPENAI_STD) -> WeightsSpec:
    """A checkpoint file given by the user, read once and checked against `spec` on the meta
    device, so a junk file or another architecture stops the run before any image."""
    quick_gelu = quick_gelu or _is_torchscript(f) or bool(spec.config.get("quick_gelu", False))
    w = WeightsSpec("file", f, "file:" + _file_identity(f), quick_gelu=quick_gelu,
                    mean=tuple(mean), std=tuple(std))
    key = (w.identity, json.dumps(spec.config, sort_keys=True), quick_gelu)
    if key not in _CHECKED:
        with torch.device("meta"):
            shell = _create(spec, quick_gelu, device="meta")
        import warnings
        with warnings.catch_warnings():                  # torch: copying into a meta tensor is a
            warnings.filterwarnings("ignore", message=".*non-meta parameter.*")   # no-op (one line a tensor)
            load_weights(shell, f, spec)
        _CHECKED.add(key)
    return w


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _torchscript_state_dict(path: str, model: nn.Module) -> dict:
    """The tensors of a TorchScript CLIP (OpenAI's `clip.load` format: open_clip's key
    names), read with torch.jit.load, which runs no pickled Python. Its three size
    attributes and the model's non-persistent buffers (e.g. attn_mask) are not weights."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)         # "torch.jit.load is deprecated"
        sd = dict(torch.jit.load(path, map_location="cpu").state_dict())
    own = model.state_dict()
    buffers = {n for n, _ in model.named_buffers()}
    for k in list(sd):
        if k in ("input_resolution", "context_length", "vocab_size") or (
                k not in own and k in buffers):
            del sd[k]
    return sd


def load_weights(model: nn.Module, path: str, spec: ModelSpec, flag: str = "--pretrained") -> None:
    """Load a whole-CLIP checkpoint into `model`; a file of another architecture is a
    one-line UsageError that names the first mismatch."""
    from open_clip.factory import load_checkpoint, load_state_dict
    script = _is_torchscript(path)
    try:
        if script:                                   # torch.load(weights_only=True) refuses it
            sd = _torchscript_state_dict(path, model)
        else:
            sd = load_state_dict(path)               # torch.load(weights_only=True) or safetensors
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        why = ("an empty state dict" if isinstance(e, StopIteration)   # open_clip's reader on {}
               else _one_line(e))
        raise UsageError(f"{flag} {path}: cannot be read as a checkpoint ({why}); pass "
                         "a state dict saved with torch.save or safetensors")
    try:
        if script:
            with torch.no_grad():
                model.load_state_dict(sd, strict=True)
        else:
            load_checkpoint(model, path, strict=True)
    except Exception as e:  # noqa: BLE001
        own = model.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        wrong = sorted(k for k in set(own) & set(sd) if hasattr(sd[k], "shape")
                       and tuple(own[k].shape) != tuple(sd[k].shape))
        what = (f"shape mismatch at {wrong[0]}: file {tuple(sd[wrong[0]].shape)} vs model "
                f"{tuple(own[wrong[0]].shape)}" if wrong else
                f"missing {missing[:2]}" if missing else
                f"unexpected {unexpected[:2]}" if unexpected else _one_line(e))
        raise UsageError(f"{flag} {path}: does not fit --clip-model {spec.name} ({what}); pass a "
                         "checkpoint of this architecture or the matching --clip-model")


def _create(spec: ModelSpec, quick_gelu: bool, **kw) -> nn.Module:
    """open_clip.create_model(spec) without weights, its 'initialized randomly' warning
    hidden (the caller loads weights next, or wants random ones) and logging restored."""
    import logging
    open_clip = _register(spec)
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(spec.name, pretrained=None, force_quick_gelu=quick_gelu, **kw)
    finally:
        logging.disable(logging.NOTSET)


def build_clip(spec: ModelSpec, weights: WeightsSpec, seed: int) -> nn.Module:
    """The open_clip model, frozen, in eval mode, on the CPU. Random initialisation is
    drawn from the (seed, "clip-init") stream, so `none` means the same weights for a seed."""
    with fedmed.seeded(seed, "clip-init"):
        model = _create(spec, weights.quick_gelu)
    if weights.path is not None:
        load_weights(model, weights.path, spec)
    model.eval().requires_grad_(False)
    return model


# ---------------------------------------------------------------- 2. class prompts

CLINICAL_NAMES = {"mel": "melanoma", "nv": "melanocytic nevus", "bcc": "basal cell carcinoma",
                  "ak": "actinic keratosis", "akiec": "actinic keratosis",
                  "bkl": "benign keratosis", "df": "dermatofibroma", "vasc": "vascular lesion",
                  "scc": "squamous cell carcinoma", "unk": "unknown lesion"}


def readable(name: str) -> str:
    """A folder or code name as words: 'glioma_tumor' -> 'glioma tumor', 'NoTumor' ->
    'no tumor', 'MEL' -> 'melanoma' (ISIC/HAM diagnosis codes)."""
    if name.lower() in CLINICAL_NAMES:
        return CLINICAL_NAMES[name.lower()]
    s = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    words = [w for w in re.split(r"[\s_\-.]+", s) if w]
    return " ".join(w if (w.isupper() and len(w) <= 5) else w.lower() for w in words)


def prompt_class_names(fed, class_names: str = "") -> list:
    """The readable name of each class for its prompt."""
    C = fed.num_classes
    if class_names.strip():
        names = [n.strip() for n in class_names.split(",")]
        if len(names) != C or not all(names):
            raise UsageError(f"--class-names gives {len(names)} name(s) for {C} classes "
                             f"({', '.join(map(str, fed.classes))}); give one per class, "
                             "comma-separated")
        return names
    if all(re.fullmatch(r"\s*\d+\s*", str(c)) for c in fed.classes):
        raise UsageError(f"--dataset {fed.name}: no class names for prompts (its classes are the "
                         f"numbers {', '.join(map(str, fed.classes[:4]))}{', ...' if C > 4 else ''}); "
                         "pass --class-names with one readable name per class in label order")
    return [readable(str(c)) for c in fed.classes]


def prompt_templates(prompts: str) -> list:
    t = [p.strip() for p in prompts.split("|") if p.strip()]
    if not t or not all("{}" in p for p in t):
        raise UsageError(f"--prompts {prompts!r}: every template needs {{}} where the class name "
                         "goes, e.g. 'a picture of a {}'")
    return t


def fill_prompt(template: str, name: str) -> str:
    """template.format(name) with an English indefinite article that agrees with the name:
    "a picture of a {}" gives "a picture of an actinic keratosis" and "a picture of a
    melanoma" (by the name's first letter: a, e, i, o, u take "an"). The public codes
    write "a" before every class name; CLIP reads the text, so the grammar is fixed here."""
    an = name[:1].lower() in ("a", "e", "i", "o", "u")
    fixed = re.sub(r"\b([Aa])n? \{\}", lambda m: m.group(1) + ("n {}" if an else " {}"), template)
    return fixed.format(name)


# ---------------------------------------------------------------- 3. the feature cache

def default_cache_root(fed) -> str:
    """Beside the decoded-image cache when there is one, else $FEDMED_CACHE or
    ~/.cache/fedmed (datasets.default_cache_dir)."""
    img = (fed.info or {}).get("image_cache")
    if img:
        return os.path.dirname(img)
    import datasets
    return datasets.default_cache_dir()


def image_hashes(x: torch.Tensor) -> list:
    """A 16-byte BLAKE2b digest of each image's pixels (and shape)."""
    out = []
    for a in x.numpy():
        h = hashlib.blake2b(digest_size=16, person=b"fedmed-img")
        h.update(np.array(a.shape, np.int64).tobytes())
        h.update(a.tobytes())
        out.append(h.digest())
    return out


class FeatureStore:
    """Features by image digest for one (model, weights, preprocessing) key: a folder of
    shards part-*.npz {h: uint8 [n, 16], f: float32 [n, d]}, each written to a temporary
    file and renamed into place, so readers never see half a file and concurrent runs
    only ever add shards. `root` None keeps nothing on disk."""

    MAX_SHARDS = 16

    def __init__(self, root: str | None, key: dict, label: str):
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.dir = (os.path.join(root, "clip-features", f"{label}-{digest[:20]}")
                    if root else None)

    def _shards(self) -> list:
        if self.dir is None or not os.path.isdir(self.dir):
            return []
        return sorted(os.path.join(self.dir, n) for n in os.listdir(self.dir)
                      if n.startswith("part-") and n.endswith(".npz"))

    def load(self) -> tuple[dict, np.ndarray | None]:
        """({digest: row}, features [n, d]) of everything stored."""
        hs, fs = [], []
        for p in self._shards():
            try:
                with np.load(p, allow_pickle=False) as z:
                    h, f = z["h"], z["f"]
                if h.ndim != 2 or h.shape[1] != 16 or f.ndim != 2 or len(f) != len(h):
                    raise ValueError("h and f do not match")
                hs.append(h)
                fs.append(f)
            except FileNotFoundError:                         # merged away meanwhile
                pass
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                # damaged (truncated, bad CRC): a cache miss; removed so that it is rebuilt
                log(f"clip features: removing unreadable shard {p} ({type(e).__name__}); "
                    "its features are computed again")
                try:
                    os.remove(p)
                except OSError:
                    pass
        if not hs:
            return {}, None
        h = np.concatenate(hs)
        index = {bytes(r): i for i, r in enumerate(h)}
        return index, np.concatenate(fs)

    def add(self, h: np.ndarray, f: np.ndarray) -> None:
        if self.dir is None or not len(h):
            return
        try:
            os.makedirs(self.dir, exist_ok=True)
            meta = os.path.join(self.dir, "key.json")
            if not os.path.exists(meta):
                fedmed.atomic_write(meta, json.dumps(self.key, indent=1, sort_keys=True))
            name = os.path.join(self.dir, f"part-{time.strftime('%Y%m%d%H%M%S')}-"
                                          f"{uuid.uuid4().hex[:8]}.npz")
            buf = io.BytesIO()
            np.savez(buf, h=h.astype(np.uint8), f=f.astype(np.float32))
            fedmed.atomic_write(name, buf.getvalue())
        except OSError as e:
            raise UsageError(f"--feature-cache {os.path.dirname(os.path.dirname(self.dir))}: cannot "
                             f"write the CLIP feature cache there ({_one_line(e)}); give a writable "
                             "folder or --feature-cache none")
        self._compact()

    def _compact(self) -> None:
        """Merge the shards into one when there are many (a reader that loses a shard it
        was about to open just recomputes those features)."""
        shards = self._shards()
        if len(shards) <= self.MAX_SHARDS:
            return
        index, f = self.load()
        if f is None:
            return
        h = np.frombuffer(b"".join(index), np.uint8).reshape(-1, 16)
        rows = np.fromiter(index.values(), np.int64, len(index))
        buf = io.BytesIO()
        np.savez(buf, h=h, f=f[rows])
        fedmed.atomic_write(os.path.join(self.dir, f"part-{time.strftime('%Y%m%d%H%M%S')}-"
                                         f"merged-{uuid.uuid4().hex[:8]}.npz"), buf.getvalue())
        for p in shards:
            try:
                os.remove(p)
            except OSError:
                pass

    def text_path(self, key: str) -> str | None:
        if self.dir is None:
            return None
        return os.path.join(self.dir, f"text-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy")


class ClipBackbone:
    """The frozen CLIP towers, built only when a feature is missing from the cache."""

    def __init__(self, args: ClipArgs, seed: int, device: torch.device, cache_root: str | None):
        self.args, self.seed, self.device = args, seed, device
        self.spec = resolve_model(args.clip_model)
        self.weights = resolve_weights(self.spec, args.pretrained, seed)
        if args.clip_preprocess not in ("clip", "imagenet"):
            raise UsageError(f"--clip-preprocess {args.clip_preprocess!r} is unknown; use clip "
                             "or imagenet")
        if args.feature_batch_size < 1:
            raise UsageError(f"--feature-batch-size must be >= 1 (got {args.feature_batch_size})")
        mean, std = ((self.weights.mean, self.weights.std) if args.clip_preprocess == "clip"
                     else (IMAGENET_MEAN, IMAGENET_STD))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        S = self.spec.image_size
        self.preprocess_name = (f"uint8/255;bicubic-antialias-to-{S}-if-needed;clamp01;"
                                f"mean={[round(m, 8) for m in mean]};std={[round(s, 8) for s in std]}")
        from importlib import metadata
        try:
            oc_version = metadata.version("open_clip_torch")
        except metadata.PackageNotFoundError:
            oc_version = None
        key = {"format": CACHE_FORMAT, "model": self.spec.name, "model_config": self.spec.config,
               "weights": self.weights.identity, "quick_gelu": self.weights.quick_gelu,
               "preprocess": self.preprocess_name, "torch": torch.__version__,
               "open_clip": oc_version, "device": device.type}
        label = re.sub(r"[^A-Za-z0-9.]+", "-",
                       f"{self.spec.name}-{self.weights.tag or self.weights.kind}")
        self.store = FeatureStore(cache_root, key, label)
        self._model = None
        self.stats = {"model": self.spec.name, "weights": self.weights.identity,
                      "preprocess": self.preprocess_name, "cache": self.store.dir}

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            t0 = time.perf_counter()
            self._model = build_clip(self.spec, self.weights, self.seed).to(self.device)
            self.stats["build_seconds"] = time.perf_counter() - t0
        return self._model

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> the model's normalised float input."""
        x = x.to(self.device).float().div_(255)
        S = self.spec.image_size
        if x.shape[-1] != S or x.shape[-2] != S:
            x = F.interpolate(x, size=(S, S), mode="bicubic", antialias=True,
                              align_corners=False).clamp_(0, 1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) CLIP image embeddings I of uint8 images, in fp32. Every
        forward pass of the image tower encodes exactly ENCODE_BLOCK images (the last
        block padded with copies of its last image), so every matrix product has the same
        shape whatever the caller's batch: the CPU kernels pick their path by shape (a
        lone image, or a batch of 7, took another path than a batch of 8 or more and gave
        bits up to 6e-7 apart on AVX-512), and with one shape the cached features are the
        bits of encoding any training batch on the fly. What remains is an assumption no
        BLAS promises: that a row of a product of fixed shape gets the same bits at any
        position (it does on the CPUs measured, 1 and 2 threads); the cache test states a
        float-rounding tolerance for on-the-fly encoding instead of relying on it."""
        P, n = ENCODE_BLOCK, len(x)
        out = []
        for s in range(0, n, P):
            blk = x[s:s + P]
            k = len(blk)
            if k < P:
                blk = torch.cat([blk, blk[-1:].expand(P - k, *blk.shape[1:])])
            out.append(self.model.encode_image(self.preprocess(blk)).float()[:k])
        if not out:
            return torch.zeros(0, self.spec.embed_dim, device=self.device)
        return torch.cat(out)

    def image_features(self, x: torch.Tensor, progress: bool = True) -> torch.Tensor:
        """I for every image of x (uint8 [N, 3, H, W]), from the cache where it has them;
        `progress` False: no progress bar (--quiet)."""
        t0 = time.perf_counter()
        digests = image_hashes(x)
        index, stored = self.store.load()
        d = self.spec.embed_dim
        out = torch.empty(len(digests), d, dtype=torch.float32)
        todo, first = [], {}
        for i, h in enumerate(digests):
            j = index.get(h)
            if j is not None and stored.shape[1] == d:
                out[i] = torch.from_numpy(stored[j])
            elif h in first:
                continue                                  # same pixels as an earlier row
            else:
                first[h] = i
                todo.append(i)
        computed_seconds = 0.0
        if todo:
            self.model                                    # built (and timed) apart
            t1 = time.perf_counter()
            where = self.store.dir or "memory only (--feature-cache none)"
            log(f"clip features: computing {len(todo):,} of {len(digests):,} images with "
                f"{self.spec.name} ({self.weights.identity.split(':')[0]} weights) into {where}")
            bar = fedmed.Progress(len(todo), enabled=progress, what="images",
                                  every=10.0)                   # a line per 10 s off a tty
            B, chunk_h, chunk_f = self.args.feature_batch_size, [], []
            last_flush = time.perf_counter()
            try:
                for s in range(0, len(todo), B):
                    rows = torch.as_tensor(todo[s:s + B])
                    f = self.encode_images(x[rows]).cpu()
                    out[rows] = f
                    chunk_h += [digests[i] for i in todo[s:s + B]]
                    chunk_f.append(f.numpy())
                    bar.update(len(rows))
                    if time.perf_counter() - last_flush > 60:     # keep progress if killed
                        self.store.add(np.frombuffer(b"".join(chunk_h), np.uint8).reshape(-1, 16),
                                       np.concatenate(chunk_f))
                        chunk_h, chunk_f, last_flush = [], [], time.perf_counter()
            finally:
                if chunk_h:
                    self.store.add(np.frombuffer(b"".join(chunk_h), np.uint8).reshape(-1, 16),
                                   np.concatenate(chunk_f)[:len(chunk_h)])
            for i, h in enumerate(digests):                      # duplicates of computed rows
                if h in first and i != first[h]:
                    out[i] = out[first[h]]
            computed_seconds = time.perf_counter() - t1
            log(f"clip features: computed {len(todo):,} images in {computed_seconds:.1f}s "
                f"({len(todo) / max(computed_seconds, 1e-9):.1f} images/s)")
        self.stats.update(images=len(digests), computed=len(todo), extract_seconds=computed_seconds,
                          feature_seconds=time.perf_counter() - t0)
        return out

    def text_features(self, names: list, templates: list) -> torch.Tensor:
        """T [C, d]: the L2-normalised mean over templates of the L2-normalised text
        embeddings of each class's prompts (cached beside the image features)."""
        prompts = [[fill_prompt(t, n) for t in templates] for n in names]
        key = json.dumps({"prompts": prompts})
        path = self.store.text_path(key)
        if path and os.path.isfile(path):
            try:
                t = np.load(path, allow_pickle=False)
                if t.shape == (len(names), self.spec.embed_dim):
                    return torch.from_numpy(t)
            except (OSError, ValueError):
                pass
        import open_clip
        tok = open_clip.get_tokenizer(self.spec.name)
        with torch.no_grad():
            rows = []
            for texts in prompts:
                e = self.model.encode_text(tok(texts).to(self.device)).float()
                e = F.normalize(e, dim=-1).mean(0)
                rows.append(F.normalize(e, dim=0).cpu())
            T = torch.stack(rows)
        if path:
            buf = io.BytesIO()
            np.save(buf, T.numpy())
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fedmed.atomic_write(path, buf.getvalue())
            except OSError:
                pass
        return T


# ---------------------------------------------------------------- 4. shared pieces of the losses

def adapt(attention: torch.Tensor, I: torch.Tensor) -> torch.Tensor:
    """I~ = normalise(a * I) (sheet §3: the FAM reweights the image embedding)."""
    return F.normalize(attention * I, dim=-1)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, s: float) -> torch.Tensor:
    """Sheet §4: L_contr = 1/2 [CE(s I~ T_y^T, [1..B]) + CE(s T_y I~^T, [1..B])], for
    L2-normalised img, txt [B, d]; same-class pairs in a batch are negatives."""
    logits = s * img @ txt.t()
    gt = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, gt) + F.cross_entropy(logits.t(), gt)) / 2


# ---------------------------------------------------------------- the models.py entry

class ClipImageClassifier(nn.Module):
    """An open_clip image tower and a linear head on its embedding: the model of FedAvg
    on the full CLIP image encoder (`--model clip:NAME`). Inputs of another size are
    resized (bicubic) to the tower's input size."""

    def __init__(self, visual: nn.Module, embed_dim: int, num_classes: int, image_size: int):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(embed_dim, num_classes)
        self.image_size = image_size

    def forward(self, x):
        S = self.image_size
        if x.shape[-1] != S or x.shape[-2] != S:
            x = F.interpolate(x, size=(S, S), mode="bicubic", align_corners=False)
        return self.head(self.visual(x))


def image_classifier(model_name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """`--model clip:NAME`: the trainable CLIP image encoder of NAME (random weights, or a
    whole-CLIP checkpoint given with --weights) with a linear head."""
    spec = resolve_model(model_name)
    model = _create(spec, bool(weights and _is_torchscript(weights)))   # OpenAI's clip.load format
    if weights:
        if not os.path.isfile(weights):
            raise UsageError(f"--weights {weights}: no such file; pass a whole-CLIP checkpoint "
                             f"of {spec.name} or leave --weights out")
        load_weights(model, weights, spec, flag="--weights")
    return ClipImageClassifier(model.visual, spec.embed_dim, num_classes, spec.image_size)


# ---------------------------------------------------------------- 5. the CLIP algorithm base

@contextlib.contextmanager
def one_thread():
    """Adapters train on [B, d] tensors: on a CPU, intra-op threads only add
    synchronisation (and stall badly when the cores are shared: averaging five 512x512
    tensors took 120 ms on two busy cores against 3 ms on one), so the adapter work (the
    hooks of the round) runs on one thread; the caller's setting is restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def on_one_thread(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        with one_thread():
            return fn(*a, **k)
    return wrapper


class ClipMethod(Algorithm):
    """The base of the CLIP methods. Both CLIP towers are frozen, so their outputs are
    computed once (`setup`, through the feature cache) and training runs on them:
    `batch` returns the cached image features I [B, d] and the labels."""
    Args = ClipArgs
    # the paper's training recipe, applied by run.py to the flags the user leaves unset
    recipe: dict = {}

    @classmethod
    def default_image_size(cls, args) -> int:
        """Images are decoded at the CLIP model's input resolution (224 for ViT-B-32)."""
        return resolve_model((args or ClipArgs()).clip_model).image_size

    def __init__(self, cfg, args, fed):
        args = args if args is not None else self.Args()
        if fed.y.ndim != 1:
            raise UsageError(f"--algo {getattr(self, 'name', 'clip')}: CLIP class prompts need "
                             "single-label data; this dataset is multi-label")
        self.class_names = prompt_class_names(fed, args.class_names)
        self.templates = prompt_templates(args.prompts)
        root = (None if args.feature_cache.lower() == "none" else
                default_cache_root(fed) if args.feature_cache == "auto" else args.feature_cache)
        self.backbone = ClipBackbone(args, cfg.seed, torch.device(cfg.device), root)
        self.d = self.backbone.spec.embed_dim
        super().__init__(cfg, args, fed)
        self.features = None
        self.text = None
        self.info = {"clip": self.backbone.stats, "class_prompts":
                     [fill_prompt(self.templates[0], n) for n in self.class_names]}

    def setup(self, server, clients):
        with one_thread():                        # copies of the initial adapter state
            super().setup(server, clients)
        if self.features is None:                 # the CLIP towers: every thread
            self.features = self.backbone.image_features(self.fed.x, progress=not self.quiet
                                                         ).to(self.device)
            self.text = self.backbone.text_features(self.class_names, self.templates).to(self.device)

    @on_one_thread
    def train(self, client, payload, steps_scale: int = 1):
        return super().train(client, payload, steps_scale)

    @on_one_thread
    def predict(self, server, client, idx):
        return super().predict(server, client, idx)

    @on_one_thread
    def aggregate(self, server, uploads):
        return super().aggregate(server, uploads)

    plain_average = True      # this `aggregate` is the core's average on one thread (privacy.py)

    def batch(self, idx, gen=None):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.features[idx], self.fed.y[idx].to(self.device)

    def zero_shot(self, feats: torch.Tensor) -> torch.Tensor:
        """Sheet §4 zero-shot: p(c|x) = softmax_c(s cos(I, T_c))."""
        return F.softmax(self.args.logit_scale * F.normalize(feats, dim=-1) @ self.text.t(), dim=1)

    def lr_now(self, lr: float) -> float:
        return lr * getattr(self.args, "lr_decay", 1.0) ** self.round

    def param_groups(self) -> list:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad],
                 "lr": self.lr_now(self.cfg.lr)}]

    def make_optimizer(self, client):
        """The papers' optimiser: Adam with L2 weight decay (FedCLIP, FACMIC) or AdamW with
        decoupled weight decay (FedMedCLIP, `decoupled_weight_decay`), betas (0.9, 0.98),
        eps 1e-6, the learning rate decayed by lr_decay each round, through torch's fused
        kernel (the same update, several times faster on a CPU). `--optimizer sgd` gives
        momentum SGD instead."""
        groups = self.param_groups()
        if self.cfg.optimizer == "adam":
            decoupled = getattr(self, "decoupled_weight_decay", False)
            cls = torch.optim.AdamW if decoupled else torch.optim.Adam
            opt = cls(groups, betas=(0.9, 0.98), eps=1e-6, weight_decay=self.cfg.weight_decay,
                      fused=True)            # --device is cpu or cuda: both have the kernel
        else:
            opt = torch.optim.SGD(groups, momentum=self.cfg.momentum,
                                  weight_decay=self.cfg.weight_decay)
        if self.cfg.keep_optimizer and "optimizer" in client.state:
            opt.load_state_dict(client.state["optimizer"])
            for g, lr in zip(opt.param_groups, [g["lr"] for g in groups]):
                g["lr"] = lr
        return opt

    def local_batches(self, client, gen, steps_scale: int = 1):
        """The public codes' training loaders drop the last incomplete batch (a client
        with fewer than B images keeps its one short batch)."""
        B = self.cfg.batch_size
        for idx in super().local_batches(client, gen, steps_scale):
            if len(idx) < B and client.n >= B and not self.cfg.local_steps:
                continue
            yield idx

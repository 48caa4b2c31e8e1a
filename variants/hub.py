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

A model folder is someone else's files, so it is checked before anything in it is read, and every
refusal is one line naming the file: its weights must be safetensors (`model.safetensors` or the
shards of `model.safetensors.index.json`, each checked to be complete); pickle weights
(`pytorch_model.bin`, `*.pt`, ...) can run code when loaded and are refused unless the caller opts
in with `allow_pickle=True`, and then they are read only through torch's `weights_only` loader
(transformers' default). A folder without tokenizer files is refused unless a tokenizer is given.
Code shipped with a model (`auto_map` in its config) never runs unless `trust_remote_code=True`.
Errors of transformers and the bridge while loading are reported in one line. A hub id is
resolved by transformers, which takes safetensors where the repository has them and otherwise
a pickle through `weights_only`: for the strict checks, download the folder and give its path.

transformers and TransformerLens's bridge are imported only when a Hugging Face model is loaded.
"""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path
from typing import Any, cast

import torch
from jaxtyping import Int
from safetensors import SafetensorError, safe_open
from torch import Tensor
from transformer_lens.model_protocol import TransformerLensModel

from poslens.variants.checkpoint import load
from poslens.variants.model import HookedTransformer, build
from poslens.variants.protocol import HookedModel
from poslens.variants.storage import read_json
from poslens.variants.tokens import tokenize

# A tokenizer whose size is outside [MIN_TOKENIZER_FRACTION · d_vocab, d_vocab] does not belong to the
# model: real vocabularies are padded a little beyond their tokenizer (Pythia 50,277 of 50,304), never halved.
MIN_TOKENIZER_FRACTION = 0.5
IN_MEMORY = "in-memory"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
# What transformers raises on a tokenizer it cannot load; reported in one line.
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, NotImplementedError, ImportError, SafetensorError,
               pickle.UnpicklingError)
MAX_MESSAGE = 300  # characters of a library's error message kept in ours (the bridge lists every architecture)


def load_any(spec: Any, *, tokenizer: Any = None, device: str | None = None, dtype: torch.dtype | None = None,
             device_map: str | dict | None = None, n_devices: int | None = None, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> HookedModel:
    """The model `spec` names, as a TransformerLens model in eval mode (see the module docstring).

    Args:
        spec: a poslens run directory, a `save_pretrained` folder, a hub id, a
            `transformers.PreTrainedModel` or a TransformerLens model (returned as it is).
        tokenizer: a `transformers` tokenizer for a Hugging Face model or folder.
        device: where the loaded model runs (`cpu`, `cuda`, ...); not with `device_map`.
        dtype: the precision its weights are loaded in (default float32; `torch.bfloat16`
            halves a large model).
        device_map: for a folder or hub id, how transformers places the layers (`"auto"`,
            `"cpu"`, `{"": "cuda:0"}`, ...), passed to TransformerBridge.
        n_devices: for a folder or hub id, split the model over this many CUDA devices
            (TransformerBridge translates it into a device map).
        trust_remote_code: let a folder or hub model run the Python code it ships (its config's
            `auto_map`); off by default, and the CLI says when it is on.
        allow_pickle: accept a folder whose only weights are pickle files (`pytorch_model.bin`),
            read through torch's `weights_only` loader; off by default.

    Returns:
        The model, in eval mode.

    Raises:
        ValueError: one line naming what cannot be loaded and why (also `FileNotFoundError`).
    """
    hub_only = {name: value for name, value in (("device_map", device_map), ("n_devices", n_devices))
                if value is not None}
    if hub_only and device is not None:
        raise ValueError(f"give either device= or {' and '.join(hub_only)}=, not both: a device map places the model "
                         "itself")
    if n_devices is not None and (isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1):
        raise ValueError(f"n_devices must be an integer >= 1, got {n_devices}")
    if (isinstance(spec, TransformerLensModel) or _is_hf_model(spec)) and (dtype is not None or hub_only):
        given = ", ".join(f"{name}=" for name in ["dtype"] * (dtype is not None) + list(hub_only))
        raise ValueError(f"{given} applies to a model loaded from a folder or the hub; place and cast a model "
                         "object yourself (transformers: from_pretrained(..., device_map=...))")
    if isinstance(spec, TransformerLensModel):
        if tokenizer is not None or device is not None:
            raise ValueError("a TransformerLens model object is used as it is: do not pass tokenizer= or device=")
        # The run-time check sees only TransformerLensModel's four members; TransformerLens's models have the rest.
        return cast(HookedModel, spec)
    if _is_hf_model(spec):
        return _bridge_from_hf_model(spec, tokenizer, device)
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"cannot load a model from a {type(spec).__name__}; allowed: a poslens run directory, a "
                         "Hugging Face hub id or save_pretrained folder, a transformers.PreTrainedModel, or a "
                         "TransformerLens model")
    options: dict[str, Any] = {"device": device, "dtype": dtype, "device_map": device_map, "n_devices": n_devices,
                               "trust_remote_code": trust_remote_code}
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, tokenizer, allow_pickle=allow_pickle, **options)
    if path.exists() or str(spec).startswith((".", "/", "~")) or path.is_absolute():
        raise FileNotFoundError(f"{spec} is not a model folder (a poslens run directory or a save_pretrained folder)")
    return _boot(str(spec), tokenizer=tokenizer, **options)


def load_tokenizer(spec: str | os.PathLike, *, trust_remote_code: bool = False) -> Any:
    """A `transformers` tokenizer from a folder or hub id (`AutoTokenizer`), with a one-line error.

    Args:
        spec: a folder holding tokenizer files, or a hub id.
        trust_remote_code: let a tokenizer that ships Python code run it.

    Returns:
        The tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(spec), trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as error:
        raise ValueError(f"could not load a tokenizer from {spec}: {_first_line(error)}") from error


def fresh_twin(model: HookedModel, *, seed: int = 0) -> HookedModel:
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


def _load_folder(path: Path, tokenizer: Any, *, allow_pickle: bool, **options: Any) -> HookedModel:
    """A poslens run directory (`config.json` with a poslens `config`) or a `save_pretrained` folder,
    checked before any of its files is loaded (see the module docstring)."""
    record = read_json(path / "config.json") if (path / "config.json").is_file() else None
    if isinstance(record, dict) and "config" in record and "format" in record:
        if tokenizer is not None:
            raise ValueError(f"{path} is a poslens run: its tokens are the characters of its alphabet; "
                             "do not pass tokenizer=")
        placed = [name for name in ("device_map", "n_devices") if options[name] is not None]
        if placed:
            raise ValueError(f"{path} is a poslens run: it loads on one device (device=), not with {placed[0]}=")
        return load(path, device=options["device"] or "cpu", dtype=options["dtype"])
    if isinstance(record, dict) and "model_type" in record:
        _check_weight_files(path, allow_pickle)
        if tokenizer is None and not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): save the "
                             "model's tokenizer into it (tokenizer.save_pretrained), or pass tokenizer= "
                             "(poslens: --tokenizer)")
        return _boot(str(path), tokenizer=tokenizer, **options)
    raise ValueError(f"{path} is neither a poslens run directory nor a save_pretrained folder "
                     "(no config.json with a poslens config or a Hugging Face model_type)")


def _check_weight_files(path: Path, allow_pickle: bool) -> None:
    """Refuse, naming the file, a folder whose weights transformers would load from a pickle (unless
    `allow_pickle`), or whose safetensors weights are incomplete; pickle files beside
    safetensors weights are never read (transformers prefers `model.safetensors`)."""
    shards = [SAFE_WEIGHTS] if (path / SAFE_WEIGHTS).is_file() else []
    if not shards and (path / SAFE_INDEX).is_file():
        index = read_json(path / SAFE_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ValueError(f"{path / SAFE_INDEX} is not a safetensors index: it has no weight_map of file names")
        shards = sorted(set(weight_map.values()))
    for shard in shards:
        _check_safetensors(path / shard)
    if shards:
        return
    pickles = sorted(child.name for child in path.iterdir() if child.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise ValueError(f"{path} holds no model weights: expected {SAFE_WEIGHTS} (or the shards of {SAFE_INDEX})")
    if not allow_pickle:
        raise ValueError(f"{path / pickles[0]} is a pickle file, which can run code when it is loaded; poslens loads "
                         f"safetensors weights only: convert it to {SAFE_WEIGHTS}, or, if you trust it, pass "
                         "allow_pickle=True (poslens: --allow-pickle) to read it through torch's weights_only loader")


def _check_safetensors(file: Path) -> None:
    """Refuse a missing, truncated or corrupted safetensors file, naming it (its header and size are checked)."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist, but the folder's {SAFE_INDEX} lists it")
    try:
        with safe_open(file, framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{file} is not a valid safetensors file (truncated or corrupted?): {_first_line(error)}") \
            from None


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (transformers' messages run to paragraphs)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= MAX_MESSAGE else f"{line[:MAX_MESSAGE]}..."


def _boot(name: str, *, tokenizer: Any, device: str | None, hf_model: Any = None, dtype: torch.dtype | None = None,
          device_map: str | dict | None = None, n_devices: int | None = None,
          trust_remote_code: bool = False) -> HookedModel:
    from transformer_lens.model_bridge import TransformerBridge

    kept = None if tokenizer is None else _kept_tokenizer(tokenizer)
    try:
        bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=kept, device=device,
                                                     dtype=dtype or torch.float32, device_map=device_map,
                                                     n_devices=n_devices, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers', the bridge's and (trusted) model code's errors all mean "cannot load"
        if "trust_remote_code" in str(error) and not trust_remote_code:
            raise ValueError(f"could not load {name}: it ships Python code that must run to build the model (its "
                             "config's auto_map); if you trust that code, pass trust_remote_code=True (poslens: "
                             "--trust-remote-code)") from error
        if hf_model is None and not Path(name).is_dir() and isinstance(error, OSError):
            raise ValueError(f"could not load {name!r}: it is not a local folder, and loading it from the Hugging Face "
                             f"hub failed (offline? give a folder written by save_pretrained instead): "
                             f"{_first_line(error)}") from error
        raise ValueError(f"could not load {name}: {_first_line(error)}") from error
    _check_tokenizer(bridge, name)
    return bridge.eval()


def _bridge_from_hf_model(model: Any, tokenizer: Any, device: str | None) -> HookedModel:
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

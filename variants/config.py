"""`VariantConfig`: one dataclass that names every architectural choice poslens varies.

Positional encoding, attention direction and removed residual connections are ordinary,
validated fields, so a NoPE bidirectional model with its block-0 residual cut is just
`variant_config("nope-bidirectional+cut0")`, and its checkpoint says so in `config.json`.
(A "preset" in poslens is an experiment's size, `analyses.experiments.presets`; the old name
`preset` of `variant_config` is kept for a release, with a `DeprecationWarning`.)
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from transformer_lens.config import TransformerLensConfig

from poslens.variants.deprecation import renamed_attributes

POSITIONAL_EMBEDDINGS = {"none": "nope", "standard": "learned", "sinusoidal": "sinusoidal", "rotary": "rotary"}
ATTENTION_DIRS = ("causal", "bidirectional")
SUBLAYERS = ("attn", "mlp", "both")
ACT_FNS = ("relu", "gelu", "silu")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
VARIANT_NAMES = tuple(f"{pe}-{direction}" for pe in POSITIONAL_EMBEDDINGS.values() for direction in ATTENTION_DIRS)
MAX_SEED = 2**32 - 1  # a batch's seed is seed * 2**32 + step, and torch's generators take at most 2**64 - 1


@dataclass
class VariantConfig(TransformerLensConfig):
    """A pre-LayerNorm decoder, TransformerLens-compatible, with poslens's variant fields.

    `init_std` defaults to TransformerLens's 0.8 / √d_model (0.1 at width 64; GPT-2's 0.02
    leaves small NoPE models stuck on addition for thousands of steps).
    `positional_embedding_type`: `none` (NoPE), `standard` (learned absolute), `sinusoidal`
    (fixed), `rotary`. `attention_dir`: `causal` or `bidirectional`. `residual_cuts`: block →
    `attn`, `mlp` or `both`: which residual connections are removed, so that block's
    `resid_mid` is `attn_out` alone and/or its `resid_post` is `mlp_out` alone. `alphabet`:
    the token characters (token id = index); `d_vocab` follows from it. `n_ctx` and `alphabet`
    describe the data, not the architecture, so they have no default: give them, or take them
    from a task with `variant_config(name, task=task)`. `seed` fixes the initial weights.
    """

    d_model: int = 64
    d_head: int = 16
    n_layers: int = 4
    n_ctx: int = 0
    n_heads: int = -1
    d_mlp: int | None = None
    d_vocab: int = -1
    device: str = "cpu"
    positional_embedding_type: str = "none"
    act_fn: str = "gelu"
    attention_dir: str = "causal"
    residual_cuts: dict[int, str] = field(default_factory=dict)
    alphabet: str = ""
    seed: int = 0
    rotary_base: float = 10_000.0
    init_std: float | None = None

    def __post_init__(self) -> None:
        if not self.alphabet or not self.n_ctx:
            raise ValueError("a VariantConfig needs its data's alphabet and n_ctx: pass alphabet=... and n_ctx=..., "
                             f"or variant_config(name, task=task); "
                             f"got alphabet={self.alphabet!r}, n_ctx={self.n_ctx!r}")
        for name in ("d_model", "d_head", "n_layers", "n_ctx"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {shown(value)}")
        if self.n_heads != -1:
            check_integer("n_heads", self.n_heads, minimum=1)
        if self.d_mlp is not None:
            check_integer("d_mlp", self.d_mlp, minimum=1)
        check_integer("seed", self.seed, minimum=0, maximum=MAX_SEED)
        if self.n_heads != -1 and self.n_heads * self.d_head != self.d_model:
            raise ValueError(
                f"d_model ({self.d_model}) must equal n_heads ({self.n_heads}) × d_head ({self.d_head})"
            )
        if self.d_model % self.d_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by d_head ({self.d_head})")
        super().__post_init__()
        self.device = check_device(self.device)
        _check_choice("positional_embedding_type", self.positional_embedding_type, tuple(POSITIONAL_EMBEDDINGS))
        _check_choice("attention_dir", self.attention_dir, ATTENTION_DIRS)
        _check_choice("act_fn", self.act_fn, ACT_FNS)
        _check_choice("normalization_type", self.normalization_type, ("LN",))
        _check_choice("dtype", _dtype_name(self.dtype), tuple(DTYPES))
        self.dtype = DTYPES[_dtype_name(self.dtype)]
        for flag in ("attn_only", "gated_mlp", "use_attn_result", "use_split_qkv_input", "uses_rms_norm", "final_rms",
                     "layer_norm_folding"):
            if getattr(self, flag):
                raise ValueError(f"{flag}=True is not supported by poslens models; allowed: False")
        for option in ("n_key_value_heads", "num_experts", "experts_per_token"):
            if getattr(self, option) is not None:
                raise ValueError(f"{option}={getattr(self, option)!r} is not supported by poslens models; "
                                 "allowed: None")
        if self.positional_embedding_type == "rotary" and self.d_head % 2:
            raise ValueError(f"rotary embeddings need an even d_head, got {self.d_head}")
        if len(set(self.alphabet)) != len(self.alphabet) or not self.alphabet:
            raise ValueError(f"alphabet must be non-empty distinct characters, got {self.alphabet!r}")
        if self.d_vocab not in (-1, len(self.alphabet)):
            raise ValueError(f"d_vocab ({self.d_vocab}) must equal len(alphabet) = {len(self.alphabet)}")
        self.d_vocab = len(self.alphabet)
        self.residual_cuts = _normalise_cuts(self.residual_cuts, self.n_layers)
        if self.init_std is None:
            self.init_std = 0.8 / self.d_model**0.5
        check_number("init_std", self.init_std, above=0)
        check_number("eps", self.eps, above=0)
        check_number("rotary_base", self.rotary_base, above=1)

    @property
    def name(self) -> str:
        """The name of this variant as `variant_config` reads it, e.g. `nope-causal+cut0,1:attn`."""
        base = f"{POSITIONAL_EMBEDDINGS[self.positional_embedding_type]}-{self.attention_dir}"
        if not self.residual_cuts:
            return base
        spec = ",".join(
            str(block) if sublayer == "both" else f"{block}:{sublayer}"
            for block, sublayer in self.residual_cuts.items()
        )
        return f"{base}+cut{spec}"

    def cuts(self, block: int) -> tuple[bool, bool]:
        """Whether block `block` has its (attention, MLP) residual connection removed."""
        sublayer = self.residual_cuts.get(block)
        return sublayer in ("attn", "both"), sublayer in ("mlp", "both")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able fields (device is where it runs, not what it is, so it is left out)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "device"}
        fields["dtype"] = _dtype_name(self.dtype)
        fields["residual_cuts"] = {str(block): sublayer for block, sublayer in self.residual_cuts.items()}
        return fields

    @classmethod
    def from_json(cls, fields: dict[str, Any], **overrides: Any) -> VariantConfig:
        """Inverse of `to_json`; unknown fields are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; allowed: {sorted(known)}")
        return cls(**{**fields, **overrides})


def shown(value: Any) -> str:
    """`value` as an error message shows it to a person: text quoted (so '3' and 3 differ), any
    other value by its `str` (a numpy scalar as 3.0, not as its repr).

    Args:
        value: the value a message names.

    Returns:
        Its text for a person.
    """
    return repr(value) if isinstance(value, str) else str(value)


def check_integer(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    """`value` if it is an integer (not a bool) from `minimum` to `maximum` (no upper bound if None),
    else a `ValueError` naming it and the allowed range.

    Args:
        name: how the message names the value.
        value: the value to check.
        minimum: the smallest allowed value.
        maximum: the largest allowed value, or None.

    Returns:
        `value`, checked.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {shown(value)}")
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an integer from {minimum} to {maximum}, got {shown(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {shown(value)}")
    return value


def check_number(name: str, value: Any, *, above: float | None = None, at_least: float | None = None,
                 below: float | None = None, at_most: float | None = None) -> float:
    """`value` if it is a finite real number in the given open (`above`, `below`) or closed
    (`at_least`, `at_most`) bounds, else a `ValueError` naming it and the allowed range."""
    bounds = [(symbol, test, limit) for symbol, test, limit in
              ((">", operator.gt, above), (">=", operator.ge, at_least), ("<", operator.lt, below),
               ("<=", operator.le, at_most)) if limit is not None]
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not number or not all(test(value, limit) for _, test, limit in bounds):
        allowed = "".join(f" {'and ' if i else ''}{symbol} {limit:g}" for i, (symbol, _, limit) in enumerate(bounds))
        raise ValueError(f"{name} must be a finite number{allowed}, got {shown(value)}")
    return value


def parameter_count(cfg: VariantConfig) -> int:
    """The number of weights of `build(cfg)`, counted from the config (nothing is allocated).

    Args:
        cfg: the model's config.

    Returns:
        Embedding, unembedding, positional embedding (learned only), attention, MLP and LayerNorm weights.
    """
    d_model, d_mlp = cfg.d_model, cfg.d_mlp or 4 * cfg.d_model
    heads = cfg.n_heads if cfg.n_heads != -1 else d_model // cfg.d_head
    attention = 4 * d_model * heads * cfg.d_head + 3 * heads * cfg.d_head + d_model
    block = attention + 2 * d_model * d_mlp + d_mlp + d_model + 4 * d_model
    positions = cfg.n_ctx * d_model if cfg.positional_embedding_type == "standard" else 0
    return 2 * cfg.d_vocab * d_model + cfg.d_vocab + positions + cfg.n_layers * block + 2 * d_model


def memory_needed(cfg: VariantConfig, batch_size: int = 0) -> int:
    """Bytes that building `cfg` needs (weights), and, with `batch_size`, that training it needs:
    weights, gradients and AdamW's two moments, plus the activations one step keeps for its
    backward pass (a lower bound: the stream, q, k, v, z, the MLP's hidden layer and the attention
    scores and pattern of every block, and the logits).

    Args:
        cfg: the model's config.
        batch_size: sequences per training step; 0 for the weights alone.

    Returns:
        The estimate in bytes.
    """
    size = torch.empty((), dtype=cfg.dtype).element_size()
    if not batch_size:
        return parameter_count(cfg) * size
    d_mlp, heads = cfg.d_mlp or 4 * cfg.d_model, max(1, cfg.d_model // cfg.d_head)
    per_token = cfg.n_layers * (10 * cfg.d_model + 2 * d_mlp + 2 * heads * cfg.n_ctx) + 3 * cfg.d_vocab
    return 4 * parameter_count(cfg) * size + batch_size * cfg.n_ctx * per_token * size


def available_memory(device: str) -> int | None:
    """Bytes free for new tensors on `device`: the kernel's MemAvailable for the CPU (Linux), the
    free memory of a CUDA device; None where it cannot be told."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(cfg: VariantConfig, batch_size: int = 0) -> int:
    """Refuse, before anything is allocated, a model (and training batch) that cannot fit the memory
    free on `cfg.device`, with the size it would need.

    Args:
        cfg: the model's config.
        batch_size: sequences per training step; 0 to check the weights alone.

    Returns:
        The estimated bytes needed (see `memory_needed`).
    """
    needed, free = memory_needed(cfg, batch_size), available_memory(cfg.device)
    if free is not None and needed > free:
        what = f"training it at batch size {batch_size}" if batch_size else "its weights"
        raise ValueError(f"a {cfg.n_layers}-block d_model {cfg.d_model} model ({parameter_count(cfg):,} weights) "
                         f"cannot fit: {what} needs about {needed / 2**30:,.1f} GiB and {cfg.device} has "
                         f"{free / 2**30:,.1f} GiB free; choose smaller sizes")
    return needed


def available_devices() -> list[str]:
    """The devices this torch can run on: cpu, cuda and cuda:N (N < device_count) when CUDA is
    available, mps when Apple's backend is."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: Any) -> str:
    """`device` if this machine's torch offers it (see `available_devices`), else a `ValueError`."""
    allowed = available_devices()
    if str(device) not in allowed:
        raise ValueError(f"device {device!r} is not available here; allowed: {allowed}")
    return str(device)


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {list(allowed)}")


def _normalise_cuts(cuts: dict, n_layers: int) -> dict[int, str]:
    """Cuts keyed by int block in order; accepts string keys (as JSON stores them)."""
    if not isinstance(cuts, dict):
        raise ValueError(f"residual_cuts must be a dict block -> sublayer, got {cuts!r}")
    normalised = {}
    for block, sublayer in cuts.items():
        if not str(block).lstrip("-").isdigit() or not 0 <= int(block) < n_layers:
            raise ValueError(f"residual cut block {block!r} is out of range; allowed: 0..{n_layers - 1}")
        _check_choice("residual cut sublayer", sublayer, SUBLAYERS)
        normalised[int(block)] = sublayer
    return dict(sorted(normalised.items()))


_VARIANT_PATTERN = re.compile(r"^(?P<base>[a-z]+-[a-z]+)(?:\+cut(?P<cuts>.+))?$")


def variant_config(name: str, *, task: Any = None, **overrides: Any) -> VariantConfig:
    """A `VariantConfig` from a name like `nope-causal`, `learned-bidirectional+cut0,1:attn`.

    Base names are `{nope,learned,sinusoidal,rotary}-{causal,bidirectional}`; the optional
    `+cut` suffix lists blocks whose residual connections are removed, each `L` (both
    sublayers) or `L:attn` / `L:mlp`. `task` (any object with `alphabet` and `seq_len`, such as
    `poslens.tasks.Addition()`) supplies `alphabet` and `n_ctx`; `overrides` set any other field
    (sizes, seed, dtype...) and win over the task's.

    Args:
        name: the variant's name, with an optional `+cut` suffix.
        task: supplies `alphabet` and `n_ctx` (or pass them in `overrides`).
        **overrides: any other `VariantConfig` field (`n_layers`, `d_model`, `seed`, ...).

    Returns:
        The validated `VariantConfig`.
    """
    match = _VARIANT_PATTERN.match(name)
    if match is None or match["base"] not in VARIANT_NAMES:
        raise ValueError(f"unknown variant {name!r}; allowed: {list(VARIANT_NAMES)}, optionally with '+cut0', "
                         "'+cut0,1' or '+cut0:attn'")
    pe_name, direction = match["base"].split("-")
    positional = {short: long for long, short in POSITIONAL_EMBEDDINGS.items()}[pe_name]
    cuts: dict[int, str] = {}
    for item in (match["cuts"] or "").split(",") if match["cuts"] else []:
        block, _, sublayer = item.partition(":")
        if not block.isdigit():
            raise ValueError(f"bad residual cut {item!r} in variant {name!r}; expected 'L' or 'L:attn' / 'L:mlp'")
        cuts[int(block)] = sublayer or "both"
    fields: dict[str, Any] = {"positional_embedding_type": positional, "attention_dir": direction,
                              "residual_cuts": cuts}
    clash = sorted(set(fields) & set(overrides))
    if clash:
        raise ValueError(f"{clash} are set by the variant name {name!r}; do not override them")
    data: dict[str, Any] = {} if task is None else {"alphabet": task.alphabet, "n_ctx": task.seq_len}
    return VariantConfig(**fields, **{**data, **overrides})


__getattr__ = renamed_attributes(__name__, {"preset": "variant_config", "PRESET_NAMES": "VARIANT_NAMES"})

"""The poslens `HookedTransformer`: a small pre-LayerNorm decoder on TransformerLens hooks.

Read top to bottom: embeddings → blocks (LayerNorm → attention → residual → LayerNorm → MLP →
residual) → final LayerNorm → unembedding. Every intermediate passes through a `HookPoint`
named as in TransformerLens, so `run_with_cache`, `run_with_hooks`, `transformer_lens.patching`
and `transformer_lens.head_detector` work unchanged. The variant fields of `VariantConfig`
decide three things only: which positional signal is added (none, learned, sinusoidal, rotary
on q/k), whether attention is masked causally, and which residual connections exist.

The model also carries TransformerLens's weight surface (`TransformerLensModelWithWeights`): the
stacked weights `W_E`, `W_pos` (additive encodings only), `W_Q`… `b_out`, the `QK` / `OV`
circuits, `accumulated_bias` and `tokens_to_residual_directions`, so direct logit attribution
and `ActivationCache.get_full_resid_decomposition` run on it as on a `TransformerBridge`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import ActivationCache, FactoredMatrix, HookedRootModule
from transformer_lens.config import TransformerLensConfig
from transformer_lens.hook_points import HookPoint

from poslens.variants.config import VariantConfig, check_memory
from poslens.variants.tokens import check_token_batch, detokenize, tokenize

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class LayerNorm(nn.Module):
    """LayerNorm exposing its scale and output, as TransformerLens's does.

    The output comes from the fused `F.layer_norm`; the scale is computed only when a hook
    reads or edits `hook_scale`, and an edited (or differentiated) scale is used to rebuild
    the output, so interventions on it behave exactly as in TransformerLens.
    """

    def __init__(self, cfg: VariantConfig):
        super().__init__()
        self.eps = cfg.eps
        self.w = nn.Parameter(torch.ones(cfg.d_model, dtype=cfg.dtype))
        self.b = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        normalized = F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)
        if self.hook_scale._forward_hooks or self.hook_scale._backward_hooks:
            centered = x - x.mean(-1, keepdim=True)
            scale = (centered.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
            hooked = self.hook_scale(scale)
            if hooked is not scale or self.hook_scale._backward_hooks:
                normalized = centered / hooked * self.w + self.b
        return self.hook_normalized(normalized)


class Attention(nn.Module):
    """Multi-head self-attention; causal or bidirectional, optionally rotary."""

    # Hook points and buffers made by `setattr` / `register_buffer` (the rotary ones only for rotary models).
    hook_q: HookPoint
    hook_k: HookPoint
    hook_v: HookPoint
    hook_attn_scores: HookPoint
    hook_pattern: HookPoint
    hook_z: HookPoint
    mask: Tensor
    rotary_cos: Tensor
    rotary_sin: Tensor

    def __init__(self, cfg: VariantConfig):
        super().__init__()
        self.cfg = cfg
        heads = (cfg.n_heads, cfg.d_model, cfg.d_head)
        self.W_Q, self.W_K, self.W_V = (nn.Parameter(torch.empty(heads, dtype=cfg.dtype)) for _ in range(3))
        self.W_O = nn.Parameter(torch.empty(cfg.n_heads, cfg.d_head, cfg.d_model, dtype=cfg.dtype))
        self.b_Q, self.b_K, self.b_V = (
            nn.Parameter(torch.zeros(cfg.n_heads, cfg.d_head, dtype=cfg.dtype)) for _ in range(3)
        )
        self.b_O = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        visible = torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool)
        self.register_buffer("mask", visible.tril() if cfg.attention_dir == "causal" else visible, persistent=False)
        for name in ("q", "k", "v", "attn_scores", "pattern", "z"):
            setattr(self, f"hook_{name}", HookPoint())
        if cfg.positional_embedding_type == "rotary":
            self.hook_rot_q, self.hook_rot_k = HookPoint(), HookPoint()
            cos, sin = rotary_tables(cfg)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)

    def forward(self, x: Float[Tensor, "batch pos d_model"], position_ids: Int[Tensor, "*batch pos"] | None = None
                ) -> Float[Tensor, "batch pos d_model"]:
        q = self.hook_q(self._project(x, self.W_Q, self.b_Q))
        k = self.hook_k(self._project(x, self.W_K, self.b_K))
        v = self.hook_v(self._project(x, self.W_V, self.b_V))
        if self.cfg.positional_embedding_type == "rotary":
            q, k = self.hook_rot_q(self._rotate(q, position_ids)), self.hook_rot_k(self._rotate(k, position_ids))
        n_pos = x.shape[1]
        scores = einops.rearrange(q, "batch q_pos head d_head -> batch head q_pos d_head") @ einops.rearrange(
            k, "batch k_pos head d_head -> batch head d_head k_pos") / math.sqrt(self.cfg.d_head)
        scores = self.hook_attn_scores(scores.masked_fill(~self.mask[:n_pos, :n_pos], float("-inf")))
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        z = pattern @ einops.rearrange(v, "batch k_pos head d_head -> batch head k_pos d_head")
        z = self.hook_z(einops.rearrange(z, "batch head q_pos d_head -> batch q_pos head d_head"))
        W_O = einops.rearrange(self.W_O, "head d_head d_model -> d_model (head d_head)")
        return F.linear(einops.rearrange(z, "batch pos head d_head -> batch pos (head d_head)"), W_O, self.b_O)

    def _project(self, x: Float[Tensor, "batch pos d_model"], W: Float[Tensor, "head d_model d_head"],
                 b: Float[Tensor, "head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
        """All heads' projections as one matmul (`x @ W[h] + b[h]` for every head h)."""
        stacked = F.linear(x, einops.rearrange(W, "head d_model d_head -> (head d_head) d_model"),
                           einops.rearrange(b, "head d_head -> (head d_head)"))
        return einops.rearrange(stacked, "batch pos (head d_head) -> batch pos head d_head", head=self.cfg.n_heads)

    def _rotate(self, x: Float[Tensor, "batch pos head d_head"], position_ids: Int[Tensor, "*batch pos"] | None = None
                ) -> Float[Tensor, "batch pos head d_head"]:
        """Rotary position embedding (GPT-NeoX layout: the two halves of d_head pair up), at positions
        0..pos-1 (the cached tables) or at explicit `position_ids` (computed from the same formula)."""
        first, second = x.chunk(2, dim=-1)
        if position_ids is None:
            cos, sin = self.rotary_cos[: x.shape[1]], self.rotary_sin[: x.shape[1]]
        else:
            cos, sin = (table.to(x.device) for table in rotary_tables(self.cfg, position_ids.cpu()))
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [*batch, pos, 1, d_head]: one angle for every head
        return x * cos + torch.cat([-second, first], dim=-1) * sin


def rotary_tables(cfg: VariantConfig, positions: Int[Tensor, "*shape"] | None = None
                  ) -> tuple[Float[Tensor, "*shape d_head"], Float[Tensor, "*shape d_head"]]:
    """cos and sin tables `[n_ctx, d_head]` of the rotary embedding (frequencies base^(-2i/d_head), halves
    paired), or `[*positions.shape, d_head]` at `positions` (the same numbers, to the bit, where they overlap)."""
    positions = torch.arange(cfg.n_ctx) if positions is None else positions
    frequencies = cfg.rotary_base ** (-torch.arange(0, cfg.d_head, 2, dtype=torch.float64) / cfg.d_head)
    angles = einops.einsum(positions.to(torch.float64), frequencies, "... pos, freq -> ... pos freq")
    angles = einops.repeat(angles, "... pos freq -> ... pos (half freq)", half=2)
    return angles.cos().to(cfg.dtype), angles.sin().to(cfg.dtype)


def sinusoidal_table(cfg: VariantConfig, positions: Int[Tensor, "*shape"] | None = None
                     ) -> Float[Tensor, "*shape d_model"]:
    """Vaswani et al.'s fixed encoding: sin on even dimensions, cos on odd ones; `[n_ctx, d_model]`, or
    `[*positions.shape, d_model]` at `positions` (the same numbers, to the bit, where they overlap)."""
    positions = torch.arange(cfg.n_ctx) if positions is None else positions
    frequencies = 10_000.0 ** (-torch.arange(0, cfg.d_model, 2, dtype=torch.float64) / cfg.d_model)
    angles = einops.einsum(positions.to(torch.float64), frequencies, "... pos, freq -> ... pos freq")
    table = einops.rearrange([angles.sin(), angles.cos()], "kind ... freq -> ... (freq kind)")
    return table[..., : cfg.d_model].to(cfg.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: VariantConfig):
        super().__init__()
        assert cfg.d_mlp is not None  # TransformerLensConfig.__post_init__ sets it (4 · d_model when not given)
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp, dtype=cfg.dtype))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp, dtype=cfg.dtype))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model, dtype=cfg.dtype))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        self.act_fn = ACTIVATIONS[cfg.act_fn]
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        post = self.hook_post(self.act_fn(self.hook_pre(F.linear(x, self.W_in.T, self.b_in))))
        return F.linear(post, self.W_out.T, self.b_out)


class TransformerBlock(nn.Module):
    """Pre-LN block. A cut residual connection means the sublayer's output *is* the stream."""

    hook_resid_pre: HookPoint  # the hook points are made by `setattr`
    hook_attn_out: HookPoint
    hook_resid_mid: HookPoint
    hook_mlp_out: HookPoint
    hook_resid_post: HookPoint

    def __init__(self, cfg: VariantConfig, block: int):
        super().__init__()
        self.cut_attn, self.cut_mlp = cfg.cuts(block)
        self.ln1, self.attn, self.ln2, self.mlp = LayerNorm(cfg), Attention(cfg), LayerNorm(cfg), MLP(cfg)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"],
                position_ids: Int[Tensor, "*batch pos"] | None = None) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), position_ids))
        resid_mid = self.hook_resid_mid(attn_out if self.cut_attn else resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(mlp_out if self.cut_mlp else resid_mid + mlp_out)


class Embed(nn.Module):
    def __init__(self, cfg: VariantConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)


class PosEmbed(nn.Module):
    """Additive absolute positions: learned (`W_pos` a parameter) or sinusoidal (a fixed buffer)."""

    def __init__(self, cfg: VariantConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.positional_embedding_type == "standard":
            self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model, dtype=cfg.dtype))
        else:
            self.register_buffer("W_pos", sinusoidal_table(cfg), persistent=False)

    def forward(self, tokens: Int[Tensor, "batch pos"], position_ids: Int[Tensor, "*batch pos"] | None = None
                ) -> Float[Tensor, "batch pos d_model"]:
        if position_ids is None:
            table = self.W_pos[: tokens.shape[1]]
        elif isinstance(self.W_pos, nn.Parameter):  # learned: rows of the table
            table = self.W_pos[position_ids]
        else:  # sinusoidal: the formula, defined at every position
            table = sinusoidal_table(self.cfg, position_ids.cpu()).to(self.W_pos.device)
        if table.ndim == 3:  # [batch, pos] ids: a fresh [batch, pos, d_model] tensor already
            return table
        return einops.repeat(table, "pos d_model -> batch pos d_model", batch=tokens.shape[0])


class HookedTransformer(HookedRootModule):
    """A decoder whose variant (NoPE/learned/sinusoidal/rotary × causal/bidirectional × cuts) is its `cfg`.

    `hook_pos_embed` exists only for additive encodings (learned, sinusoidal): NoPE and
    rotary models add nothing to the stream at the embedding, and `ActivationCache` then
    correctly leaves `pos_embed` out of `decompose_resid`.
    """

    def __init__(self, cfg: VariantConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        if cfg.positional_embedding_type in ("standard", "sinusoidal"):
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(TransformerBlock(cfg, block) for block in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg)
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab, dtype=cfg.dtype))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab, dtype=cfg.dtype))
        self._init_weights()
        self.setup()
        self.to(cfg.device)

    def _init_weights(self) -> None:
        """Normal(0, init_std) matrices, output projections shrunk by √(2·n_layers) (GPT-2); seeded by cfg.seed."""
        generator = torch.Generator().manual_seed(self.cfg.seed)
        for name, param in self.named_parameters():
            if param.ndim < 2:
                continue
            std = self.cfg.init_std
            assert std is not None  # VariantConfig.__post_init__ sets it
            if name.endswith(("W_O", "W_out")):
                std /= math.sqrt(2 * self.cfg.n_layers)
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * std)

    def forward(
        self, input: str | list[str] | Int[Tensor, "batch pos"], return_type: str = "logits", *,
        position_ids: Int[Tensor, "*batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch pos d_model"]:
        """Logits `[batch, pos, d_vocab]` (`return_type="logits"`) or the final normalised stream
        (`"normalized"`). Strings are tokenised with the model's alphabet.

        Args:
            input: tokens `[batch, pos]`, a string or a list of strings.
            return_type: `"logits"` or `"normalized"`.
            position_ids: the position each token is *told* it has, `[pos]` (every sequence) or
                `[batch, pos]`; default 0..pos-1. Learned encodings read rows of `W_pos` (so ids must be
                below `n_ctx`); sinusoidal and rotary ones evaluate their formula at any id >= 0; NoPE has
                no positional signal and ignores them. `poslens.hooks.positions` builds shifted, swapped
                and repeated ids and applies them to any model.

        Returns:
            The logits or the final normalised stream.
        """
        tokens = self.to_tokens(input) if isinstance(input, (str, list)) else self.check_tokens(input)
        if position_ids is not None:
            position_ids = check_position_ids(position_ids, tokens, self.cfg)
        resid = self.hook_embed(self.embed(tokens))
        if hasattr(self, "pos_embed"):
            resid = resid + self.hook_pos_embed(self.pos_embed(tokens, position_ids))
        for block in self.blocks:
            resid = block(resid, position_ids)
        normalized = self.ln_final(resid)
        if return_type == "normalized":
            return normalized
        if return_type != "logits":
            raise ValueError(f"unknown return_type {return_type!r}; allowed: ['logits', 'normalized']")
        return F.linear(normalized, self.W_U.T, self.b_U)

    def check_tokens(self, tokens: Tensor) -> Int[Tensor, "batch pos"]:
        """`tokens` if they are a valid `[batch, pos]` batch for this model, else a clear error."""
        return check_token_batch(tokens, self.cfg.n_ctx, self.cfg.d_vocab)

    def run_with_cache(self, *args, **kwargs) -> tuple[Tensor, ActivationCache]:
        """As `HookedRootModule.run_with_cache`, but the cache is a real `ActivationCache`."""
        output, cache_dict = super().run_with_cache(*args, **kwargs)
        return output, ActivationCache(cache_dict, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))

    def to_tokens(self, text: str | list[str]) -> Int[Tensor, "batch pos"]:
        """TransformerLens's convention: text → `[batch, pos]` (a single string gives batch 1)."""
        tokens = tokenize(text, self.cfg.alphabet)
        return self.check_tokens(tokens[None] if tokens.ndim == 1 else tokens).to(self.cfg.device)

    def to_string(self, tokens: Int[Tensor, "... pos"]) -> str | list[str]:
        return detokenize(tokens.cpu(), self.cfg.alphabet)

    def to_str_tokens(self, input: str | list[str] | Int[Tensor, "... pos"]) -> list[str] | list[list[str]]:
        """Each token as its string: a string or `[pos]` / `[1, pos]` tokens give a list, a list of
        strings or `[batch, pos]` tokens (batch > 1) one list per sequence."""
        if isinstance(input, list):  # a string each, so a list of strings each
            return cast(list[list[str]], [self.to_str_tokens(item) for item in input])
        tokens = self.to_tokens(input)[0] if isinstance(input, str) else input
        if tokens.ndim == 2 and len(tokens) == 1:
            tokens = tokens[0]
        if tokens.ndim == 2:  # a [pos] row each, so a list of strings each
            return cast(list[list[str]], [self.to_str_tokens(row) for row in tokens])
        return list(self.to_string(tokens))

    def to_single_token(self, string: str) -> int:
        """The id of `string`, which must be one character of the alphabet."""
        if not isinstance(string, str) or len(string) != 1:
            raise ValueError(f"{string!r} is not a single token; tokens are the characters of {self.cfg.alphabet!r}")
        return int(tokenize(string, self.cfg.alphabet)[0])

    @torch.no_grad()
    def generate(self, prompt: Int[Tensor, "batch pos"], n_new: int) -> Int[Tensor, "batch n_new"]:
        """Greedy decoding: the `n_new` tokens the model appends to `prompt`."""
        tokens = prompt
        for _ in range(n_new):
            next_token = self(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
        return tokens[:, prompt.shape[1] :]

    # TransformerLens's weight surface: every weight stacked over layers, as HookedTransformer had it.

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        """The additive position table (learned or sinusoidal); absent (`hasattr` is False) for NoPE and rotary."""
        return self.pos_embed.W_pos

    @property
    def W_Q(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stack("attn", "W_Q")

    @property
    def W_K(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stack("attn", "W_K")

    @property
    def W_V(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stack("attn", "W_V")

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        return self._stack("attn", "W_O")

    @property
    def b_Q(self) -> Float[Tensor, "layer head d_head"]:
        return self._stack("attn", "b_Q")

    @property
    def b_K(self) -> Float[Tensor, "layer head d_head"]:
        return self._stack("attn", "b_K")

    @property
    def b_V(self) -> Float[Tensor, "layer head d_head"]:
        return self._stack("attn", "b_V")

    @property
    def b_O(self) -> Float[Tensor, "layer d_model"]:
        return self._stack("attn", "b_O")

    @property
    def W_in(self) -> Float[Tensor, "layer d_model d_mlp"]:
        return self._stack("mlp", "W_in")

    @property
    def b_in(self) -> Float[Tensor, "layer d_mlp"]:
        return self._stack("mlp", "b_in")

    @property
    def W_out(self) -> Float[Tensor, "layer d_mlp d_model"]:
        return self._stack("mlp", "W_out")

    @property
    def b_out(self) -> Float[Tensor, "layer d_model"]:
        return self._stack("mlp", "b_out")

    @property
    def QK(self) -> FactoredMatrix:
        """Each head's bilinear attention form `W_Q W_Kᵀ`, `[layer, head, d_model, d_model]` (rotary not applied)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """Each head's map from the residual stream it reads to what it writes, `W_V W_O`,
        `[layer, head, d_model, d_model]`."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def W_U_folded(self) -> Float[Tensor, "d_model d_vocab"]:
        """`W_U` with the final LayerNorm's weight folded in (as TransformerLens's `fold_ln` leaves it)."""
        return self.ln_final.w[:, None] * self.W_U

    @property
    def b_U_folded(self) -> Float[Tensor, " d_vocab"]:
        """`b_U` plus the final LayerNorm's bias through `W_U`: the part of each logit that no residual
        component carries, so `logit_attrs(...).sum(0) + b_U_folded[t]` is the logit of `t`."""
        return self.b_U + self.ln_final.b @ self.W_U

    def tokens_to_residual_directions(self, tokens: str | int | Int[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
        """The residual direction of each token's logit: the column of `W_U_folded`, so that the
        centred stream divided by its LayerNorm scale (what `ActivationCache.apply_ln_to_stack` gives)
        dotted with it is the logit less `b_U_folded`."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        return self.W_U_folded.T[torch.as_tensor(tokens, device=self.W_U.device)]

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
                         ) -> Float[Tensor, " d_model"]:
        """The attention and MLP output biases that the blocks before `layer` add to the stream
        (with `mlp_input`, also block `layer`'s attention bias). Exact only for an intact model:
        a cut residual connection discards what came before it."""
        if not 0 <= layer <= self.cfg.n_layers or (mlp_input and layer == self.cfg.n_layers):
            raise ValueError(f"layer must be in 0..{self.cfg.n_layers - int(mlp_input)}, got {layer!r}")
        total = torch.zeros(self.cfg.d_model, dtype=self.cfg.dtype, device=self.W_U.device)
        for block in cast(list[TransformerBlock], self.blocks[:layer]):
            total = total + block.attn.b_O + (block.mlp.b_out if include_mlp_biases else 0)
        return (total + cast(TransformerBlock, self.blocks[layer]).attn.b_O) if mlp_input else total

    def _stack(self, sublayer: str, name: str) -> Tensor:
        return torch.stack([getattr(getattr(block, sublayer), name) for block in self.blocks])


def check_position_ids(position_ids: Tensor, tokens: Int[Tensor, "batch pos"], cfg: TransformerLensConfig
                       ) -> Int[Tensor, "*batch pos"]:
    """`position_ids` on the tokens' device if they are valid for `tokens` and `cfg`, else a clear error.

    Args:
        position_ids: integer ids, `[pos]` or `[batch, pos]` shaped like `tokens`.
        tokens: the batch they go with.
        cfg: the model's config (a learned table has `n_ctx` rows; other encodings take any id >= 0).

    Returns:
        The ids as int64 on the tokens' device.
    """
    if not isinstance(position_ids, Tensor) or position_ids.is_floating_point() or position_ids.is_complex() or (
            position_ids.dtype == torch.bool):
        raise ValueError(f"position_ids must be an integer tensor, got {type(position_ids).__name__}"
                         + (f" of {position_ids.dtype}" if isinstance(position_ids, Tensor) else ""))
    if tuple(position_ids.shape) not in (tuple(tokens.shape[1:]), tuple(tokens.shape)):
        raise ValueError(f"position_ids must be shaped [pos] = [{tokens.shape[1]}] or [batch, pos] = "
                         f"{list(tokens.shape)}, got {list(position_ids.shape)}")
    if position_ids.numel() and int(position_ids.min()) < 0:
        raise ValueError(f"position_ids must be >= 0, got {int(position_ids.min())}")
    if cfg.positional_embedding_type == "standard" and position_ids.numel() and int(position_ids.max()) >= cfg.n_ctx:
        raise ValueError(f"position_ids must be in 0..{cfg.n_ctx - 1} for a learned position table of n_ctx="
                         f"{cfg.n_ctx} rows, got {int(position_ids.max())}")
    return position_ids.long().to(tokens.device)


def build(cfg: VariantConfig) -> HookedTransformer:
    """A freshly initialised model for `cfg` (weights depend only on `cfg.seed`); a model whose
    weights cannot fit the free memory is refused first (`config.check_memory`).

    Args:
        cfg: the variant's configuration (`variant_config` makes one from a name).

    Returns:
        A `HookedTransformer` with `cfg.seed`'s initial weights, on `cfg.device`.
    """
    check_memory(cfg)
    return HookedTransformer(cfg)

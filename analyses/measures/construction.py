"""Cells of an intervention that the architecture fixes, whatever the weights.

Some cells of a position-swap or activation-patching table cannot show anything about what a
model learned: their value follows from the architecture alone. Reporting them as evidence
(a swap that "has no effect", a patch that "restores nothing") reads the wiring diagram, not
the model. The rules below say which cells those are, from the config only: positional
encoding, attention direction, number of blocks and residual cuts.

Two facts carry every rule. (1) Everything in a block except attention acts on each position
separately (LayerNorm, MLP, residual additions and cuts, unembedding), so it commutes with
any permutation of positions and never moves information between them. (2) Attention without
positional information inside it (NoPE, or learned/sinusoidal PE, which is added once at the
embedding) computes each query's output from the query vector and the *set* of visible key
vectors: permuting the keys it can see changes nothing. Rotary attention re-injects position in
every layer, so (2) does not hold for it. A causal query at q sees keys 0..q.

**Position swap** (exchange the residual vectors of positions i < j at one site; read the
output at q ∉ {i, j}). Let m be the number of attention layers after the site. The output at q
is unchanged for every weight setting when: q < i under a causal mask (q never sees i or j);
m = 0 (only per-position work follows); bidirectional attention without rotary (the whole
network is permutation-equivariant from the site on, so columns other than i, j are
unchanged); or a causal mask, no rotary, m = 1 and q > j (the one attention layer sees the
two swapped vectors as a set, and nothing after it mixes positions). Otherwise the swap can
change the output: with m ≥ 2 under a causal mask, the columns between i and j see a
different prefix, and the second attention layer reads them. A swap is also fixed the other
way, the answer *following* it, when it is a token swap (`swap_is_token_swap`): at the stream
entering block 0 of a model that adds no positional embedding there (NoPE, rotary), the
swapped stream is exactly the digit-swapped prompt's.

**Activation patching** (copy the clean run's activation at one (site, layer, position p) into
the corrupted run; read the first answer digit at the last prompt position q). Call a
position *inert* at a site when patching it there cannot matter: either no attention layer
follows and it is not q (nothing reads it), or its clean and corrupted activations are equal
by construction: before any attention at a position whose token is unchanged; under a causal
mask before the first changed position; and, for NoPE when the corruption only permutes
tokens among the changed positions, at every unchanged position when attention is
bidirectional, and at positions after the last changed one up to the output of the first
attention layer when it is causal. A cell is fixed at 0 when its own position is inert, and at
1 when the patch makes the whole residual stream at p clean (a `resid_*` site; a sublayer
output whose residual connection is cut; an attention output whose input at p is already
equal in both runs) and every other position is inert: the patched run is then the clean run.

`tests/test_construction.py` checks every rule on random weights: cells claimed fixed change by
nothing beyond float rounding, and the others do change.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from poslens.variants.config import VariantConfig

SITE_KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
_SITE = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|attn_out|resid_mid|mlp_out|resid_post)")


def parse_site(site: str) -> tuple[str, int]:
    """`(kind, layer)` of a hook name: `embed` (block 0's `resid_pre`) or `blocks.{l}.hook_{kind}`."""
    if site == "embed":
        return "resid_pre", 0
    match = _SITE.fullmatch(site)
    if match is None:
        raise ValueError(f"unknown site {site!r}: expected 'embed' or 'blocks.<l>.hook_<kind>' with kind in "
                         f"{list(SITE_KINDS)}")
    return match[2], int(match[1])


def attention_layers_before(kind: str, layer: int) -> int:
    """How many attention layers have run when the stream reaches (`kind`, `layer`)."""
    if kind not in SITE_KINDS:
        raise ValueError(f"unknown site kind {kind!r}; allowed: {list(SITE_KINDS)}")
    return layer if kind == "resid_pre" else layer + 1


def _check(cfg: VariantConfig, kind: str, layer: int) -> int:
    """Attention layers after (`kind`, `layer`), once the layer is checked against the config."""
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} is outside the model's layers 0..{cfg.n_layers - 1}")
    return cfg.n_layers - attention_layers_before(kind, layer)


def _sees_a_set(cfg: VariantConfig) -> bool:
    """Whether attention sees its keys as a set (no rotary position inside attention)."""
    return cfg.positional_embedding_type != "rotary"


def swap_fixed(cfg: VariantConfig, site: str, positions: tuple[int, int], readout: int) -> bool:
    """Whether exchanging the residual vectors of `positions` at `site` (a hook name) leaves the
    output at position `readout` unchanged for every weight setting (module docstring)."""
    i, j = sorted(positions)
    if i == j or i < 0:
        raise ValueError(f"swap positions must be two distinct positions >= 0, got {positions}")
    causal = cfg.attention_dir == "causal"
    after = _check(cfg, *parse_site(site))
    if readout in (i, j):
        return False
    if (causal and readout < i) or after == 0:
        return True
    if not _sees_a_set(cfg):
        return False
    return not causal or (after == 1 and readout > j)


def swap_is_token_swap(cfg: VariantConfig, site: str) -> bool:
    """Whether exchanging two positions' vectors at `site` is exactly running the prompt with
    those two tokens exchanged: at the stream entering block 0 when no positional embedding is
    added to it (NoPE, or rotary, which adds position inside attention only). The answer then
    follows the swap by construction, whatever the weights.

    Args:
        cfg: the model's config.
        site: a residual hook name (`embed` or `blocks.L.hook_<kind>`).

    Returns:
        Whether the swap there is a token swap.
    """
    kind, layer = parse_site(site)
    return kind == "resid_pre" and layer == 0 and cfg.positional_embedding_type in ("none", "rotary")


def swap_readout_fixed(cfg: VariantConfig, swap_site: str, site: str) -> bool:
    """Whether, after a swap at `swap_site`, each swapped column at the later `site` is exactly
    the unswapped vector of the position it came from (so a probe there reads that position by
    construction): no attention layer lies between the two sites, or the model is
    permutation-equivariant from `swap_site` on (bidirectional, no rotary)."""
    between = _check(cfg, *parse_site(swap_site)) - _check(cfg, *parse_site(site))
    if between < 0:
        raise ValueError(f"site {site!r} comes before the swap site {swap_site!r}")
    return between == 0 or (cfg.attention_dir == "bidirectional" and _sees_a_set(cfg))


def patch_fixed(cfg: VariantConfig, kind: str, layer: int, position: int, n_positions: int,
                changed: Collection[int], permutation: bool, readout: int | None = None) -> bool:
    """Whether patching the clean activation at (`kind`, `layer`, `position`) into the corrupted
    run gives a restoration value fixed by the architecture (exactly 0 or 1) when the output is
    read at position `readout` of `n_positions` (default the last; a teacher-forced answer digit
    is read earlier). `changed`: the positions whose tokens the corruption may change;
    `permutation`: whether the corrupted prompts only permute tokens among those positions.
    Under a causal mask a position after the readout is never read."""
    after = _check(cfg, kind, layer)
    before = attention_layers_before(kind, layer)
    readout = n_positions - 1 if readout is None else readout
    causal = cfg.attention_dir == "causal"
    changed = set(changed)

    def same(where: int, attention_layers: int = before) -> bool:
        return _same_in_both_runs(cfg, attention_layers, where, changed, permutation)

    def unread(where: int) -> bool:
        return (after == 0 and where != readout) or (causal and where > readout)

    if unread(position) or same(position):
        return True  # the patch changes nothing the readout depends on: 0
    cut_attn, cut_mlp = cfg.cuts(layer)
    # after the patch the residual stream at `position` is the clean run's ...
    clean_there = kind.startswith("resid") or (kind == "mlp_out" and cut_mlp) or (
        kind == "attn_out" and (cut_attn or same(position, layer)))
    # ... and if every other position the readout depends on is too, the patched run is the clean run: 1
    return clean_there and all(unread(other) or same(other) for other in range(n_positions) if other != position)


def _same_in_both_runs(cfg: VariantConfig, before: int, position: int, changed: set[int], permutation: bool) -> bool:
    """Whether the clean and corrupted activations at `position`, after `before` attention
    layers, are equal for every weight setting."""
    if not changed or (position not in changed and before == 0):
        return True
    causal = cfg.attention_dir == "causal"
    if causal and position < min(changed):
        return True
    if cfg.positional_embedding_type != "none" or not permutation or position in changed:
        return False
    return not causal or (before <= 1 and position > max(changed))

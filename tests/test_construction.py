"""The fixed-by-construction derivation, checked on random weights: cells claimed fixed change by
nothing beyond float64 rounding; every other cell changes."""

import pytest
import torch

from poslens.analyses.measures.construction import (
    parse_site,
    patch_fixed,
    swap_fixed,
    swap_readout_fixed,
)
from poslens.analyses.measures.swaps import exchange
from poslens.hooks import hook_name, residual_sites
from poslens.variants import build

ROUNDING, VISIBLE = 1e-10, 1e-7  # float64: a fixed cell moves by rounding only; a free one by far more
N_POS = 8
VARIANTS = [("nope-causal", 1), ("nope-causal", 2), ("nope-causal", 3), ("nope-bidirectional", 2),
            ("learned-causal", 2), ("sinusoidal-bidirectional", 2), ("rotary-causal", 2), ("rotary-bidirectional", 1),
            ("nope-causal+cut0", 3), ("nope-causal+cut1:mlp", 2)]


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{name}-{layers}" for name, layers in VARIANTS])
def model(request, tiny):
    name, layers = request.param
    return build(tiny(name, n_layers=layers, dtype=torch.float64, init_std=0.5)).eval()


def tokens(seed: int, n: int = 12) -> torch.Tensor:
    return torch.randint(10, (n, N_POS), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_swap_cells_claimed_fixed_are_fixed_and_no_others(model):
    prompts = tokens(0)
    reference = model(prompts)
    n_fixed = 0
    for site in residual_sites(model):
        for positions in ((1, 3), (0, 5), (2, 6), (4, 5)):
            with model.hooks(fwd_hooks=[(hook_name(site), exchange(positions))]):
                delta = (model(prompts) - reference).abs().amax(dim=(0, 2))  # per readout position
            for readout in range(N_POS):
                fixed = swap_fixed(model.cfg, site, positions, readout)
                n_fixed += fixed
                assert (delta[readout] <= ROUNDING) if fixed else (delta[readout] > VISIBLE), \
                    (site, positions, readout, fixed, float(delta[readout]))
    assert n_fixed > 0


def test_swap_at_the_last_blocks_input_is_fixed_for_nope_causal(tiny):
    # the toy case: no answer position can move when the swap enters the last block
    cfg = tiny("nope-causal", n_layers=4)
    assert swap_fixed(cfg, "blocks.2.hook_resid_post", (0, 2), 7)
    assert not swap_fixed(cfg, "blocks.1.hook_resid_post", (0, 2), 7)
    assert swap_fixed(tiny("learned-causal", n_layers=1), "embed", (0, 2), 7)
    assert not swap_fixed(tiny("rotary-causal", n_layers=4), "blocks.2.hook_resid_post", (0, 2), 7)
    assert all(swap_fixed(tiny("nope-bidirectional", n_layers=4), site, (0, 2), 7)
               for site in ("embed", "blocks.0.hook_resid_mid", "blocks.3.hook_resid_post"))


@torch.no_grad()
def test_swap_readout_cells_claimed_fixed_carry_the_origin_vector(model):
    prompts = tokens(1)
    sites = residual_sites(model)
    _, cache = model.run_with_cache(prompts)
    i, j = 1, 4
    for swap_index, swap_site in enumerate(sites):
        with model.hooks(fwd_hooks=[(hook_name(swap_site), exchange((i, j)))]):
            _, swapped = model.run_with_cache(prompts)
        for site in sites[swap_index:]:
            name = hook_name(site)
            moved = (swapped[name][:, [i, j]] - cache[name][:, [j, i]]).abs().max()
            fixed = swap_readout_fixed(model.cfg, swap_site, site)
            assert (moved <= ROUNDING) if fixed else (moved > VISIBLE), (swap_site, site, float(moved))


def corrupted_pair(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Clean prompts and a corruption: `swap` exchanges positions 2 and 5 (a permutation, the two
    tokens differ in every row), `replace` changes the token at position 3 (not a permutation)."""
    clean = tokens(seed)
    corrupted = clean.clone()
    if kind == "swap":
        clean[:, 5] = (clean[:, 2] + 1 + clean[:, 5] % 9) % 10  # never equal to clean[:, 2]
        corrupted = clean[:, [0, 1, 5, 3, 4, 2, 6, 7]]
        return clean, corrupted, [2, 5]
    corrupted[:, 3] = (clean[:, 3] + 1) % 10
    return clean, corrupted, [3]


@torch.no_grad()
@pytest.mark.parametrize("readout", [N_POS - 1, 4])  # 4: a teacher-forced answer digit, read before the end
@pytest.mark.parametrize("kind", ["swap", "replace"])
def test_patch_cells_claimed_fixed_are_fixed_and_no_others(model, kind, readout):
    clean, corrupted, changed = corrupted_pair(kind, seed=2)
    _, cache = model.run_with_cache(clean)
    clean_out, corrupted_out = model(clean)[:, readout], model(corrupted)[:, readout]
    for site_kind in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
        for layer in range(model.cfg.n_layers):
            name = f"blocks.{layer}.hook_{site_kind}"
            for position in range(N_POS):
                def patch(activation, hook, name=name, position=position):
                    activation[:, position] = cache[name][:, position]
                    return activation

                with model.hooks(fwd_hooks=[(name, patch)]):
                    out = model(corrupted)[:, readout]
                to_corrupted = float((out - corrupted_out).abs().max())
                to_clean = float((out - clean_out).abs().max())
                fixed = patch_fixed(model.cfg, site_kind, layer, position, N_POS, changed, kind == "swap", readout)
                cell = (site_kind, layer, position, to_corrupted, to_clean)
                if fixed:
                    assert min(to_corrupted, to_clean) <= ROUNDING, cell
                else:
                    assert min(to_corrupted, to_clean) > VISIBLE, cell


def test_parse_site_and_errors(tiny):
    assert parse_site("embed") == ("resid_pre", 0)
    assert parse_site("blocks.3.hook_mlp_out") == ("mlp_out", 3)
    with pytest.raises(ValueError, match=r"unknown site 'blocks.0.attn'"):
        parse_site("blocks.0.attn")
    cfg = tiny("nope-causal")
    with pytest.raises(ValueError, match=r"layer 2 is outside the model's layers 0..1"):
        swap_fixed(cfg, "blocks.2.hook_resid_mid", (0, 1), 5)
    with pytest.raises(ValueError, match=r"two distinct positions"):
        swap_fixed(cfg, "embed", (3, 3), 5)
    with pytest.raises(ValueError, match=r"comes before the swap site"):
        swap_readout_fixed(cfg, "blocks.1.hook_resid_mid", "blocks.0.hook_resid_post")

"""Linear probes for positional information, scikit-learn-style, over plain tensors.

Every probe fits all sites (hook points) of a model at once: `X` is `[site, n_tokens, d_model]`
(or one site's `[n_tokens, d_model]`), labels are `[n_tokens]`, inputs may be torch tensors or
numpy arrays and outputs are torch tensors. Features are standardised per site.

- `PositionProbe`: multinomial logistic regression, token → class (position, role, digit…).
- `RidgePositionProbe`: ridge regression, token → position as a number (R², MAE).
- `split_by_sequence`, `flatten_tokens`, `split_tokens`: train/test splits that never share a sequence.
- `control_labels`, `selectivity`, `token_identity_baseline` (and the predictions behind it,
  `token_identity_predictions`), `bag_of_prefix_predictions` (what one causal NoPE layer can
  compute from content), `chance_accuracy`, `random_guess_mad`: what an accuracy has to beat.

Working memory is bounded whatever the number of sites, tokens and classes: a fit takes sites in
groups within `memory_limit` and evaluates its logits in chunks (`probes.base`, `probes.logistic`).

Probes fit on the device their activations are on, `save(path)` / `load(path)` a fitted probe
(one safetensors file, settings as JSON; `probes.saving`), and are scikit-learn estimators
(`BaseEstimator`: `clone`, `GridSearchCV`, `Pipeline` see one site's 2-D `X`; `probes.base`).

Depends on torch, numpy, einops and scikit-learn; the data come from `hooks` via the caller.
"""

from poslens.probes.controls import (
    bag_of_prefix_features,
    bag_of_prefix_predictions,
    chance_accuracy,
    control_labels,
    random_guess_mad,
    selectivity,
    token_identity_baseline,
    token_identity_predictions,
)
from poslens.probes.inputs import NotFittedError
from poslens.probes.logistic import PositionProbe
from poslens.probes.ridge import RidgePositionProbe
from poslens.probes.splits import flatten_tokens, split_by_sequence, split_tokens

__all__ = [
    "NotFittedError",
    "PositionProbe",
    "RidgePositionProbe",
    "bag_of_prefix_features",
    "bag_of_prefix_predictions",
    "chance_accuracy",
    "control_labels",
    "flatten_tokens",
    "random_guess_mad",
    "selectivity",
    "split_by_sequence",
    "split_tokens",
    "token_identity_baseline",
    "token_identity_predictions",
]

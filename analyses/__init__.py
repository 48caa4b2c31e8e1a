"""Analyses in two layers, plus what they share.

- `measures`: pure functions from a model and tokens (or captured activations) to tidy tables:
  invariance, the probe sweep, correlation structure, position geometry, activation patching,
  position swaps and residual cuts (and which of their cells the architecture fixes), attention
  entropy, induction scores; what a model is (its residual sites and per-layer positional
  encoding) and the token sequences a language model is probed on.
- `experiments`: the studies that train, call measures and write `tables/`, `figures/`,
  `summary.md` and `report.html` (`reproduce`, `dynamics`, `induction`), with their sizes in
  `presets`. Each declares its units, figures and report to `study`, the one skeleton that
  locks, runs, merges, commits and draws them. No experiment imports another.
- Shared: `stats` (tests over seeds and the verdict rule, on scipy), `tables` (the tidy schemas and the one multi-format export), `figures` (plotly
  figures drawn from tables, and the one way to write one), `runs` (reading trained runs back).
"""

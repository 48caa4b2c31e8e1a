"""The sizes of every experiment in one place: models, training lengths and analysis sample sizes.

`reproduce` and `dynamics` on addition read `PRESETS`; the Markov in-context-learning runs
read the `MARKOV_*` settings. What each preset costs is measured in `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReproducePreset:
    """Model size, training length and precision, analysis sizes of one `reproduce` run, and the
    seeds per variant a study of this size trains unless told otherwise."""

    n_layers: int
    d_model: int
    d_head: int
    steps: int
    batch_size: int = 256
    n_probe_sequences: int = 1000
    n_patch_sequences: int = 64
    seeds: int = 1
    precision: str = "float32"

    @property
    def model(self) -> dict[str, int]:
        """The `variant_config(...)` size overrides."""
        return {"n_layers": self.n_layers, "d_model": self.d_model, "d_head": self.d_head}

    @property
    def training(self) -> dict[str, int | str]:
        """The `train(...)` settings besides the seed."""
        return {"steps": self.steps, "batch_size": self.batch_size, "precision": self.precision}


PRESETS = {
    "tiny": ReproducePreset(n_layers=2, d_model=32, d_head=8, steps=40, batch_size=32, n_probe_sequences=80,
                            n_patch_sequences=8),
    # The main job's default: the quick preset's models and training with the 5 seeds every claim's test
    # needs, measured on 500 held-out sums (patching 32). A cheaper recipe was tried and rejected: at
    # d_model 32 in bfloat16, NoPE-causal failed to learn in 2 of 5 seeds (benchmarks/results/main-job.md).
    "standard": ReproducePreset(n_layers=4, d_model=64, d_head=16, steps=2500, n_probe_sequences=500,
                                n_patch_sequences=32, seeds=5),
    "quick": ReproducePreset(n_layers=4, d_model=64, d_head=16, steps=2500),
    # The paper's figures show layers 1, 3 and 6, hence 6 blocks; width, heads and steps are our choice
    # (the paper's text available to us states none of them; docs/background.md).
    "paper": ReproducePreset(n_layers=6, d_model=128, d_head=32, steps=6000),
}

DEFAULT_PRESET = "standard"
"""What `poslens reproduce` runs with no options."""
DEFAULT_SEEDS = PRESETS[DEFAULT_PRESET].seeds
"""Seeds per variant of the default `poslens reproduce`: every primary claim of `analyses.plan.REPRODUCE_PLAN`
is decidable there under Holm's correction (`tests/test_plan.py`)."""

REPRODUCE_VARIANTS = ("nope-causal", "nope-causal+cut0", "nope-causal+cut0,1", "learned-causal", "nope-bidirectional")

DYNAMICS_TASKS = ("addition", "markov")
CONSTANT_LR = "@constant-lr"
"""The suffix of a dynamics run's label when it trained under a constant learning rate (the control)."""
DYNAMICS_SEQUENCES = {"addition": 1000, "markov": 200}
"""Held-out sequences `dynamics` measures by default (markov evaluation greedy-decodes every target, so fewer)."""

MARKOV_VARIANT = "rotary-causal"
"""Recommended variant: rotary makes attention scores depend on the relative offset q − k, which
is what a copier needs (Chen et al. give layer 1 relative positional embeddings). NoPE has
to derive offsets from the causal mask alone; learned absolute positions must learn every
offset at every position separately."""

MARKOV_MODEL: dict[str, Any] = {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_head": 16, "d_mlp": 256}
"""`variant_config(variant, task=task, **MARKOV_MODEL)`: Chen et al.'s two layers, with 4 heads per layer
(room for one copier per parent of the default 2-parent task, and spares)."""

MARKOV_TASK: dict[str, Any] = {"targets": "all", "n_test": 200}
"""`MarkovICL(**MARKOV_TASK)`: the default data (vocab 3, length 100, 2 parents, alpha 0.1), with
every drawn token a target. Chen et al. train on the last token only (`MarkovICL()`), but with
`MARKOV_TRAINING`'s budget that stays between the in-context unigram and bigram losses
(benchmarks/RESULTS.md); `n_test` is smaller because evaluation greedy-decodes every target."""

MARKOV_TRAINING: dict[str, Any] = {"steps": 3000, "batch_size": 64, "lr": 3e-3, "warmup_steps": 100,
                                   "eval_every": 1000, "checkpoint_every": 500}
"""`train(cfg, MarkovICL(**MARKOV_TASK), out_dir=..., **MARKOV_TRAINING)`."""

SHIFTED_VARIANTS = ("nope-causal", "learned-causal")
"""Also trained on the shifted format, where position and role come apart (`Addition(max_shift=MAX_SHIFT)`)."""
MAX_SHIFT = 4
SHIFTED = "@shifted"
"""The suffix of a variant's name in the tables when it was trained and measured on the shifted format."""
LEARNED_CRITERION = 0.99
"""Held-out exact match at the end of training at or above which a run counts as having learned the task."""

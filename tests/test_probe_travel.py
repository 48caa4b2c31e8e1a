"""Probes that travel: saved and loaded (safetensors + JSON settings), fitted on the activations'
device, and used as scikit-learn estimators (clone, GridSearchCV, Pipeline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from poslens.probes import NotFittedError, PositionProbe, RidgePositionProbe
from poslens.probes.saving import DIGEST_KEY, SETTINGS_KEY
from poslens.variants.storage import content_digest, read_tensors

N_CLASSES, D_MODEL = 6, 16


def planted(n_tokens: int = 600, n_sites: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`[site, n_tokens, d_model]` activations whose first dimensions mark the class, more noisily at
    later sites, and the classes `[n_tokens]`."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n_tokens) % N_CLASSES
    signal = torch.nn.functional.one_hot(y, D_MODEL).float() * 3
    X = torch.stack([signal + (1 + site) * torch.randn(n_tokens, D_MODEL, generator=generator)
                     for site in range(n_sites)])
    return X, y


@pytest.mark.parametrize("make", [lambda: PositionProbe(C=0.3, max_iter=80), lambda: RidgePositionProbe(alpha=2.0),
                                  lambda: PositionProbe(n_classes=9, dtype=torch.float64)])
def test_a_saved_probe_loads_and_predicts_identically(tmp_path, make):
    X, y = planted()
    probe = make().fit(X[:, :400], y[:400])
    path = probe.save(tmp_path / "probe.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["probe.safetensors"]  # written atomically, no leftovers
    loaded = type(probe).load(path)
    assert loaded.get_params() == probe.get_params() and loaded.n_sites_ == 2 and loaded.n_features_in_ == D_MODEL
    assert torch.equal(loaded.predict(X[:, 400:]), probe.predict(X[:, 400:]))
    assert torch.equal(loaded.score(X[:, 400:], y[400:]), probe.score(X[:, 400:], y[400:]))
    if isinstance(probe, PositionProbe):
        assert torch.equal(loaded.predict_proba(X[:, 400:]), probe.predict_proba(X[:, 400:]))
        assert torch.equal(loaded.n_iter_, probe.n_iter_) and len(loaded.classes_) == len(probe.classes_)
    _, metadata = read_tensors(path)
    assert '"class": "' + type(probe).__name__ + '"' in metadata[SETTINGS_KEY]  # the settings are plain JSON


def test_loading_refuses_what_does_not_match(tmp_path):
    X, y = planted()
    path = PositionProbe(C=0.5).fit(X, y).save(tmp_path / "probe.safetensors")
    with pytest.raises(ValueError, match="holds a PositionProbe, not a RidgePositionProbe: load it with "
                                         "PositionProbe.load"):
        RidgePositionProbe.load(path)
    with pytest.raises(ValueError, match=r"was saved with C=0.5 \(expected 1.0\), n_features_in=16 \(expected 768\)"):
        PositionProbe.load(path, C=1.0, n_features_in=768)
    with pytest.raises(ValueError, match=r"cannot check \['alpha'\]"):
        PositionProbe.load(path, alpha=1.0)
    tensors, metadata = read_tensors(path)

    tampered = {**tensors, "weight_": tensors["weight_"] + 1}  # weights changed, digest kept
    save_file(tampered, tmp_path / "tampered.safetensors", metadata)
    with pytest.raises(ValueError, match="is corrupted"):
        PositionProbe.load(tmp_path / "tampered.safetensors")

    short = {**tensors, "bias_": tensors["bias_"][:1]}  # consistent digest, wrong shape for 2 sites
    settings = {SETTINGS_KEY: metadata[SETTINGS_KEY]}
    save_file(short, tmp_path / "short.safetensors", {**settings, DIGEST_KEY: content_digest(short, settings)})
    with pytest.raises(ValueError, match=r"bias_ is \[1, 6\] torch.float32 but the saved settings call for \[2, 6\]"):
        PositionProbe.load(tmp_path / "short.safetensors")

    save_file({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a saved poslens probe"):
        PositionProbe.load(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError):
        PositionProbe.load(tmp_path / "missing.safetensors")
    with pytest.raises(NotFittedError, match="not fitted yet; fit it before saving"):
        PositionProbe().save(tmp_path / "unfitted.safetensors")
    assert set(load_file(path)) == {"mean_", "scale_", "classes_", "weight_", "bias_", "n_iter_"}


def test_scikit_learn_estimators():
    from sklearn.base import BaseEstimator, clone, is_classifier, is_regressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    assert isinstance(PositionProbe(), BaseEstimator) and is_classifier(PositionProbe())
    assert is_regressor(RidgePositionProbe())
    probe = clone(PositionProbe(C=0.2)).set_params(max_iter=50)
    assert probe.get_params()["C"] == 0.2 and probe.get_params()["max_iter"] == 50
    X, y = planted(n_sites=1)
    pipeline = make_pipeline(StandardScaler(), PositionProbe()).fit(X[0, :400].numpy(), y[:400].numpy())
    assert pipeline.score(X[0, 400:].numpy(), y[400:].numpy()) > 0.8


def test_grid_search_over_C_matches_a_manual_cross_validation():
    """The scikit-learn view is one site's 2-D X: GridSearchCV fits and scores exactly as a hand-written loop."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    X, y = planted(n_sites=2)
    X, y = X[1].numpy(), y.numpy()  # the noisier site, where C matters
    grid = [0.001, 0.1, 10.0]
    search = GridSearchCV(PositionProbe(), {"C": grid}, cv=StratifiedKFold(3)).fit(X, y)
    for C, mean in zip(grid, search.cv_results_["mean_test_score"]):
        manual = [PositionProbe(C=C).fit(X[train], y[train]).score(X[test], y[test])
                  for train, test in StratifiedKFold(3).split(X, y)]
        assert mean == pytest.approx(np.mean(manual), abs=1e-12)
    assert search.best_params_["C"] == grid[int(np.argmax(search.cv_results_["mean_test_score"]))]
    assert search.best_estimator_.n_sites_ == 1 and search.best_score_ > 1 / N_CLASSES + 0.2


def test_probes_fit_where_the_activations_are(tmp_path):
    """On the CPU everything stays there; `to` moves a fitted probe (here to the CPU it is on)."""
    X, y = planted()
    probe = PositionProbe().fit(X, y)
    assert probe.weight_.device.type == "cpu" and probe.predict(X.numpy()).device.type == "cpu"
    assert probe.to("cpu") is probe


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this torch build sees none)")
def test_probes_fit_and_score_on_cuda(tmp_path):
    X, y = planted(n_tokens=3000)
    train, test = slice(0, 2400), slice(2400, None)
    for make in (lambda: PositionProbe(dtype=torch.float64), lambda: RidgePositionProbe()):
        on_cpu = make().fit(X[:, train], y[train])
        on_gpu = make().fit(X[:, train].cuda(), y[train].cuda())
        assert on_gpu.weight_.device.type == "cuda" and on_gpu.mean_.device.type == "cuda"
        predicted = on_gpu.predict(X[:, test].cuda())
        assert predicted.device.type == "cuda"
        assert torch.allclose(on_gpu.weight_.cpu(), on_cpu.weight_, atol=1e-4)  # the same solver, the same optimum
        assert torch.allclose(on_gpu.score(X[:, test].cuda(), y[test]).cpu(), on_cpu.score(X[:, test], y[test]),
                              atol=0.01)
        loaded = type(on_gpu).load(on_gpu.save(tmp_path / "gpu.safetensors"))  # saved from the GPU, loaded on the CPU
        assert torch.equal(loaded.predict(X[:, test]), predicted.cpu())

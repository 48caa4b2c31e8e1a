"""Tests for `probes`: accuracy on data with known structure, agreement with scikit-learn,
batching and determinism, splits and controls, and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from poslens.probes import (
    NotFittedError,
    PositionProbe,
    RidgePositionProbe,
    chance_accuracy,
    control_labels,
    flatten_tokens,
    random_guess_mad,
    selectivity,
    split_by_sequence,
    split_tokens,
    token_identity_baseline,
    token_identity_predictions,
)

N_POSITIONS, D_MODEL = 12, 32


@pytest.fixture(autouse=True)
def one_thread():
    """These fits are small, where waking a second thread costs more than it saves (and, on a
    2-core machine busy with other work, far more). Runs after conftest's thread setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def positional_activations(noise: tuple[float, ...], n_sequences: int = 200, seed: int = 0) -> torch.Tensor:
    """`[site, sequence, position, d_model]`: a fixed random direction per position plus Gaussian
    noise of the given scale at each site."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(N_POSITIONS, D_MODEL, generator=generator)
    return torch.stack([
        directions + scale * torch.randn(n_sequences, N_POSITIONS, D_MODEL, generator=generator) for scale in noise
    ])


def split_data(activations: torch.Tensor, seed: int = 0):
    (X_train, y_train), (X_test, y_test) = split_tokens(activations, split_by_sequence(activations.shape[1], seed=seed))
    return X_train, y_train, X_test, y_test


@pytest.fixture(scope="module")
def three_sites():
    """Sites with low, medium and overwhelming noise, split by sequence."""
    return split_data(positional_activations(noise=(0.5, 3.0, 12.0)))


# ---------------------------------------------------------------- PositionProbe: accuracy


def test_position_is_read_off_the_low_noise_site(three_sites):
    X_train, y_train, X_test, y_test = three_sites
    accuracy = PositionProbe().fit(X_train, y_train).score(X_test, y_test)
    assert accuracy.shape == (3,)
    assert accuracy[0] >= 0.99
    assert accuracy[0] > accuracy[1] > accuracy[2]


def test_pure_noise_is_at_chance():
    noise = torch.randn(1, 600, N_POSITIONS, D_MODEL, generator=torch.Generator().manual_seed(1))
    X_train, y_train, X_test, y_test = split_data(noise)
    accuracy = PositionProbe().fit(X_train, y_train).score(X_test, y_test)
    assert len(y_test) >= 1800
    assert abs(accuracy[0].item() - 1 / N_POSITIONS) < 0.05


def test_two_dimensional_input_drops_the_site_axis(three_sites):
    X_train, y_train, X_test, y_test = three_sites
    probe = PositionProbe().fit(X_train[0], y_train)
    assert isinstance(probe.score(X_test[0], y_test), float)
    assert probe.predict(X_test[0]).shape == (len(y_test),)
    probs = probe.predict_proba(X_test[0])
    assert probs.shape == (len(y_test), N_POSITIONS)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(y_test)))
    assert torch.equal(probs.argmax(-1), probe.predict(X_test[0]))


def test_numpy_inputs_give_the_same_fit_as_tensors(three_sites):
    X_train, y_train, X_test, y_test = three_sites
    from_tensors = PositionProbe().fit(X_train, y_train)
    from_arrays = PositionProbe().fit(X_train.numpy(), y_train.numpy())
    assert torch.equal(from_tensors.weight_, from_arrays.weight_)
    assert torch.equal(from_arrays.score(X_test.numpy(), y_test.numpy()), from_tensors.score(X_test, y_test))


def test_batched_fit_equals_fitting_each_site_alone(three_sites):
    """A site's solution does not depend on which other sites share the batch (up to rounding)."""
    X_train, y_train, X_test, _ = three_sites
    for dtype, atol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        batched = PositionProbe(dtype=dtype).fit(X_train, y_train)
        for site in range(3):
            alone = PositionProbe(dtype=dtype).fit(X_train[site], y_train)
            assert batched.n_iter_[site] == alone.n_iter_[0]
            torch.testing.assert_close(batched.weight_[site], alone.weight_[0], atol=atol, rtol=0)
            torch.testing.assert_close(batched.bias_[site], alone.bias_[0], atol=atol, rtol=0)
            assert torch.equal(batched.predict(X_test)[site], alone.predict(X_test[site]))


def test_fitting_twice_is_bitwise_identical(three_sites):
    X_train, y_train, _, _ = three_sites
    first, second = PositionProbe().fit(X_train, y_train), PositionProbe().fit(X_train, y_train)
    assert torch.equal(first.weight_, second.weight_)
    assert torch.equal(first.bias_, second.bias_)


def test_float64_and_float32_fits_agree(three_sites):
    X_train, y_train, X_test, y_test = three_sites
    single = PositionProbe().fit(X_train, y_train).score(X_test, y_test)
    double = PositionProbe(dtype=torch.float64).fit(X_train, y_train).score(X_test, y_test)
    assert (single - double).abs().max() <= 0.005


def test_agrees_with_scikit_learn(three_sites):
    import threadpoolctl  # scikit-learn's dependency; both come with the `bench` extra the test command installs
    from sklearn import linear_model as sklearn_linear
    from sklearn import preprocessing
    X_train, y_train, X_test, y_test = three_sites
    ours = PositionProbe(C=0.5).fit(X_train, y_train).score(X_test, y_test)
    for site in range(3):
        scaler = preprocessing.StandardScaler().fit(X_train[site].numpy())
        with threadpoolctl.threadpool_limits(1):
            reference = sklearn_linear.LogisticRegression(C=0.5, max_iter=1000).fit(
                scaler.transform(X_train[site].numpy()), y_train.numpy())
        theirs = reference.score(scaler.transform(X_test[site].numpy()), y_test.numpy())
        assert abs(ours[site].item() - theirs) <= 0.01


def test_few_tokens_per_class_use_plain_lbfgs_and_reach_the_same_optimum(monkeypatch):
    """Below `KRONECKER_MIN_TOKENS_PER_CLASS` the Kronecker preconditioner is dropped (it overshoots
    on nearly separable classes); both solvers reach the same optimum at a tight tolerance, and the
    default fit scores as scikit-learn's does."""
    import threadpoolctl
    from sklearn import linear_model as sklearn_linear
    from sklearn import preprocessing

    import poslens.probes.logistic as logistic

    X_train, y_train, X_test, y_test = split_data(positional_activations(noise=(2.0,), n_sequences=20))
    assert X_train.shape[1] < logistic.KRONECKER_MIN_TOKENS_PER_CLASS * N_POSITIONS
    Zt = torch.cat([X_train[0].T, torch.ones(1, X_train.shape[1])])[None]
    assert not logistic.SoftmaxLoss(Zt, y_train, N_POSITIONS, l2=1e-3).kronecker
    tight = {"tol": 1e-7, "max_iter": 2000, "dtype": torch.float64}
    plain, default = PositionProbe(**tight).fit(X_train, y_train), PositionProbe().fit(X_train, y_train)
    monkeypatch.setattr(logistic, "KRONECKER_MIN_TOKENS_PER_CLASS", 0)
    assert logistic.SoftmaxLoss(Zt, y_train, N_POSITIONS, l2=1e-3).kronecker
    kronecker = PositionProbe(**tight).fit(X_train, y_train)
    torch.testing.assert_close(plain.predict_proba(X_test), kronecker.predict_proba(X_test), atol=1e-4, rtol=0)
    scaler = preprocessing.StandardScaler().fit(X_train[0].numpy())
    with threadpoolctl.threadpool_limits(1):
        reference = sklearn_linear.LogisticRegression(max_iter=1000).fit(scaler.transform(X_train[0].numpy()),
                                                                         y_train.numpy())
    theirs = reference.score(scaler.transform(X_test[0].numpy()), y_test.numpy())
    assert abs(default.score(X_test, y_test).item() - theirs) <= 0.02


def test_scikit_learn_clone_and_params(three_sites):
    from sklearn.base import clone
    probe = PositionProbe(C=0.5, max_iter=50, dtype=torch.float64)
    copy = clone(probe)
    assert copy is not probe and copy.get_params() == probe.get_params()
    assert copy.get_params() == {"C": 0.5, "max_iter": 50, "tol": 1e-4, "n_classes": None, "dtype": torch.float64,
                                 "memory_limit": 2 * 1024**3}
    X_train, y_train, _, _ = three_sites
    probe.fit(X_train, y_train)
    assert not hasattr(clone(probe), "weight_")  # a clone is unfitted
    ridge = clone(RidgePositionProbe(alpha=3.0)).set_params(alpha=4.0)
    assert ridge.alpha == 4.0
    assert repr(ridge) == "RidgePositionProbe(alpha=4.0, dtype=torch.float64, memory_limit=2147483648)"
    with pytest.raises(ValueError, match=r"unknown parameters \['gamma'\] for PositionProbe; allowed: \['C', "):
        probe.set_params(gamma=1)
    with pytest.raises(ValueError, match=r"C must be a finite number > 0, got -1"):
        probe.set_params(C=-1).fit(X_train, y_train)  # validated at fit, as in scikit-learn


def test_stronger_regularisation_shrinks_the_weights(three_sites):
    X_train, y_train, _, _ = three_sites
    loose, tight = PositionProbe(C=10.0).fit(X_train, y_train), PositionProbe(C=0.01).fit(X_train, y_train)
    assert (tight.weight_.flatten(1).norm(dim=1) < loose.weight_.flatten(1).norm(dim=1)).all()


def test_constant_and_duplicated_features_are_harmless(three_sites):
    X_train, y_train, X_test, y_test = three_sites

    def augment(X: torch.Tensor) -> torch.Tensor:
        return torch.cat([X, torch.full_like(X[..., :1], 5.0), X[..., :2]], -1)

    probe = PositionProbe().fit(augment(X_train), y_train)
    assert probe.scale_[..., D_MODEL].eq(1).all()
    assert torch.isfinite(probe.weight_).all()
    plain = PositionProbe().fit(X_train, y_train).score(X_test, y_test)
    assert (probe.score(augment(X_test), y_test) - plain).abs().max() <= 0.01
    ridge = RidgePositionProbe().fit(augment(X_train), y_train)
    assert torch.isfinite(ridge.score(augment(X_test), y_test)).all()


def test_other_labels_and_absent_classes():
    """Any per-token label works; a class missing from training is never predicted."""
    generator = torch.Generator().manual_seed(2)
    roles = torch.tensor([0, 0, 2, 2, 2, 5]).repeat(300)  # classes 1, 3, 4 never occur
    X = torch.nn.functional.one_hot(roles, 8).float() * 4 + torch.randn(len(roles), 8, generator=generator)
    probe = PositionProbe().fit(X, roles)
    assert torch.equal(probe.classes_, torch.arange(6))
    probs = probe.predict_proba(X)
    assert probs.shape == (len(roles), 6)
    assert probs[:, [1, 3, 4]].max() == 0
    assert set(probe.predict(X).unique().tolist()) <= {0, 2, 5}
    assert probe.score(X, roles) > 0.95
    assert PositionProbe(n_classes=9).fit(X, roles).predict_proba(X).shape == (len(roles), 9)


def test_unconverged_fit_warns(three_sites):
    X_train, y_train, _, _ = three_sites
    with pytest.warns(RuntimeWarning, match="max_iter=2"):
        PositionProbe(max_iter=2).fit(X_train, y_train)


# ---------------------------------------------------------------- RidgePositionProbe


def test_ridge_recovers_an_exactly_linear_position():
    generator = torch.Generator().manual_seed(3)
    position = torch.arange(N_POSITIONS).repeat(100).double()
    X = torch.randn(2, len(position), D_MODEL, generator=generator, dtype=torch.float64)
    X[:, :, 0] = X[:, :, 1] * 0.5 + position * torch.tensor([[2.0], [-7.0]])
    probe = RidgePositionProbe(alpha=1e-6).fit(X, position)
    assert (probe.score(X, position) > 1 - 1e-9).all()
    assert (probe.mae(X, position) < 1e-3).all()


def test_ridge_on_noise_explains_nothing():
    noise = torch.randn(1, 400, N_POSITIONS, D_MODEL, generator=torch.Generator().manual_seed(4))
    X_train, y_train, X_test, y_test = split_data(noise)
    probe = RidgePositionProbe().fit(X_train, y_train)
    assert probe.score(X_test, y_test)[0] <= 0.1
    assert probe.mae(X_test, y_test)[0] > 0.9 * 3.0  # the mean's MAE is 3.0 for 12 uniform positions


def test_ridge_single_site_and_error_ordering(three_sites):
    X_train, y_train, X_test, y_test = three_sites
    probe = RidgePositionProbe().fit(X_train, y_train)
    r2, mae = probe.score(X_test, y_test), probe.mae(X_test, y_test)
    assert r2[0] > r2[2] and mae[0] < mae[2]
    alone = RidgePositionProbe().fit(X_train[0], y_train)
    assert isinstance(alone.score(X_test[0], y_test), float)
    assert alone.score(X_test[0], y_test) == pytest.approx(r2[0].item(), abs=1e-9)


# ---------------------------------------------------------------- splits


def test_split_by_sequence_partitions_deterministically():
    train, test = split_by_sequence(103, test_fraction=0.25, seed=7)
    assert len(test) == 26 and len(train) == 77
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(103))
    again = split_by_sequence(103, test_fraction=0.25, seed=7)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    assert not torch.equal(test, split_by_sequence(103, test_fraction=0.25, seed=8)[1])


@settings(max_examples=60, deadline=None)
@given(n_sequences=st.integers(2, 400), test_fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**31 - 1))
def test_split_by_sequence_is_always_a_partition(n_sequences, test_fraction, seed):
    train, test = split_by_sequence(n_sequences, test_fraction=test_fraction, seed=seed)
    assert len(train) >= 1 and len(test) >= 1
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(n_sequences))
    assert abs(len(test) - n_sequences * test_fraction) <= 1 or len(test) in (1, n_sequences - 1)


def test_flatten_tokens_keeps_sequences_whole():
    activations = torch.arange(2 * 5 * 3 * 4).reshape(2, 5, 3, 4)  # [site, sequence, position, d_model]
    X, y = flatten_tokens(activations, torch.tensor([4, 1]))
    assert X.shape == (2, 6, 4)
    assert torch.equal(X[1, 4], activations[1, 1, 1])
    assert y.tolist() == [0, 1, 2, 0, 1, 2]
    _, roles = flatten_tokens(activations, [4, 1], labels=torch.tensor([7, 8, 9]))
    assert roles.tolist() == [7, 8, 9, 7, 8, 9]
    per_token = torch.arange(15).reshape(5, 3)
    _, digits = flatten_tokens(activations, [4, 1], labels=per_token)
    assert digits.tolist() == [12, 13, 14, 3, 4, 5]


def test_split_tokens_gives_each_side_of_a_split_whole():
    activations = torch.randn(2, 8, 3, 4)
    split = split_by_sequence(8, seed=1)
    (X_train, y_train), (X_test, y_test) = split_tokens(activations, split, labels=torch.tensor([5, 6, 7]))
    assert X_train.shape == (2, 3 * len(split[0]), 4) and X_test.shape == (2, 3 * len(split[1]), 4)
    assert torch.equal(X_test, flatten_tokens(activations, split[1])[0])
    assert y_train.tolist() == [5, 6, 7] * len(split[0])


# ---------------------------------------------------------------- controls


def test_control_labels_are_a_consistent_random_function_of_the_token():
    generator = torch.Generator().manual_seed(5)
    token_ids = torch.randint(0, 30, (50, N_POSITIONS), generator=generator)
    positions = torch.arange(N_POSITIONS).expand(50, -1)
    control = control_labels(token_ids, positions, seed=0)
    assert control.shape == token_ids.shape
    for token in token_ids.unique():
        assert control[token_ids == token].unique().numel() == 1
    assert set(control.unique().tolist()) <= set(range(N_POSITIONS))
    assert control.unique().numel() > 1
    assert torch.equal(control, control_labels(token_ids, positions, seed=0))
    assert not torch.equal(control, control_labels(token_ids, positions, seed=1))


@settings(max_examples=40, deadline=None)
@given(token_ids=st.lists(st.integers(0, 9), min_size=1, max_size=60), seed=st.integers(0, 1000))
def test_control_labels_property(token_ids, seed):
    token_ids = torch.tensor(token_ids)
    labels = (token_ids * 7 + 3) % 5 + 10  # label set {10, ..., 14}
    control = control_labels(token_ids, labels, seed=seed)
    assert set(control.tolist()) <= set(labels.tolist())
    assert all(len(set(control[token_ids == token].tolist())) == 1 for token in token_ids.unique())


def test_token_identity_baseline_bounds():
    generator = torch.Generator().manual_seed(6)
    token_ids = torch.randint(0, 20, (300, N_POSITIONS), generator=generator)
    train, test = split_by_sequence(300)
    assert token_identity_baseline(token_ids, token_ids % 7, train, test) == 1.0
    positions = torch.arange(N_POSITIONS).expand(300, -1)
    chance = chance_accuracy(positions[test])
    assert abs(token_identity_baseline(token_ids, positions, train, test) - chance) < 0.05


def test_chance_levels_and_selectivity():
    assert chance_accuracy(torch.tensor([3, 3, 3, 1])) == 0.75
    assert chance_accuracy(np.arange(12)) == pytest.approx(1 / 12)
    assert random_guess_mad(12) == pytest.approx(3.9722, abs=1e-4)
    positions = torch.arange(5)
    brute_force = (positions[:, None] - positions[None, :]).abs().double().mean().item()
    assert random_guess_mad(5) == pytest.approx(brute_force)
    assert selectivity(0.9, 0.25) == pytest.approx(0.65)
    per_site = selectivity(torch.tensor([0.9, 0.5]), torch.tensor([0.2, 0.5]))
    torch.testing.assert_close(per_site, torch.tensor([0.7, 0.0]))


# ---------------------------------------------------------------- validation


@pytest.fixture(scope="module")
def small():
    generator = torch.Generator().manual_seed(8)
    return torch.randn(2, 24, 8, generator=generator), torch.arange(N_POSITIONS).repeat(2)


@pytest.mark.parametrize(("make_X", "make_y", "message"), [
    (lambda X, y: X[0, :, 0], lambda X, y: y, r"1-D shape \(24,\)"),
    (lambda X, y: X[None], lambda X, y: y, r"4-D shape \(1, 2, 24, 8\)"),
    (lambda X, y: X, lambda X, y: y[:-1], "24 tokens but y has 23 labels"),
    (lambda X, y: X[:, :0], lambda X, y: y[:0], r"empty: shape \(2, 0, 8\)"),
    (lambda X, y: X, lambda X, y: y + 0.5, "0.5"),
    (lambda X, y: X, lambda X, y: y.double(), "float64"),
    (lambda X, y: X, lambda X, y: y - 1, "-1"),
    (lambda X, y: X.index_put((torch.tensor([1]), torch.tensor([3]), torch.tensor([2])), torch.tensor(float("nan"))),
     lambda X, y: y, r"X\[1, 3, 2\] = nan"),
    (lambda X, y: X.index_put((torch.tensor([0]), torch.tensor([5]), torch.tensor([0])), torch.tensor(float("inf"))),
     lambda X, y: y, r"X\[0, 5, 0\] = inf"),
    (lambda X, y: X, lambda X, y: torch.full_like(y, 3), r"only \[3\]"),
    (lambda X, y: X, lambda X, y: y[:, None], r"shape \(24, 1\)"),
])
def test_bad_fit_inputs_are_named(small, make_X, make_y, message):
    X, y = small
    with pytest.raises(ValueError, match=message):
        PositionProbe().fit(make_X(X, y), make_y(X, y))


@pytest.mark.parametrize(("settings", "message"), [
    ({"C": 0}, "C must be a finite number > 0, got 0"),
    ({"C": -1.0}, "got -1.0"),
    ({"C": float("inf")}, "got inf"),
    ({"max_iter": 0}, "max_iter must be an integer >= 1, got 0"),
    ({"tol": -1e-4}, "tol must be a finite number > 0, got -0.0001"),
    ({"n_classes": 5}, "label 11, which is not below n_classes=5"),
])
def test_bad_settings_are_named(small, settings, message):
    X, y = small
    with pytest.raises(ValueError, match=message):
        PositionProbe(**settings).fit(X, y)


def test_use_before_fit_and_mismatched_inputs(small):
    X, y = small
    for method in ("predict", "predict_proba"):
        with pytest.raises(NotFittedError, match="not fitted yet"):
            getattr(PositionProbe(), method)(X)
    with pytest.raises(ValueError, match="not fitted yet"):
        PositionProbe().score(X, y)
    with pytest.raises(ValueError, match="not fitted yet"):
        RidgePositionProbe().mae(X, y)
    probe = PositionProbe().fit(X, y)
    with pytest.raises(ValueError, match="X has 5 features but the probe was fitted on 8"):
        probe.predict(X[:, :, :5])
    with pytest.raises(ValueError, match=r"one site's \[n_tokens, d_model\] array but the probe was fitted on 2"):
        probe.predict(X[0])
    with pytest.raises(ValueError, match="24 tokens but y has 23"):
        probe.score(X, y[:-1])


def test_bad_ridge_split_and_control_inputs_are_named(small):
    X, y = small
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got 0"):
        RidgePositionProbe(alpha=0).fit(X, y)
    with pytest.raises(ValueError, match=r"y\[2\] = nan"):
        RidgePositionProbe().fit(X, torch.where(torch.arange(24) == 2, float("nan"), y.double()))
    with pytest.raises(ValueError, match="test_fraction must be strictly between 0 and 1, got 1.5"):
        split_by_sequence(10, test_fraction=1.5)
    with pytest.raises(ValueError, match="n_sequences=1"):
        split_by_sequence(1)
    with pytest.raises(ValueError, match=r"sequence index 9 is outside range\(5\)"):
        flatten_tokens(torch.zeros(1, 5, 3, 2), [0, 9])
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        flatten_tokens(torch.zeros(1, 5, 3, 2), [0], labels=torch.arange(4))
    with pytest.raises(ValueError, match=r"token_ids \(3,\) and labels \(4,\) differ"):
        control_labels(torch.arange(3), torch.arange(4))
    with pytest.raises(ValueError, match="labels must hold integers, got dtype torch.float32"):
        control_labels(torch.arange(3), torch.ones(3))
    with pytest.raises(ValueError, match="n_positions must be an integer >= 1, got 0"):
        random_guess_mad(0)


# ---------------------------------------------------------------- bounded memory and large vocabularies

def test_fitting_in_site_groups_and_token_chunks_changes_nothing_but_memory(three_sites, monkeypatch):
    """A memory limit that fits one site at a time gives the same probes, bit for bit; evaluating the logits
    97 tokens at a time (the preconditioner's class curvature then comes from the first 97 tokens) reaches
    the same optimum: as close as the tolerance allows, and closer with a tighter one."""
    import poslens.probes.logistic as logistic

    X_train, y_train, X_test, y_test = three_sites
    whole = PositionProbe().fit(X_train, y_train)
    one_site = PositionProbe()._bytes_per_site(X_train.shape[1], D_MODEL + 1, N_POSITIONS)
    grouped = PositionProbe(memory_limit=one_site).fit(X_train, y_train)
    assert PositionProbe(memory_limit=one_site)._site_groups(X_train, one_site) == [slice(0, 1), slice(1, 2),
                                                                                    slice(2, 3)]
    assert torch.equal(grouped.weight_, whole.weight_) and torch.equal(grouped.n_iter_, whole.n_iter_)
    tight = {"tol": 1e-6, "max_iter": 1000, "dtype": torch.float64}
    whole_tight = PositionProbe(**tight).fit(X_train, y_train)
    monkeypatch.setattr(logistic, "LOGITS_PER_CHUNK", 97 * N_POSITIONS)
    chunked, chunked_tight = PositionProbe().fit(X_train, y_train), PositionProbe(**tight).fit(X_train, y_train)
    assert ((chunked.n_iter_ - whole.n_iter_).abs() <= 2).all()
    assert (chunked.score(X_test, y_test) - whole.score(X_test, y_test)).abs().max() <= 0.003
    torch.testing.assert_close(chunked_tight.weight_, whole_tight.weight_, atol=1e-3, rtol=0)
    torch.testing.assert_close(chunked_tight.predict_proba(X_test), whole_tight.predict_proba(X_test), atol=1e-4,
                               rtol=0)
    ridge, ridge_grouped = RidgePositionProbe().fit(X_train, y_train), RidgePositionProbe(memory_limit=1).fit(
        X_train, y_train)
    torch.testing.assert_close(ridge_grouped.weight_, ridge.weight_, atol=1e-10, rtol=0)
    torch.testing.assert_close(ridge_grouped.predict(X_test), ridge.predict(X_test), atol=1e-10, rtol=0)


def test_predictions_walk_over_tokens_in_chunks(three_sites, monkeypatch):
    import poslens.probes.base as base

    X_train, y_train, X_test, _ = three_sites
    probe = PositionProbe().fit(X_train, y_train)
    expected, probabilities = probe.predict(X_test), probe.predict_proba(X_test)
    monkeypatch.setattr(base, "TOKEN_CHUNK", 100)
    assert torch.equal(probe.predict(X_test), expected)
    torch.testing.assert_close(probe.predict_proba(X_test), probabilities, atol=1e-6, rtol=0)


def test_token_identity_of_a_large_vocabulary_is_the_majority_label_of_each_type(monkeypatch):
    import poslens.probes.controls as controls

    token_ids = torch.tensor([[5, 9, 5, 7], [5, 9, 7, 7], [9, 5, 7, 5], [8, 9, 5, 6]])
    labels = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]])
    train, test = torch.tensor([0, 1, 2]), torch.tensor([3])
    small = token_identity_predictions(token_ids, labels, train, test)
    monkeypatch.setattr(controls, "MAX_ONE_HOT_TYPES", 2)
    large = token_identity_predictions(token_ids, labels, train, test)
    # in training, type 5 sits at labels 0, 2, 0, 3 (majority 0) and 9 at 1, 1, 0 (majority 1); 8 and 6 never
    # occur, so they get the most frequent training label overall (every label occurs 3 times: the smallest, 0)
    assert large.tolist() == [0, 1, 0, 0]  # for the test sequence 8 9 5 6
    assert torch.equal(small[1:3], large[1:3])  # the one-hot probe agrees where a type was seen
    assert token_identity_baseline(token_ids, labels, train, test) == 0.5


def test_ridge_at_language_model_width():
    """Several sites of d_model 768 in one batched solve (a batched LU solve of this size fails in some MKL builds)."""
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(40).repeat(25).double()
    direction = torch.randn(768, generator=generator)
    X = torch.randn(2, len(positions), 768, generator=generator) + positions[:, None] * direction / 40
    ridge = RidgePositionProbe().fit(X, positions)
    assert torch.isfinite(ridge.weight_).all() and (ridge.score(X, positions) > 0.99).all()

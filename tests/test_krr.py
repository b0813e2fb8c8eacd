"""Study E's kernel ridge regression: the one bit-exact target (papers/05_self_distillation.md §E.1)."""
import numpy as np
import pytest

from kdnb import krr, papers

FULL_PRECISION = {
    0.0: [0.16477342401743322, 0.15075594547196267, 0.14915442954606578, 0.15560530355774058,
          0.16735152420547283, 0.1825108632081268, 0.49504950495049505],
    0.25: [0.16477342401743322, 0.15308890562013, 0.14957636009615946, 0.14902893187503455,
           0.14945951969321725, 0.1501132319567857, 0.15250154694875712],
    0.35: [0.16477342401743322, 0.154240752783861, 0.15088517784221928, 0.14983381255777287,
           0.1495353317827471, 0.14947702082603712, 0.14958777972917742],
}


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.35])
def test_loss_table_full_precision(alpha):
    r = krr.self_distill(alpha)
    np.testing.assert_allclose(r.losses + [r.limit_loss], FULL_PRECISION[alpha], rtol=0, atol=1e-12)


def test_readme_table_every_printed_digit():
    t = krr.loss_table([0.0, 0.25, 0.35]).round(5)
    assert t["alpha=0"].tolist() == papers.reported("05_self_distillation", "E1")
    assert t["alpha=0.25"].tolist() == papers.reported("05_self_distillation", "E2")
    # the README column headed 'alpha = 0.25' is the alpha = 0.35 run (quirk E-Q1)
    readme = papers.reported("05_self_distillation", "E2-readme")
    assert t["alpha=0.35"].tolist() == readme
    assert t["alpha=0.25"].tolist() != readme


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.25, 0.35, 0.6, 1.0])
@pytest.mark.parametrize("gamma,lam", [(80.0, 0.2), (10.0, 1.0), (200.0, 0.05)])
def test_iterative_equals_closed_form(alpha, gamma, lam):
    r = krr.self_distill(alpha, gamma=gamma, lam=lam, steps=8)
    for t in range(1, 9):
        np.testing.assert_allclose(r.train_outputs[t - 1], krr.closed_form_outputs(alpha, t, gamma=gamma, lam=lam),
                                   atol=1e-10)


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.35, 1.0])
def test_limit_is_krr_with_amplified_ridge(alpha):
    r = krr.self_distill(alpha, steps=400)
    np.testing.assert_allclose(r.curves[-1], r.limit_curve, atol=1e-9)
    np.testing.assert_allclose(krr.b_diagonal(alpha, 400), krr.b_diagonal(alpha, np.inf), atol=1e-12)


def test_alpha_zero_collapses_to_zero():
    assert np.all(krr.limit_curve(0.0) == 0)
    assert krr.self_distill(0.0).limit_loss == pytest.approx(50 / 101, abs=1e-15)
    assert krr.b_diagonal(0.0, 200).max() < 1e-6


def test_b_diagonals_and_ratios_against_independent_values():
    d, _ = krr.eigen()
    np.testing.assert_allclose(d, [1.940729, 1.822824, 1.641850, 1.417982, 1.174090, 0.932091, 0.710097,
                                   0.520871, 0.371706, 0.265467, 0.202293], atol=1e-6)
    np.testing.assert_allclose(krr.b_diagonal(0.25, 1), [0.90657, 0.90113, 0.89141, 0.87639, 0.85445, 0.82334,
                                                        0.78024, 0.72256, 0.65017, 0.57032, 0.50285], atol=5e-6)
    np.testing.assert_allclose(krr.b_diagonal(0.0, 6), [0.55516, 0.53545, 0.50174, 0.45309, 0.38915, 0.31150,
                                                       0.22562, 0.14231, 0.07554, 0.03441, 0.01617], atol=5e-6)
    np.testing.assert_allclose(krr.b_diagonal(0.35, np.inf), [0.77253, 0.76133, 0.74182, 0.71276, 0.67263, 0.61994,
                                                             0.55410, 0.47686, 0.39412, 0.31720, 0.26145], atol=5e-6)
    np.testing.assert_allclose(krr.b_ratios(krr.b_diagonal(0.0, 6)),
                               [1.0368, 1.0672, 1.1074, 1.1643, 1.2493, 1.3806, 1.5854, 1.8840, 2.1950, 2.1286],
                               atol=5e-5)
    assert krr.b_diagonal(0.25, 6)[-1] == pytest.approx(papers.reported("05_self_distillation", "E3"), abs=5e-4)


@pytest.mark.parametrize("kwargs,name", [({"alpha": 1.2}, "alpha"), ({"alpha": 0.5, "gamma": 0}, "gamma"),
                                         ({"alpha": 0.5, "lam": -1}, "lam"), ({"alpha": 0.5, "steps": 0}, "steps")])
def test_bad_parameters(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}="):
        krr.self_distill(**kwargs)


def test_check_table():
    with pytest.raises(ValueError, match="alphas="):
        krr.check_table([], 80.0, 0.2, 6)
    with pytest.raises(ValueError, match="alphas=1.5"):
        krr.check_table([0.0, 1.5], 80.0, 0.2, 6)

"""Tinker's losses: each equals a straightforward numpy implementation of its formula on random inputs, its
gradient with respect to the log-probs follows the stop-gradient semantics, and bad inputs are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtinker.losses import LOSS_NAMES, LossInputError, elementwise_loss, validate

B, T = 3, 9
RNG = np.random.default_rng(0)
LP = -np.abs(RNG.normal(1.0, 0.6, (B, T))).astype(np.float32)  # policy log-probs
Q = (LP + RNG.normal(0, 0.4, (B, T))).astype(np.float32)  # sampler log-probs: ratios on both sides of the clip
A = RNG.normal(0, 1, (B, T)).astype(np.float32)
MASK = (RNG.random((B, T)) > 0.3).astype(np.float32)
W = RNG.normal(0, 1.5, (B, T)).astype(np.float32)  # arbitrary real weights, negative ones included


def numpy_loss(name, lp, low=0.8, high=1.2, beta=0.3):
    lp, q, a = lp.astype(np.float64), Q.astype(np.float64), A.astype(np.float64)
    r = np.exp(lp - q)
    if name == "cross_entropy":
        return -lp * W
    if name == "importance_sampling":
        return -r * a
    if name == "ppo":
        return -np.minimum(r * a, np.clip(r, low, high) * a)
    if name == "cispo":
        return -np.clip(r, low, high) * lp * a
    if name == "dro":
        return -(lp * a - 0.5 * beta * (lp - q) ** 2)
    if name == "gspo":
        s = np.array([np.exp(np.mean((lp[b] - q[b])[MASK[b] != 0])) for b in range(B)])[:, None]
        return -np.minimum(s * a, np.clip(s, low, high) * a)
    raise AssertionError(name)


def inputs_for(name):
    base = {"logprobs": Q, "advantages": A}
    return {"cross_entropy": {"weights": W}, "gspo": {**base, "sequence_ratio_mask": MASK}}.get(name, base)


CONFIG = {"beta": 0.3}


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_values_match_numpy(name):
    got = np.asarray(elementwise_loss(name, jnp.asarray(LP), inputs_for(name), CONFIG), np.float64)
    np.testing.assert_allclose(got, numpy_loss(name, LP), rtol=1e-5, atol=1e-6)
    assert np.isclose(got.sum(), numpy_loss(name, LP).sum(), rtol=1e-5)  # the loss is the sum, not a mean


def test_cross_entropy_with_k_targets():
    lp, w = LP[..., None].repeat(4, -1) - 0.1 * np.arange(4), RNG.normal(0, 1, (B, T, 4)).astype(np.float32)
    got = np.asarray(elementwise_loss("cross_entropy", jnp.asarray(lp), {"weights": w}))
    np.testing.assert_allclose(got, -lp * w, rtol=1e-6)


def test_ppo_per_token_thresholds_override_config():
    low, high = np.full((B, T), 0.5, np.float32), np.full((B, T), 1.5, np.float32)
    inputs = {**inputs_for("ppo"), "clip_low_threshold": low, "clip_high_threshold": high}
    got = np.asarray(elementwise_loss("ppo", jnp.asarray(LP), inputs, {"clip_low_threshold": 0.9}), np.float64)
    np.testing.assert_allclose(got, numpy_loss("ppo", LP, 0.5, 1.5), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, numpy_loss("ppo", LP))  # the thresholds mattered


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradients_follow_stop_gradient_semantics(name):
    grad = np.asarray(jax.grad(lambda lp: elementwise_loss(name, lp, inputs_for(name), CONFIG).sum())(
        jnp.asarray(LP)), np.float64)
    lp, q, a = LP.astype(np.float64), Q.astype(np.float64), A.astype(np.float64)
    r = np.exp(lp - q)
    if name == "cispo":  # the clipped ratio is a constant weight
        expected = -np.clip(r, 0.8, 1.2) * a
    elif name == "gspo":  # each token: the sequence ratio's value times d lp, zero where the clip is active
        s = np.exp(np.array([np.mean((lp[b] - q[b])[MASK[b] != 0]) for b in range(B)]))[:, None]
        unclipped = s * a <= np.clip(s, 0.8, 1.2) * a
        expected = np.where(unclipped, -s * a, 0.0)
    elif name == "ppo":  # the unclipped term's gradient where it is the minimum, zero where the clip is active
        expected = np.where(r * a <= np.clip(r, 0.8, 1.2) * a, -r * a, 0.0)
    else:  # the rest are smooth formulas: compare with central finite differences
        eps = 1e-3
        expected = (numpy_loss(name, LP.astype(np.float64) + eps) - numpy_loss(name, LP.astype(np.float64) - eps)) / (2 * eps)
    np.testing.assert_allclose(grad, expected, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("loss_fn,inputs,fragment", [
    ("nll", {}, "unknown loss_fn 'nll'"),
    ("ppo", {"target_tokens": np.zeros(5, np.int64), "logprobs": np.zeros(5)}, "needs loss_fn_inputs['advantages']"),
    ("importance_sampling", {"target_tokens": np.zeros(5, np.int64), "logprobs": np.zeros(5),
                             "advantages": np.zeros(4)}, "'advantages'] has shape [4], expected [5]"),
    ("ppo", {"target_tokens": np.zeros(5, np.int64), "logprobs": np.zeros(5),
             "advantages": np.array([0, 1, np.nan, 0, 0.])}, "'advantages'] is nan at token 2; it must be finite"),
    ("cross_entropy", {"target_tokens": np.zeros(5, np.int64), "weights": np.array([1, 1, 1, 1e38, 1])},
     "'weights'] is 1e+38 at token 3; it must be finite with magnitude <= 1e+06"),
    ("cross_entropy", {"target_tokens": np.zeros((5, 2), np.int64), "weights": np.full((5, 2), -np.inf)},
     "'weights'] is -inf at token 0"),
    ("importance_sampling", {"target_tokens": np.zeros(5, np.int64), "logprobs": np.full(5, -2e6),
                             "advantages": np.ones(5)}, "'logprobs'] is -2000000.0 at token 0"),
    ("ppo", {"target_tokens": np.zeros(5, np.int64), "logprobs": np.zeros(5), "advantages": np.full(5, 1e7)},
     "'advantages'] is 10000000.0 at token 0"),
    ("ppo", {"target_tokens": np.zeros(5, np.int64), "logprobs": np.zeros(5), "advantages": np.zeros(5),
             "clip_low_threshold": np.full(5, 2e6)}, "'clip_low_threshold'] is 2000000.0 at token 0"),
    ("ppo", {"target_tokens": np.zeros(5, np.int64), "logprobs": np.zeros(5), "advantages": np.zeros(5),
             "clip_low_threshold": np.full(5, -0.1)}, "'clip_low_threshold'] must be >= 0"),
    ("ppo", {"target_tokens": np.zeros(5, np.int64), "logprobs": np.zeros(5), "advantages": np.zeros(5),
             "clip_low_threshold": np.full(5, 1.5)}, "clip_low_threshold must be <= clip_high_threshold"),
    ("ppo", {"target_tokens": np.zeros(5, np.int64), "logprobs": np.zeros(5), "advantages": np.array(list("abcde"))},
     "must hold numbers"),
    ("cross_entropy", {"target_tokens": np.array([1, 2, 99, 3, 4]), "weights": np.ones(5)},
     "target token 99 is outside the vocabulary [0, 50)"),
    ("cross_entropy", {"target_tokens": np.zeros(6, np.int64), "weights": np.ones(6)}, "expected [5]"),
    ("cross_entropy", {"target_tokens": np.zeros(5, np.int64), "weights": np.ones(5), "advantages": np.ones(5)},
     "does not take loss_fn_inputs['advantages']"),
    ("dro", {"target_tokens": np.zeros(5, np.int64), "logprobs": np.zeros(5), "advantages": np.zeros(5)},
     "needs loss_fn_config={'beta'"),
])
def test_bad_inputs_are_refused_in_one_line(loss_fn, inputs, fragment):
    with pytest.raises(LossInputError) as e:
        validate(loss_fn, inputs, num_tokens=5, vocab_size=50)
    assert "\n" not in str(e.value) and fragment in str(e.value), str(e.value)


RL_INPUTS = {"target_tokens": np.zeros(5, np.int64), "logprobs": np.zeros(5), "advantages": np.ones(5)}


@pytest.mark.parametrize("loss_fn,config,fragment", [
    ("dro", {"beta": float("nan")}, "loss_fn_config['beta'] is nan; it must be finite"),
    ("dro", {"beta": 1e9}, "loss_fn_config['beta'] is 1000000000.0; it must be finite with magnitude <= 1e+06"),
    ("dro", {"beta": "0.3"}, "loss_fn_config['beta'] must be a number"),
    ("ppo", {"clip_low_threshold": float("inf")}, "loss_fn_config['clip_low_threshold'] is inf"),
    ("ppo", {"clip_low_threshold": -0.2}, "0 <= clip_low_threshold <= clip_high_threshold, got -0.2 and 1.2"),
    ("cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 0.5}, "got 0.9 and 0.5"),
])
def test_bad_loss_fn_config_is_refused_in_one_line(loss_fn, config, fragment):
    with pytest.raises(LossInputError) as e:
        validate(loss_fn, RL_INPUTS, num_tokens=5, vocab_size=50, config=config)
    assert "\n" not in str(e.value) and fragment in str(e.value), str(e.value)


def test_valid_inputs_pass():
    validate("dro", RL_INPUTS, 5, 50, {"beta": -1e6})  # the bounds are inclusive
    validate("ppo", {**RL_INPUTS, "logprobs": np.full(5, -1e6), "clip_low_threshold": np.zeros(5)}, 5, 50,
             {"clip_high_threshold": 1e6})
    validate("cross_entropy", {"target_tokens": np.zeros((5, 3), np.int64), "weights": np.ones((5, 3))}, 5, 50)
    validate("gspo", {"target_tokens": np.zeros(5, np.int64), "logprobs": np.zeros(5), "advantages": np.ones(5),
                      "sequence_ratio_mask": np.ones(5)}, 5, 50)

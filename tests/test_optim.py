"""AdamW per adapter slot against torch.optim.AdamW (+ clip_grad_norm_), live."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jtinker.optim import AdamParams, adamw_step, check_adam_params, hyperparameters, init_state
from models.lora import SlotAxes

SLOT, X = 2, 4


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {("q", "lora_a"): rng.normal(0, 1, (X, 6, 3)).astype(np.float32),
              ("segments", 0, "lora_b"): rng.normal(0, 1, (2, X, 3, 5)).astype(np.float32)}  # [layers, X, ...]
    grads = [{p: rng.normal(0, 2, a.shape).astype(np.float32) for p, a in params.items()} for _ in range(4)]
    return params, grads


AXES = SlotAxes({("q", "lora_a"): 0, ("segments", 0, "lora_b"): 1})


@pytest.mark.parametrize("params,fragment", [
    (AdamParams(learning_rate=float("nan")), "learning_rate must be finite and >= 0, got nan"),
    (AdamParams(learning_rate=-1e9), "learning_rate must be finite and >= 0"),
    (AdamParams(learning_rate=1e39), "learning_rate must be finite and >= 0 in float32"),
    (AdamParams(beta1=0.99999999), "beta1 must be in [0, 1) in float32, the step's precision; 0.99999999 rounds to 1.0"),
    (AdamParams(beta2=1.0), "beta2 must be in [0, 1), got 1.0"),
    (AdamParams(eps=1e-46), "eps must be finite and > 0 in float32"),
    (AdamParams(weight_decay=float("inf")), "weight_decay must be finite and >= 0"),
    (AdamParams(grad_clip_norm=-1.0), "grad_clip_norm must be finite and >= 0"),
    (AdamParams(learning_rate="0.1"), "learning_rate must be finite and >= 0, got '0.1'"),
])
def test_hyperparameters_that_would_corrupt_the_slot_are_refused(params, fragment):
    with pytest.raises(ValueError) as error:
        check_adam_params(params)
    assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_edge_hyperparameters_pass():
    check_adam_params(AdamParams(learning_rate=0.0, beta1=0.0, beta2=0.9999, eps=1e-30, weight_decay=0.0))


def _slot_slice(path, array):
    return array[:, SLOT] if path[0] == "segments" else array[SLOT]


@pytest.mark.parametrize("hp", [AdamParams(learning_rate=1e-2), AdamParams(learning_rate=3e-3, beta1=0.8, beta2=0.99,
                                                                            eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)])
def test_matches_torch_adamw_on_the_slot_and_leaves_other_slots_alone(hp):
    params, grads = _problem()
    torch_params = {p: torch.nn.Parameter(torch.from_numpy(_slot_slice(p, a).copy())) for p, a in params.items()}
    opt = torch.optim.AdamW(list(torch_params.values()), lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), eps=hp.eps,
                            weight_decay=hp.weight_decay)
    ours, state = {p: jnp.asarray(a) for p, a in params.items()}, init_state({p: jnp.asarray(a) for p, a in params.items()},
                                                                      AXES)
    for g in grads:
        for p, tp in torch_params.items():
            tp.grad = torch.from_numpy(_slot_slice(p, g[p]).copy())
        if hp.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(list(torch_params.values()), hp.grad_clip_norm)
        opt.step()
        ours, state, metrics = adamw_step(ours, {p: jnp.asarray(a) for p, a in g.items()}, state, SLOT,
                                          hyperparameters(hp), slot_axes=AXES)
    for p, tp in torch_params.items():
        np.testing.assert_allclose(_slot_slice(p, np.asarray(ours[p])), tp.detach().numpy(), rtol=1e-5, atol=1e-6)
        untouched = np.delete(np.asarray(ours[p]), SLOT, axis=1 if p[0] == "segments" else 0)
        assert np.array_equal(untouched, np.delete(params[p], SLOT, axis=1 if p[0] == "segments" else 0))
    assert int(state["step"][SLOT]) == 4 and int(state["step"].sum()) == 4
    if hp.grad_clip_norm:
        assert float(metrics["clip_scale"]) < 1.0  # clipping was really exercised

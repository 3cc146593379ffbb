"""The training engine on the tiny preset: SFT lowers the loss, mixed-adapter batches equal separate runs,
bad requests change nothing."""

import numpy as np
import pytest

from jtinker.losses import LossInputError, NonFiniteError
from jtinker.optim import AdamParams
from jtinker.sft import builtin_arithmetic, conversation_datum
from jtinker.trainer import Trainer
from models.lora import LoraConfig, init_adapter_slot
from models.registry import create_model, preset_config
from models.tokenizer import load_tokenizer

CFG = preset_config("tiny-qwen3-moe")


def sft_data():
    tokenizer = load_tokenizer("tiny-chatml")
    return [conversation_datum(tokenizer, c) for c in builtin_arithmetic(6)]


def test_conversation_weights_cover_exactly_the_assistant_reply():
    tokenizer = load_tokenizer("tiny-chatml")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "5."}, {"role": "user", "content": "And 4 + 4?"},
                {"role": "assistant", "content": "8."}]
    datum = conversation_datum(tokenizer, messages)
    trained = datum.loss_fn_inputs["target_tokens"][datum.loss_fn_inputs["weights"] == 1]
    assert tokenizer.decode(trained) == "5.<|im_end|>\n8.<|im_end|>\n"  # each reply with its end of turn


@pytest.fixture(scope="module")
def trainer():
    model = create_model(CFG, lora=LoraConfig(num_slots=4, max_rank=8), dtype="float32")
    for slot in (1, 2, 3):
        init_adapter_slot(model, slot, rank=8, alpha=16.0, seed=slot)
    return Trainer(model)


def test_sft_lowers_the_loss_by_more_than_half(trainer):
    data = sft_data()
    first = trainer.forward_backward(data, [1] * len(data), "cross_entropy")
    trainer.optim_step(1, AdamParams(learning_rate=2e-2))
    for _ in range(24):
        last = trainer.forward_backward(data, [1] * len(data), "cross_entropy")
        trainer.optim_step(1, AdamParams(learning_rate=2e-2))
    assert last.loss < 0.5 * first.loss, (first.loss, last.loss)
    assert len(trainer.compiled_shapes) == 1  # every step reused one program
    # log-probs from forward_backward equal a forward-only pass, datum by datum
    again = trainer.forward_backward(data, [1] * len(data), "cross_entropy", backward=False)
    final = trainer.forward_backward(data, [1] * len(data), "cross_entropy")
    for a, b in zip(again.logprobs, final.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.isclose(final.loss, sum(float(e.sum()) for e in final.elementwise_loss), rtol=1e-5)
    trainer.grads = {p: g * 0 for p, g in trainer.grads.items()}


def test_mixed_adapter_batch_equals_separate_runs(trainer):
    data = sft_data()[:4]
    trainer.forward_backward(data, [2, 3, 2, 3], "cross_entropy")
    mixed = {p: np.asarray(g) for p, g in trainer.grads.items()}
    trainer.grads = {p: g * 0 for p, g in trainer.grads.items()}
    trainer.forward_backward([data[0], data[2]], [2, 2], "cross_entropy")
    trainer.forward_backward([data[1], data[3]], [3, 3], "cross_entropy")
    for p, g in trainer.grads.items():
        np.testing.assert_allclose(mixed[p], np.asarray(g), atol=1e-5, err_msg=str(p))
    assert any(np.abs(g).max() > 0 for g in mixed.values())
    trainer.grads = {p: g * 0 for p, g in trainer.grads.items()}


@pytest.mark.parametrize("mutate,fragment", [
    (lambda d: d.loss_fn_inputs.__setitem__("weights", d.loss_fn_inputs["weights"][:-1]), "has shape"),
    (lambda d: setattr(d, "tokens", np.append(d.tokens[:-1], 10_000)), "outside the vocabulary"),
])
def test_bad_requests_leave_weights_and_gradients_untouched(trainer, mutate, fragment):
    data = sft_data()[:2]
    trainer.forward_backward([data[0]], [1], "cross_entropy")
    before_lora, before_grads = dict(trainer.lora), dict(trainer.grads)
    mutate(data[1])
    with pytest.raises(LossInputError, match=fragment):
        trainer.forward_backward(data, [1, 1], "cross_entropy")
    with pytest.raises(LossInputError, match="unknown loss_fn"):
        trainer.forward_backward([data[0]], [1], "nll")
    for slot in (-1, 4):
        with pytest.raises(LossInputError, match=rf"adapter slot {slot} is outside \[0, 4\)"):
            trainer.forward_backward([data[0]], [slot], "cross_entropy")
    assert all(trainer.lora[p] is before_lora[p] for p in before_lora)
    assert all(trainer.grads[p] is before_grads[p] for p in before_grads)
    trainer.grads = {p: g * 0 for p, g in trainer.grads.items()}


def test_an_overflowing_row_of_one_slot_leaves_the_other_slots_gradients_bitwise_unchanged(trainer, monkeypatch):
    """Issue 18: tenant B's weights of 1e38 (finite, so validation alone cannot catch every overflow) batched with
    tenant A's request made A's grad_norm NaN. The checks are bypassed here (`run_validated`) to prove the
    backstop: A's loss, log-probs and gradients equal those of the same batch with a harmless B, B's slot gets
    nothing, and only B is reported."""
    import dataclasses

    data = sft_data()[:2]
    overflowing = dataclasses.replace(data[1], loss_fn_inputs={**data[1].loss_fn_inputs,
                                                              "weights": data[1].loss_fn_inputs["weights"] * 1e38})
    zero = {p: g * 0 for p, g in trainer.grads.items()}

    def run(second):
        trainer.grads = dict(zero)
        out = trainer.run_validated([data[0], second], [2, 3], "cross_entropy", None, True)
        return out, {p: np.asarray(g) for p, g in trainer.grads.items()}

    (clean, clean_grads), (poisoned, poisoned_grads) = run(data[1]), run(overflowing)
    assert clean.nonfinite_slots == () and poisoned.nonfinite_slots == (3,)
    assert not np.isfinite(poisoned.elementwise_loss[1]).all()  # B really overflowed
    np.testing.assert_array_equal(poisoned.elementwise_loss[0], clean.elementwise_loss[0])
    np.testing.assert_array_equal(poisoned.logprobs[0], clean.logprobs[0])
    axes = trainer.slot_axes
    for p, g in poisoned_grads.items():
        slot_of = lambda a, s: np.take(a, s, axis=axes[p])  # noqa: E731
        np.testing.assert_array_equal(slot_of(g, 2), slot_of(clean_grads[p], 2), err_msg=str(p))
        assert not slot_of(g, 3).any(), p  # nothing added for the overflowing slot
    assert any(np.abs(np.take(g, 2, axis=axes[p])).max() > 0 for p, g in poisoned_grads.items())
    trainer.grads = dict(zero)
    monkeypatch.setattr(trainer, "validate", lambda *args: None)  # as if the bound let it through
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradient for adapter slot\(s\) 3"):
        trainer.forward_backward([overflowing], [3], "cross_entropy")
    assert all(not np.asarray(g).any() for g in trainer.grads.values())


def test_save_restore_and_continue_is_bit_identical(trainer, tmp_path):
    from jtinker.checkpoints import load_state, save_state

    data = sft_data()
    params = AdamParams(learning_rate=1e-2)
    for _ in range(3):
        trainer.forward_backward(data, [3] * len(data), "cross_entropy")
        trainer.optim_step(3, params)
    save_state(trainer, 3, tmp_path / "state")

    def five_steps(slot):
        out = []
        for _ in range(5):
            out.append(trainer.forward_backward(data, [slot] * len(data), "cross_entropy").loss)
            trainer.optim_step(slot, params)
        return out

    continued = five_steps(3)
    load_state(trainer, 2, tmp_path / "state")  # into another slot of the same trainer
    assert five_steps(2) == continued  # bit-identical
    load_state(trainer, 2, tmp_path / "state", with_optimizer=False)
    assert five_steps(2) != continued  # fresh moments: a different trajectory
    with pytest.raises(FileNotFoundError):
        load_state(trainer, 2, tmp_path / "missing")
    trainer.grads = {p: g * 0 for p, g in trainer.grads.items()}

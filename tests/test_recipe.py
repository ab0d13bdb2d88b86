"""The paper's training recipe: PyTorch's SGD semantics, scaled milestones."""

import keras
import numpy as np
import pytest

from keras_we.experiments.recipe import PaperSGD, Recipe


def torch_sgd_trajectory(w0, grads, lrs, momentum, weight_decay):
    """The same updates by hand, as PyTorch's SGD documents them."""
    w, buf, out = w0.astype("float64"), None, []
    for g, lr in zip(grads, lrs):
        d = g + weight_decay * w
        buf = d if buf is None else momentum * buf + d
        w = w - lr * buf
        out.append(w.copy())
    return out


def test_paper_sgd_matches_pytorch_update_rule_across_a_learning_rate_drop():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype("float32")
    grads = [rng.normal(size=(5, 3)).astype("float32") for _ in range(6)]
    lrs = [0.1, 0.1, 0.1, 0.01, 0.01, 0.001]
    variable = keras.Variable(w0)
    optimizer = PaperSGD(learning_rate=0.1, momentum=0.9, l2=5e-4)
    optimizer.build([variable])
    want = torch_sgd_trajectory(w0, grads, lrs, 0.9, 5e-4)
    for g, lr, expected in zip(grads, lrs, want):
        optimizer.learning_rate = lr
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(g), variable)])
        np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), expected, rtol=1e-5, atol=1e-6)


def test_paper_sgd_differs_from_keras_sgd_after_a_drop():
    # Keras folds the learning rate into the momentum; PyTorch does not.
    w0 = np.ones((2,), "float32")
    results = []
    for optimizer in (PaperSGD(0.1, momentum=0.9, l2=0.0), keras.optimizers.SGD(0.1, momentum=0.9)):
        v = keras.Variable(w0)
        optimizer.build([v])
        for lr in (0.1, 0.01):
            optimizer.learning_rate = lr
            optimizer.apply_gradients([(keras.ops.ones((2,)), v)])
        results.append(keras.ops.convert_to_numpy(v)[0])
    # PyTorch: 1 - 0.1*1 - 0.01*1.9 = 0.881 ; Keras: 1 - 0.1 - (0.9*0.1 + 0.01) = 0.8
    assert results[0] == pytest.approx(0.881)
    assert results[1] == pytest.approx(0.8)


def test_recipe_scales_milestones_with_epochs():
    paper = Recipe()
    assert paper.scaled_lr_milestones() == (60, 120, 180)
    assert paper.learning_rate_at(59) == pytest.approx(0.1)
    assert paper.learning_rate_at(60) == pytest.approx(0.01)
    assert paper.learning_rate_at(199) == pytest.approx(1e-4)
    short = Recipe(epochs=10)
    assert short.scaled_lr_milestones() == (3, 6, 9)
    schedule = short.we_schedule()
    assert schedule.milestones == (3.0, 6.0) and schedule.temperature == pytest.approx(0.75)
    with pytest.raises(ValueError, match="epochs"):
        Recipe(epochs=0)


def test_paper_sgd_round_trips_through_config():
    optimizer = PaperSGD(0.05, momentum=0.8, l2=1e-4)
    clone = PaperSGD.from_config(optimizer.get_config())
    assert (clone.momentum, clone.l2) == (0.8, 1e-4)
    with pytest.raises(ValueError, match="momentum"):
        PaperSGD(momentum=1.5)

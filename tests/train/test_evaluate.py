import math

import numpy as np
import paddle
import pytest
from train_helpers import SIZE

from paddlefsl.data import FixedTasks, SinusoidTasks, fixed_tasks
from paddlefsl.metaopt import ANIL, MAML
from paddlefsl.models import MLP, Conv4
from paddlefsl.train import confidence_interval, evaluate, paired_difference


def test_confidence_interval_formula():
    values = [0.2, 0.4, 0.6, 1.0]
    mean, std, ci = confidence_interval(values)
    assert mean == pytest.approx(0.55)
    assert std == pytest.approx(np.std(values))  # population std, as the MAML code
    assert ci == pytest.approx(1.96 * np.std(values) / math.sqrt(4))
    with pytest.raises(ValueError):
        confidence_interval([])


def test_paired_difference_against_hand_computed_values():
    base = [1.0, 0.96, 0.92, 1.0, 0.88]
    cand = [1.0, 1.0, 0.92, 0.96, 1.0]
    diff = paired_difference(base, cand)
    deltas = np.array(cand) - np.array(base)  # 0, .04, 0, -.04, .12
    assert diff.mean == pytest.approx(0.024)
    assert diff.std == pytest.approx(np.std(deltas))
    assert diff.ci95 == pytest.approx(1.96 * np.std(deltas) / math.sqrt(5))
    assert (diff.better, diff.worse, diff.ties, diff.num_tasks) == (2, 1, 2, 5)
    assert not diff.excludes_zero  # 0.024 against a half-width of ~0.05
    # Lower is better for MSE: the same numbers swap "better" and "worse".
    mse = paired_difference(base, cand, higher_is_better=False)
    assert (mse.better, mse.worse, mse.mean) == (1, 2, diff.mean)
    # A constant gain has no spread: the interval excludes zero.
    assert paired_difference([0.5, 0.6], [0.7, 0.8]).excludes_zero
    with pytest.raises(ValueError, match="same tasks"):
        paired_difference([1.0, 0.5], [1.0])


def _tiny_learner(algorithm, seed):
    paddle.seed(seed)
    net = Conv4(1, 5, hidden=4, pooling="max", image_size=SIZE)
    learner = ANIL(net.features, net.head, lr=0.4) if algorithm == "anil" else MAML(net, lr=0.4)
    return net, learner


def _state(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_evaluate_is_deterministic_and_leaves_model_untouched(splits, algorithm):
    _, val = splits
    net, learner = _tiny_learner(algorithm, seed=0)
    learner.eval()
    before = _state(net)
    tasks = fixed_tasks(val, 5, 1, 2, num_tasks=6)
    first = evaluate(learner, tasks, inner_steps=2)
    second = evaluate(learner, tasks, inner_steps=2)
    assert first.values == second.values and first.num_tasks == 6
    assert first.metric == "accuracy" and 0.0 <= first.mean <= 1.0
    after = _state(net)
    for key in before:  # weights and BatchNorm running statistics
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert not learner.training  # mode restored
    assert all(p.grad is None for p in net.parameters())  # no graph or gradient left behind


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_evaluate_by_step_scores_every_step_and_keeps_the_result(splits, algorithm):
    _, val = splits
    _, learner = _tiny_learner(algorithm, seed=1)
    tasks = fixed_tasks(val, 5, 1, 2, num_tasks=5)
    plain = evaluate(learner, tasks, inner_steps=3)
    stepped = evaluate(learner, tasks, inner_steps=3, by_step=True)
    assert plain.by_step == [] and [row["step"] for row in stepped.by_step] == [0, 1, 2, 3]
    assert stepped.values == plain.values  # the extra query passes change nothing
    assert stepped.by_step[-1]["mean"] == pytest.approx(plain.mean, abs=1e-12)
    assert stepped.by_step[-1]["ci95"] == pytest.approx(plain.ci95, abs=1e-12)
    # Each entry is what evaluating with that many steps gives.
    for steps in (0, 1):
        expected = evaluate(learner, tasks, inner_steps=steps)
        assert stepped.by_step[steps]["mean"] == pytest.approx(expected.mean, abs=1e-12)
    assert stepped.to_dict()["by_step"] == stepped.by_step


def test_evaluate_regression_mse_and_tuples():
    paddle.seed(0)
    maml = MAML(MLP(1, [8], 1), lr=0.01)
    tasks = FixedTasks(SinusoidTasks(5, 5, seed=1), 4)
    result = evaluate(maml, tasks, inner_steps=1)
    assert result.metric == "mse" and result.loss == pytest.approx(result.mean)
    as_tuples = [t.to_tensors() for t in tasks]
    assert evaluate(maml, as_tuples, inner_steps=1).values == pytest.approx(result.values)
    assert "mse" in str(result) and "4 tasks" in str(result)


def test_evaluate_needs_meta_learner():
    maml = MAML(paddle.nn.Linear(1, 1), lr=0.1)
    with pytest.raises(ValueError, match="clone"):
        evaluate(maml.clone(), [], inner_steps=1)

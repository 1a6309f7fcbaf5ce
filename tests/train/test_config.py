import numpy as np
import paddle
import pytest

from paddlefsl.train import PRESETS, ConfigError, build_config
from paddlefsl.train.config import RUNTIME_FIELDS, TrainConfig, config_diff

# name: (algorithm, dataset, shots, queries, meta_batch, steps, test steps, inner lr,
#        hidden, pooling, image size)
EXPECTED = {
    "maml-omniglot-5w1s": ("maml", "omniglot", 1, 1, 32, 1, 3, 2.0, 64, "stride", 28),
    "maml-omniglot-5w5s": ("maml", "omniglot", 5, 5, 32, 1, 3, 2.0, 64, "stride", 28),
    "maml-miniimagenet-5w1s": ("maml", "miniimagenet", 1, 15, 4, 5, 10, 0.05, 32, "max", 84),
    "maml-miniimagenet-5w5s": ("maml", "miniimagenet", 5, 15, 2, 5, 10, 0.05, 32, "max", 84),
    "anil-omniglot-5w1s": ("anil", "omniglot", 1, 1, 32, 1, 3, 2.0, 64, "stride", 28),
    "anil-omniglot-5w5s": ("anil", "omniglot", 5, 5, 32, 1, 3, 2.0, 64, "stride", 28),
    "anil-miniimagenet-5w1s": ("anil", "miniimagenet", 1, 15, 4, 5, 10, 0.05, 32, "max", 84),
    "anil-miniimagenet-5w5s": ("anil", "miniimagenet", 5, 15, 2, 5, 10, 0.05, 32, "max", 84),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_presets_match_the_papers(name):
    cfg, _ = build_config(name)
    got = (
        cfg.algorithm,
        cfg.dataset,
        cfg.shots,
        cfg.queries,
        cfg.meta_batch_size,
        cfg.inner_steps,
        cfg.inner_steps_test,
        cfg.inner_lr,
        cfg.hidden,
        cfg.pooling,
        cfg.image_size,
    )
    assert got == EXPECTED[name]
    assert (cfg.ways, cfg.meta_lr, cfg.iterations, cfg.preset) == (5, 1e-3, 60000, name)
    if cfg.dataset == "omniglot":
        assert cfg.omniglot_scheme == "maml"


def test_every_preset_is_tested():
    assert set(PRESETS) == set(EXPECTED)


def test_explicit_options_override_the_preset():
    cfg, given = build_config("maml-omniglot-5w1s", inner_lr=0.1, shots=5)
    assert (cfg.inner_lr, cfg.shots, cfg.queries, cfg.meta_batch_size) == (0.1, 5, 5, 32)
    assert {"inner_lr", "shots", "meta_batch_size"} <= given


def test_dataset_defaults_without_preset():
    cfg, given = build_config(dataset="sinusoid")
    assert (cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch_size, cfg.inner_lr) == (
        1,
        10,
        10,
        25,
        0.01,
    )
    assert cfg.task_type == "regression" and given == {"dataset"}
    assert build_config(dataset="miniimagenet")[0].queries == 15


@pytest.mark.parametrize(
    "options, flag",
    [
        ({"ways": 0}, "--ways"),
        ({"shots": -1}, "--shots"),
        ({"meta_batch_size": 0}, "--meta-batch-size"),
        ({"inner_lr": 0.0}, "--inner-lr"),
        ({"meta_lr": float("nan")}, "--meta-lr"),
        ({"algorithm": "reptile"}, "--algorithm"),
        ({"dataset": "cifar"}, "--dataset"),
        ({"dataset": "sinusoid", "ways": 5}, "--ways"),
        ({"pooling": "max", "image_size": 8}, "--image-size"),
        ({"network": "resnet"}, "--network"),
        ({"meta_lr_schedule": "step"}, "--meta-lr-schedule"),
        ({"dataset": "sinusoid", "network": "reference"}, "--network"),
        ({"conv_padding": "valid"}, "--conv-padding"),
        ({"dataset": "sinusoid", "conv_padding": "same"}, "--conv-padding"),
        ({"omniglot_rotations": "random"}, "--omniglot-rotations"),
        ({"dataset": "miniimagenet", "omniglot_rotations": "per-task"}, "--omniglot-rotations"),
        ({"task_pool": -1}, "--task-pool"),
        ({"task_pool": 2.5}, "--task-pool"),
        ({"task_pool": True}, "--task-pool"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_invalid_options_name_the_flag(options, flag):
    with pytest.raises(ConfigError, match=flag):
        build_config(**options)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="maml-omniglot-5w1s"):
        build_config("maml-cifar")


def test_config_diff_ignores_runtime_fields():
    a = TrainConfig().to_dict()
    b = dict(a, iterations=5, num_workers=3, inner_lr=0.1)
    assert config_diff(a, b) == {"inner_lr": (2.0, 0.1)}
    assert config_diff(a, b, only={"iterations"}) == {}
    assert "iterations" in RUNTIME_FIELDS and "seed" not in RUNTIME_FIELDS


def test_config_diff_reads_a_missing_field_as_its_default():
    # Records written before a field existed (e.g. "network") still resume.
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "network"}
    assert config_diff(old, TrainConfig().to_dict()) == {}
    reference = dict(TrainConfig().to_dict(), network="reference")
    assert config_diff(old, reference) == {"network": ("default", "reference")}


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "anil"])
def test_reference_network_is_cbfinn_maml_conv4(algorithm):
    import numpy as np

    from paddlefsl.train.builders import build_learner

    cfg, _ = build_config("maml-omniglot-5w5s", algorithm=algorithm, network="reference")
    learner = build_learner(cfg)
    params = dict(learner.named_parameters())
    bn = learner.module.features[0][1] if algorithm != "anil" else learner.features[0][1]
    assert bn._epsilon == 1e-3
    assert bn.weight.stop_gradient and np.all(bn.weight.numpy() == 1.0)  # no scale
    head = next(p for n, p in params.items() if n.endswith("head.weight"))
    assert 0.8 < float(head.std()) < 1.2  # N(0, 1), not Paddle's Xavier (about 0.17)
    if algorithm == "anil":
        assert not learner.inner_frozen  # the features are never adapted anyway
    else:
        assert learner.inner_frozen == {f"features.{i}.1.bias" for i in range(4)}
    default = build_learner(build_config("maml-omniglot-5w5s", algorithm=algorithm)[0])
    assert not default.inner_frozen
    assert float(next(p for n, p in default.named_parameters() if "head.weight" in n).std()) < 0.5
    assert "network" in cfg.to_dict() and cfg.network == "reference"


def test_cosine_meta_lr_anneals_to_zero_over_the_run():
    import paddle

    from paddlefsl.train.builders import build_learner, build_optimizer

    cfg, _ = build_config(
        dataset="sinusoid", meta_lr=0.01, iterations=10, meta_lr_schedule="cosine"
    )
    opt = build_optimizer(cfg, build_learner(cfg))
    schedule = opt._learning_rate
    assert isinstance(schedule, paddle.optimizer.lr.CosineAnnealingDecay)
    rates = []
    for _ in range(10):
        rates.append(opt.get_lr())
        schedule.step()
    assert rates[0] == pytest.approx(0.01)
    assert rates[5] == pytest.approx(0.005)  # halfway: half the rate
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert opt.get_lr() == pytest.approx(0.0, abs=1e-12)  # after the last iteration
    constant = build_optimizer(build_config(dataset="sinusoid")[0], build_learner(cfg))
    assert isinstance(constant._learning_rate, float)


def test_metasgd_tests_with_its_training_steps_unless_told():
    # Its learned rates fit the trained step count; ten sinusoid steps of them diverge.
    assert build_config(dataset="sinusoid", algorithm="maml")[0].inner_steps_test == 10
    assert build_config(dataset="sinusoid", algorithm="metasgd")[0].inner_steps_test == 1
    cfg, _ = build_config(dataset="sinusoid", algorithm="metasgd", inner_steps=2)
    assert cfg.inner_steps_test == 2
    cfg, _ = build_config(dataset="sinusoid", algorithm="metasgd", inner_steps_test=5)
    assert cfg.inner_steps_test == 5


def test_omniglot_antialias_is_off_by_default_and_omniglot_only():
    assert build_config("maml-omniglot-5w5s")[0].omniglot_antialias is False
    cfg, given = build_config("maml-omniglot-5w5s", omniglot_antialias=True)
    assert cfg.omniglot_antialias is True and "omniglot_antialias" in given
    with pytest.raises(ConfigError, match="--omniglot-antialias applies to --dataset omniglot"):
        build_config("maml-miniimagenet-5w1s", omniglot_antialias=True)
    with pytest.raises(ConfigError, match="--omniglot-antialias must be true or false"):
        build_config("maml-omniglot-5w5s", omniglot_antialias="yes")
    # A config saved before the field existed loads with the old preprocessing.
    saved = build_config("maml-omniglot-5w5s")[0].to_dict()
    del saved["omniglot_antialias"]
    assert TrainConfig.from_dict(saved).omniglot_antialias is False


def test_conv_padding_builds_the_network_and_is_a_model_field():
    from paddlefsl.models import SamePadConv2D
    from paddlefsl.train.builders import build_model
    from paddlefsl.train.config import MODEL_FIELDS

    def convs(**options):
        model = build_model(build_config("maml-omniglot-5w5s", **options)[0])
        return [type(m).__name__ for m in model.sublayers() if isinstance(m, paddle.nn.Conv2D)]

    assert convs() == ["Conv2D"] * 4
    assert convs(network="reference", conv_padding="same") == [SamePadConv2D.__name__] * 4
    assert "conv_padding" in MODEL_FIELDS  # a warm start must keep it
    saved = build_config("maml-omniglot-5w5s")[0].to_dict()
    del saved["conv_padding"]  # a run from before the field pads as it did
    assert TrainConfig.from_dict(saved).conv_padding == "symmetric"


@pytest.mark.parametrize("size", [None, 0, 3])
def test_task_pool_wraps_the_training_tasks_only(tmp_path, size):
    from paddlefsl.data import TaskPool
    from paddlefsl.train.builders import build_trainer

    cfg, _ = build_config(dataset="sinusoid", task_pool=size, output=str(tmp_path / "r"))
    trainer = build_trainer(cfg, progress=False)
    train, val = trainer.train_tasks, trainer.val_tasks
    if size:
        assert isinstance(train, TaskPool) and len(train) == size
        np.testing.assert_array_equal(train.sample(size + 1).query_y, train.sample(1).query_y)
        assert not np.array_equal(train.sample(2).query_y, train.sample(1).query_y)
    else:
        assert not isinstance(train, TaskPool)
        assert not np.array_equal(train.sample(4).query_y, train.sample(1).query_y)
    assert not isinstance(val, TaskPool) and len(val) == cfg.val_tasks
    # A config saved before the field existed resumes with fresh tasks.
    saved = cfg.to_dict()
    del saved["task_pool"]
    assert TrainConfig.from_dict(saved).task_pool is None


@pytest.mark.parametrize("pool", [None, 6])
@pytest.mark.parametrize("rotations", ["classes", "per-task"])
def test_omniglot_rotations_turn_the_training_stream_only(monkeypatch, tmp_path, rotations, pool):
    import paddlefsl.data
    from paddlefsl.data import FixedTasks, RandomClassRotation, TaskPool
    from paddlefsl.train.builders import build_tasks

    seen = []

    def omniglot(root, **kwargs):
        seen.append((kwargs["split"], kwargs["rotations"]))
        images = np.random.default_rng(0).integers(0, 255, (60, 4, 4)).astype(np.uint8)
        return images, np.repeat(np.arange(12), 5)

    monkeypatch.setattr(paddlefsl.data, "Omniglot", omniglot)
    cfg, _ = build_config(
        "maml-omniglot-5w1s",
        omniglot_rotations=rotations,
        task_pool=pool,
        data_root=str(tmp_path),
    )
    train = build_tasks(cfg, "train")
    per_task = rotations == "per-task"
    assert seen == [("train", not per_task)]
    assert isinstance(train, RandomClassRotation) is per_task
    inner = train.source if per_task else train
    assert isinstance(inner, TaskPool) is bool(pool)
    if per_task:
        assert len(train.sample(3).info["quarter_turns"]) == 5
    # Validation and test tasks are the standard ones: rotations as classes.
    val = build_tasks(cfg, "val", num_tasks=4)
    assert isinstance(val, FixedTasks) and seen[-1] == ("val", True)


@pytest.mark.parametrize("flag", [False, True])
def test_build_dataset_passes_omniglot_antialias(monkeypatch, tmp_path, flag):
    import paddlefsl.data
    from paddlefsl.train.builders import build_dataset

    seen = {}

    class Recorder:
        def __init__(self, root, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(paddlefsl.data, "Omniglot", Recorder)
    cfg, _ = build_config("maml-omniglot-5w1s", omniglot_antialias=flag, data_root=str(tmp_path))
    build_dataset(cfg, "test")
    assert seen["antialias"] is flag and seen["split"] == "test"


def test_miniimagenet_resolves_the_reference_meta_gradient_clip():
    from paddlefsl.train.presets import reference_meta_grad_clip

    # cbfinn/maml clips its summed loss's gradient at 10; that loss is ways*queries/shots
    # times the mean loss: 75 times for 5-way 1-shot, 15 times for 5-shot (15 queries).
    assert build_config("maml-miniimagenet-5w1s")[0].meta_grad_clip == pytest.approx(10 / 75)
    assert build_config("anil-miniimagenet-5w5s")[0].meta_grad_clip == pytest.approx(10 / 15)
    assert build_config(dataset="miniimagenet")[0].meta_grad_clip == pytest.approx(10 / 75)
    # Overriding the task shape rescales it; explicit values and 0 (off) are kept.
    cfg, _ = build_config("maml-miniimagenet-5w1s", shots=5, queries=10)
    assert cfg.meta_grad_clip == pytest.approx(reference_meta_grad_clip(5, 5, 10)) == 1.0
    assert build_config("maml-miniimagenet-5w1s", meta_grad_clip=0.5)[0].meta_grad_clip == 0.5
    assert build_config("maml-miniimagenet-5w1s", meta_grad_clip=0)[0].meta_grad_clip == 0
    # The reference clips only miniImageNet.
    assert build_config("maml-omniglot-5w5s")[0].meta_grad_clip is None
    assert build_config(dataset="sinusoid")[0].meta_grad_clip is None
    with pytest.raises(ConfigError, match="--meta-grad-clip must be a number >= 0"):
        build_config("maml-omniglot-5w5s", meta_grad_clip=-1.0)
    # Runs saved before the field existed resume without clipping, as they trained.
    saved = build_config("maml-miniimagenet-5w1s")[0].to_dict()
    del saved["meta_grad_clip"]
    assert TrainConfig.from_dict(saved).meta_grad_clip is None


@pytest.mark.parametrize("clip", [None, 0.5])
def test_build_optimizer_clips_each_meta_gradient_element(clip):
    import numpy as np
    import paddle

    from paddlefsl.train.builders import build_learner, build_optimizer

    cfg, _ = build_config(dataset="sinusoid", meta_grad_clip=clip, meta_lr=0.01)
    learner = build_learner(cfg)
    params = [p for p in learner.parameters() if not p.stop_gradient]
    start = [p.numpy().astype(np.float64) for p in params]
    opt = build_optimizer(cfg, learner)
    rng = np.random.default_rng(0)
    grads = [[rng.standard_normal(p.shape) * 3 for p in params] for _ in range(2)]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = paddle.to_tensor(g.astype(np.float32))
        opt.step()
        opt.clear_grad()
    # Adam (beta 0.9 / 0.999, eps 1e-8) on the clipped gradients, in float64.
    for p, w0, g1, g2 in zip(params, start, *grads):
        if clip is not None:
            g1, g2 = np.clip(g1, -clip, clip), np.clip(g2, -clip, clip)
        m = v = 0.0
        w = w0
        for t, g in enumerate((g1, g2), start=1):
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            w = w - 0.01 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        np.testing.assert_allclose(p.numpy(), w, rtol=1e-5, atol=1e-6)

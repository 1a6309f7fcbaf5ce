import json
import random

import numpy as np
import paddle
import pytest
from train_helpers import count_binary_writes, params_of

from paddlefsl.train import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
)
from paddlefsl.train import checkpoint as ckpt_module


def _net_and_opt(seed=0):
    paddle.seed(seed)
    net = paddle.nn.Sequential(
        paddle.nn.Linear(3, 4), paddle.nn.BatchNorm1D(4), paddle.nn.Linear(4, 2)
    )
    opt = paddle.optimizer.Adam(1e-2, parameters=net.parameters())
    net(paddle.randn([5, 3])).sum().backward()
    opt.step()
    opt.clear_grad()
    return net, opt


def test_kill_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    net, opt = _net_and_opt()
    manager = CheckpointManager(tmp_path)
    manager.save(["last"], net, opt, iteration=1, config={"a": 1})
    saved = {k: v.numpy().copy() for k, v in net.state_dict().items()}

    for p in net.parameters():  # the "newer" weights that never make it to disk
        p.set_value(p.numpy() + 1.0)

    def crash_halfway(handle, data):
        handle.write(data[: len(data) // 2])
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt_module, "_write_all", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        manager.save(["last"], net, opt, iteration=2, config={"a": 1})
    monkeypatch.undo()

    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    ckpt = manager.load("last")
    assert ckpt.iteration == 1
    for key, value in ckpt.model_state.items():
        np.testing.assert_array_equal(value.numpy(), saved[key])


def test_crash_between_binaries_and_record(tmp_path, monkeypatch):
    net, opt = _net_and_opt()
    manager = CheckpointManager(tmp_path)
    manager.save(["last"], net, opt, iteration=1)

    def fail_on_record(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module, "atomic_write_json", fail_on_record)
    with pytest.raises(OSError):
        manager.save(["last"], net, opt, iteration=2)  # binaries written, record not
    monkeypatch.undo()
    assert manager.load("last").iteration == 1
    # A stale temporary file from a hard kill does not get in the way either.
    (tmp_path / "checkpoints" / ".last.json.999.tmp").write_text("{")
    manager.save(["last"], net, opt, iteration=3)
    assert manager.load("last").iteration == 3
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["iter-0000003.pdopt", "iter-0000003.pdparams", "last.json"]


def test_a_second_tag_for_the_same_bytes_writes_no_binary_again(tmp_path, monkeypatch):
    net, opt = _net_and_opt()
    manager = CheckpointManager(tmp_path)
    writes = count_binary_writes(monkeypatch)
    manager.save(["last"], net, opt, iteration=5)
    assert writes == ["iter-0000005.pdparams", "iter-0000005.pdopt"]
    manager.save(["kept-0000005"], net, opt, iteration=5)  # same weights, same iteration
    assert len(writes) == 2
    assert manager.load("kept-0000005").iteration == 5

    # Other bytes under the same name (weights changed, or a truncated file) are rewritten.
    net[0].bias.set_value(net[0].bias.numpy() + 1.0)
    manager.save(["best"], net, opt, iteration=5)
    assert writes[2:] == ["iter-0000005.pdparams"]
    path = tmp_path / "checkpoints" / "iter-0000005.pdopt"
    path.write_bytes(path.read_bytes()[:10])
    manager.save(["last"], net, opt, iteration=5)
    assert writes[3:] == ["iter-0000005.pdopt"]
    for tag in ("last", "best"):  # every record's checksums match the files on disk
        np.testing.assert_array_equal(
            manager.load(tag).model_state["0.bias"].numpy(), net[0].bias.numpy()
        )


def test_refuses_to_save_non_finite_weights(tmp_path):
    net, opt = _net_and_opt()
    manager = CheckpointManager(tmp_path)
    manager.save(["last"], net, opt, iteration=1)
    net[0].weight.set_value(np.full([3, 4], np.nan, np.float32))
    with pytest.raises(CheckpointError, match="NaN"):
        manager.save(["last"], net, opt, iteration=2)
    assert manager.load("last").iteration == 1


def test_optimizer_state_loads_into_a_rebuilt_model(tmp_path):
    net, opt = _net_and_opt()
    CheckpointManager(tmp_path).save(["last"], net, opt, iteration=1)
    # Built later in the same process: different global parameter names.
    net2, opt2 = _net_and_opt(seed=5)
    assert [p.name for p in net.parameters()] != [p.name for p in net2.parameters()]
    ckpt = CheckpointManager(tmp_path).load("last")
    ckpt.load_model(net2)
    ckpt.load_optimizer(opt2, net2)
    x = paddle.randn([5, 3])
    for model, optimizer in ((net, opt), (net2, opt2)):
        model(x).sum().backward()
        optimizer.step()
    for (name, a), b in zip(net.named_parameters(), net2.parameters(), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_resolve_and_integrity(tmp_path):
    net, opt = _net_and_opt()
    manager = CheckpointManager(tmp_path)
    manager.save(["last", "best"], net, opt, iteration=7)
    record = tmp_path / "checkpoints" / "best.json"
    assert resolve_checkpoint(tmp_path) == record
    assert resolve_checkpoint(tmp_path, which="last").name == "last.json"
    assert resolve_checkpoint(tmp_path / "checkpoints" / "iter-0000007.pdparams").suffix == ".json"
    assert load_checkpoint(record).iteration == 7
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "checkpoints" / "nothing-here.json")
    (tmp_path / "checkpoints" / "iter-0000007.pdparams").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path)


def test_load_model_rejects_other_architecture(tmp_path, factory):
    trainer = factory.classification(output_dir=tmp_path, val_tasks=0)
    trainer.fit(1)
    ckpt = CheckpointManager(tmp_path).load("last")
    with pytest.raises(CheckpointError, match="does not fit"):
        ckpt.load_model(paddle.nn.Linear(2, 2))
    ckpt.load_model(trainer.model)  # the right one loads
    assert params_of(trainer)


def test_rng_state_round_trip_through_json():
    state = json.loads(json.dumps(capture_rng_state()))
    expected = (random.random(), np.random.rand(), paddle.rand([2]).numpy())
    restore_rng_state(state)
    got = (random.random(), np.random.rand(), paddle.rand([2]).numpy())
    assert expected[:2] == got[:2]
    np.testing.assert_array_equal(expected[2], got[2])

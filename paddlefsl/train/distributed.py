"""Sharing a meta-batch over ``paddle.distributed`` processes (gloo on CPU, NCCL on GPU).

Every process draws the same meta-batch (tasks are a pure function of their index), adapts
its share of the tasks, and the summed meta-gradients are all-reduced before the optimizer
step, so each process applies the same update. Paddle's CPU kernels are mostly
single-threaded, so on a CPU machine one process per core is how a run uses every core.
"""

from __future__ import annotations

from collections.abc import Sequence

import paddle

__all__ = ["Group", "current_group"]


class Group:
    """A process's rank among the ``world`` processes that train together."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = int(rank), int(world)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and logs (rank 0)."""
        return self.rank == 0

    def owns(self, task: int) -> bool:
        """Whether task ``task`` of a meta-batch is this process's to adapt."""
        return task % self.world == self.rank

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of small float vectors over all processes."""
        if self.world == 1:
            return list(values)
        import paddle.distributed as dist

        tensor = paddle.to_tensor(list(values), dtype="float64")
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.numpy()]

    def sum_gradients(self, params: Sequence[paddle.Tensor]) -> None:
        """Replace every parameter's gradient by its sum over all processes.

        One flat all-reduce; a parameter without a gradient here counts as zero, so the
        collective is the same call on every process.
        """
        if self.world == 1:
            return
        import paddle.distributed as dist

        params = [p for p in params if not p.stop_gradient]
        flat = paddle.concat(
            [(p.grad if p.grad is not None else paddle.zeros_like(p)).reshape([-1]) for p in params]
        )
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            size = int(p.size)
            total = flat[offset : offset + size].reshape(p.shape)
            offset += size
            if p.grad is not None:
                p.grad.set_value(total)
            elif bool((total != 0).any()):
                p._set_grad_ivar(total)


def current_group() -> Group:
    """The process group set up by ``paddle.distributed.init_parallel_env()``, if any."""
    import paddle.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()

"""Named configurations reproducing MAML (Finn et al., 2017) and ANIL (Raghu et al., 2020).

Sources (every number below was checked against them):

* [MAML-A1] Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of
  Deep Networks", ICML 2017, arXiv:1703.03400v3, Appendix A.1: Omniglot 5-way trained
  with 1 inner step of 0.4 and meta-batch 32, *evaluated with 3 steps* of 0.4;
  MiniImagenet trained with 5 steps of 0.01, evaluated with 10; 15 query examples per
  class; meta-batch 4 (1-shot) and *2* (5-shot); 60,000 iterations.
* [MAML-T1] Same paper, Table 1 (accuracy, 95% CI): Omniglot 5-way 1-shot 98.7 +- 0.4,
  5-shot 99.9 +- 0.1; MiniImagenet 5-way 1-shot 48.70 +- 1.84, 5-shot 63.11 +- 0.92.
* [MAML-code] cbfinn/maml ``main.py`` at a7f45f1bcd7457fe97b227a21e89b8a82cc5fa49:
  usage commands (``--meta_batch_size=32 --update_lr=0.4 --num_updates=1`` for Omniglot;
  ``--meta_batch_size=4 --update_lr=0.01 --num_updates=5 --num_filters=32
  --max_pool=True`` for MiniImagenet, 1- and 5-shot alike; ``--metatrain_iterations=60000``);
  flag defaults ``meta_lr=0.001`` (Adam, ``maml.py``), ``num_filters=64``,
  ``max_pool=False`` (strided convolutions), ``norm='batch_norm'``; Omniglot uses K
  query examples per class (``DataGenerator(update_batch_size*2, ...)``), MiniImagenet
  15 during training (``update_batch_size+15``); sinusoid ``--metatrain_iterations=70000``,
  ``meta_batch_size=25``, 10 test-time steps.
  ``data_generator.py``: Omniglot 28x28, 1,100 / 100 / 423 characters, rotations.
  ``maml.py`` (line 147-148): for MiniImagenet only, every element of the meta-gradient
  is clipped to [-10, 10] before Adam's step (``tf.clip_by_value(grad, -10, 10)``).
* [MAML-loss] cbfinn/maml ``utils.py`` ``xent`` (a7f45f1, unchanged since the first
  commit): the loss of each example is its softmax cross-entropy divided by K
  (``update_batch_size``), and ``maml.py`` takes ``tf.gradients`` of that per-example
  vector, i.e. of its *sum* over the N*K support examples. The inner step therefore
  moves the weights by alpha * N times the gradient of the *mean* cross-entropy.
  paddlefsl's losses are means, so the presets' ``inner_lr`` is alpha * N: 0.4 * 5 = 2.0
  for Omniglot 5-way, 0.01 * 5 = 0.05 for MiniImagenet 5-way (the outer loss differs
  from the mean by a constant factor too, which Adam's step does not see).
* [ANIL] Raghu, Raghu, Bengio, Vinyals, "Rapid Learning or Feature Reuse? Towards
  Understanding the Effectiveness of MAML", ICLR 2020, arXiv:1909.09157. ANIL keeps
  MAML's architecture and training setup and adapts only the head. Table 2 (as quoted in
  learnables/learn2learn ``docs/tutorials/anil_tutorial/ANIL_tutorial.md`` at
  08b765023fc58020d65ca030fbb77b5359b5ef1c): MiniImageNet 5-way 1-shot 46.7 +- 0.4,
  5-shot 61.5 +- 0.5; Omniglot only 20-way (1-shot 96.2 +- 0.5, 5-shot 98.0 +- 0.3), so
  the 5-way Omniglot ANIL presets use the MAML 5-way settings and have no paper number.
  The ANIL appendix text itself could not be consulted here; these presets therefore
  take every hyperparameter from MAML, as the paper states it does.
* [l2l] learnables/learn2learn ``examples/vision/maml_miniimagenet.py`` (6720698) and
  ``anil_fc100.py`` (61f858a) are *not* paper settings (meta-batch 32, meta-lr 0.003,
  inner lr 0.5, 1 step; ANIL on FC100 with inner lr 0.1): not used for presets.

Where the paper and the reference code disagree, the presets follow the paper and say so
(the learning rates above agree with both: the paper gives alpha, the code its loss):
5-shot MiniImagenet meta-batch is 2 [MAML-A1] (the code's usage line says 4), and the
Omniglot test-time steps are 3 [MAML-A1] (the code computes 10 and reports every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DATASET_DEFAULTS", "PRESETS", "Preset", "get_preset", "reference_meta_grad_clip"]


@dataclass(frozen=True)
class Preset:
    """A named configuration and the result the paper reports for it.

    Attributes:
        values: Configuration fields (see :class:`~paddlefsl.train.config.TrainConfig`).
        paper: The paper's test accuracy with its 95% CI, or ``None``.
        sources: Keys of the sources above.
        note: Anything worth knowing about the setting.

    """

    values: dict[str, Any]
    paper: str | None
    sources: tuple[str, ...]
    note: str = ""


#: Defaults per dataset when no preset is given: MAML's 5-way 1-shot setting for the
#: image datasets [MAML-A1, MAML-code], with the inner learning rate of a mean loss
#: [MAML-loss], MAML's sinusoid setting otherwise (2x40 ReLU MLP,
#: K = 10, one step of 0.01, Adam 1e-3, meta-batch 25 [MAML Sec. 5.1, App. A.1;
#: MAML-code]).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "omniglot": {
        "ways": 5,
        "shots": 1,
        "meta_batch_size": 32,
        "inner_steps": 1,
        "inner_steps_test": 3,
        "inner_lr": 2.0,  # alpha = 0.4 on the reference code's summed loss [MAML-loss]
        "meta_lr": 1e-3,
        "iterations": 60000,
        "hidden": 64,
        "pooling": "stride",
        "image_size": 28,
        "omniglot_scheme": "maml",
    },
    "miniimagenet": {
        "ways": 5,
        "shots": 1,
        "queries": 15,
        "meta_batch_size": 4,
        "inner_steps": 5,
        "inner_steps_test": 10,
        "inner_lr": 0.05,  # alpha = 0.01 on the reference code's summed loss [MAML-loss]
        "meta_lr": 1e-3,
        "iterations": 60000,
        "hidden": 32,
        "pooling": "max",
        "image_size": 84,
    },
    "sinusoid": {
        "ways": 1,
        "shots": 10,
        "meta_batch_size": 25,
        "inner_steps": 1,
        "inner_steps_test": 10,
        "inner_lr": 0.01,
        "meta_lr": 1e-3,
        "iterations": 70000,
        "hidden": 40,
    },
}

# Omniglot presets leave ``queries`` unset: it resolves to ``shots``, K query examples per
# class as in cbfinn/maml (``DataGenerator(update_batch_size*2, ...)``), also after
# ``--shots`` overrides the preset.
# Every preset sets ``shots`` (and miniImageNet's ``meta_batch_size``) itself, so the
# dataset defaults above are the common base.
_OMNIGLOT = {"dataset": "omniglot", **DATASET_DEFAULTS["omniglot"]}
_MINI = {"dataset": "miniimagenet", **DATASET_DEFAULTS["miniimagenet"]}
_MAML_SOURCES = ("MAML-A1", "MAML-T1", "MAML-code", "MAML-loss")
_ANIL_SOURCES = ("ANIL", "MAML-A1", "MAML-code", "MAML-loss")
_BATCH_NOTE = "meta-batch 2 per MAML App. A.1; cbfinn/maml's usage line uses 4"

PRESETS: dict[str, Preset] = {
    "maml-omniglot-5w1s": Preset(
        {**_OMNIGLOT, "algorithm": "maml", "shots": 1}, "98.7 +- 0.4", _MAML_SOURCES
    ),
    "maml-omniglot-5w5s": Preset(
        {**_OMNIGLOT, "algorithm": "maml", "shots": 5}, "99.9 +- 0.1", _MAML_SOURCES
    ),
    "maml-miniimagenet-5w1s": Preset(
        {**_MINI, "algorithm": "maml", "shots": 1, "meta_batch_size": 4},
        "48.70 +- 1.84",
        _MAML_SOURCES,
    ),
    "maml-miniimagenet-5w5s": Preset(
        {**_MINI, "algorithm": "maml", "shots": 5, "meta_batch_size": 2},
        "63.11 +- 0.92",
        _MAML_SOURCES,
        _BATCH_NOTE,
    ),
    "anil-omniglot-5w1s": Preset(
        {**_OMNIGLOT, "algorithm": "anil", "shots": 1},
        None,
        _ANIL_SOURCES,
        "ANIL reports 20-way Omniglot only (96.2 +- 0.5)",
    ),
    "anil-omniglot-5w5s": Preset(
        {**_OMNIGLOT, "algorithm": "anil", "shots": 5},
        None,
        _ANIL_SOURCES,
        "ANIL reports 20-way Omniglot only (98.0 +- 0.3)",
    ),
    "anil-miniimagenet-5w1s": Preset(
        {**_MINI, "algorithm": "anil", "shots": 1, "meta_batch_size": 4},
        "46.7 +- 0.4",
        _ANIL_SOURCES,
    ),
    "anil-miniimagenet-5w5s": Preset(
        {**_MINI, "algorithm": "anil", "shots": 5, "meta_batch_size": 2},
        "61.5 +- 0.5",
        _ANIL_SOURCES,
        _BATCH_NOTE,
    ),
}


#: cbfinn/maml's MiniImagenet meta-gradient clip, on its own (summed) loss [MAML-code].
REFERENCE_CLIP = 10.0


def reference_meta_grad_clip(ways: int, shots: int, queries: int) -> float:
    """cbfinn/maml's miniImageNet meta-gradient clip, in units of paddlefsl's mean loss.

    The reference clips each element of the gradient of its outer loss to [-10, 10]
    [MAML-code]. That loss sums ``cross-entropy / shots`` over the ``ways * queries``
    query examples of a task (then averages the tasks) [MAML-loss], so it is ``ways *
    queries / shots`` times paddlefsl's mean cross-entropy, and so is its gradient.

    Example:
        >>> round(reference_meta_grad_clip(ways=5, shots=1, queries=15), 4)
        0.1333

    """
    return REFERENCE_CLIP * shots / (ways * queries)


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        KeyError: unknown name; the message lists the known ones.

    Example:
        >>> get_preset("maml-omniglot-5w1s").values["inner_lr"]
        2.0

    """
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None

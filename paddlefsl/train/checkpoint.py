"""Crash-safe checkpoints: model ``.pdparams``, optimizer ``.pdopt`` and a JSON record.

Layout of ``<run>/checkpoints/``::

    iter-0000500.pdparams   model state_dict at iteration 500
    iter-0000500.pdopt      optimizer state (Adam moments, LR schedule, ...)
    last.json               record of the newest checkpoint
    best.json               record of the best one on validation
    kept-0005000.json       record of a checkpoint kept for good (``keep_every``)

Every file is written to a temporary file in the same folder, fsynced, then moved into
place with ``os.replace``. The binaries carry the iteration in their names and the JSON
record, written last, is what points at them; so a kill at any moment leaves the
previous record pointing at complete files. Files no record points at are deleted.

:func:`export_checkpoint` copies one checkpoint into a small folder for sharing::

    model.pdparams   the model state_dict (no optimizer, no random states)
    best.json        its record, pointing at model.pdparams
    metrics.jsonl    the run's learning curve, when the run has one
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paddle

from .._fsync import fsync_path
from .errors import CheckpointError
from .metrics import METRICS_FILE
from .rng import capture_rng_state

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointManager",
    "atomic_write_bytes",
    "checkpointed_layer",
    "export_checkpoint",
    "kept_tag",
    "load_checkpoint",
    "resolve_checkpoint",
]

FORMAT = "paddlefsl-checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
EXPORT_MODEL_FILE = "model.pdparams"
EXPORT_RECORD_FILE = "best.json"
#: Configuration fields that only make sense on the machine that trained the model.
MACHINE_FIELDS = ("output", "data_root")
_TMP_SUFFIX = ".tmp"
KEPT_PREFIX = "kept-"


def kept_tag(iteration: int) -> str:
    """The record name of the checkpoint kept for good at ``iteration``.

    ``last`` and ``best`` are overwritten as a run goes on; a ``kept-*`` record stays, so
    its files are never pruned (a learning curve to score later, a point to branch from).

    Example:
        >>> kept_tag(5000)
        'kept-0005000'

    """
    return f"{KEPT_PREFIX}{int(iteration):07d}"


def _write_all(handle: Any, data: bytes) -> None:
    # A separate function so tests can simulate a crash in the middle of a write.
    handle.write(data)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.json"
        >>> atomic_write_bytes(target, b"{}")
        >>> target.read_bytes()
        b'{}'

    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as handle:
            _write_all(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent, directory=True)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    paddle.save(obj, buffer)
    return buffer.getvalue()


def _deserialize(data: bytes) -> Any:
    return paddle.load(io.BytesIO(data))


def _holds(path: Path, data: bytes) -> bool:
    """Whether the file at ``path`` already holds exactly ``data``."""
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ optimizer state keys
# Paddle keys optimizer accumulators by the parameters' global unique names
# ("conv2d_3.w_0_moment1_0"), which depend on how many layers the process built before.
# Stored keys use the structured names ("features.0.0.weight") so that a checkpoint loads
# into a freshly built model, in a new process or in the same one.
_PARAM_PREFIX = "param::"


def _structured_names(model: paddle.nn.Layer) -> dict[str, str]:
    return {p.name: name for name, p in model.named_parameters()}


def _match_param(key: str, names: list[str]) -> str | None:
    best = None
    for name in names:
        if key.startswith(name + "_") and (best is None or len(name) > len(best)):
            best = name
    return best


def _rename_state(state: dict[str, Any], model: paddle.nn.Layer) -> dict[str, Any]:
    to_structured = _structured_names(model)
    names = list(to_structured)
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = _rename_state(value, model) if key == "master_weights" else value
            continue
        if key in to_structured:  # master_weights are keyed by the bare name
            out[f"{_PARAM_PREFIX}{to_structured[key]}::"] = value
            continue
        owner = _match_param(key, names)
        if owner is None:
            out[key] = value
        else:
            suffix = key[len(owner) :]
            out[f"{_PARAM_PREFIX}{to_structured[owner]}::{suffix}"] = value
    return out


def _unrename_state(state: dict[str, Any], model: paddle.nn.Layer) -> dict[str, Any]:
    to_unique = {name: p.name for name, p in model.named_parameters()}
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = _unrename_state(value, model) if key == "master_weights" else value
            continue
        if not key.startswith(_PARAM_PREFIX):
            out[key] = value
            continue
        structured, suffix = key[len(_PARAM_PREFIX) :].rsplit("::", 1)
        if structured not in to_unique:
            raise CheckpointError(
                f"the optimizer state has an entry for parameter {structured!r}, which this "
                "model does not have; the checkpoint was made with a different model"
            )
        out[to_unique[structured] + suffix] = value
    return out


def checkpointed_layer(learner: paddle.nn.Layer) -> paddle.nn.Layer:
    """The layer whose state a checkpoint of ``learner`` holds.

    The wrapped model, or the whole learner when it has parameters of its own
    (MetaSGD's learning rates), which would otherwise be lost on resume.

    Example:
        >>> import paddle
        >>> from paddlefsl.metaopt import MAML, MetaSGD
        >>> net = paddle.nn.Linear(2, 2)
        >>> checkpointed_layer(MAML(net, lr=0.1)) is net
        True
        >>> sorted(checkpointed_layer(MetaSGD(net)).state_dict())[-1]
        'module.weight'

    """
    module = getattr(learner, "module", None)
    if not isinstance(module, paddle.nn.Layer):
        return learner
    of_model = {id(p) for p in module.parameters()}
    return learner if any(id(p) not in of_model for p in learner.parameters()) else module


# ------------------------------------------------------------------ records
@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        record: The JSON record (iteration, rng, config, state, files, ...).
        path: Path of the record file.
        model_state: The model's state_dict.
        optimizer_state: The optimizer state (structured-name keys), or ``None``.

    """

    record: dict[str, Any]
    path: Path
    model_state: dict[str, Any]
    optimizer_state: dict[str, Any] | None

    @property
    def iteration(self) -> int:
        """Number of completed meta-iterations when it was saved."""
        return int(self.record["iteration"])

    @property
    def config(self) -> dict[str, Any]:
        """The run configuration saved with it (may be empty)."""
        return dict(self.record.get("config") or {})

    @property
    def run_dir(self) -> Path:
        """The run folder (or export folder) the checkpoint belongs to."""
        return _run_folder(self.path, self.record)

    def load_model(self, model: paddle.nn.Layer) -> None:
        """Copy the saved weights and buffers into ``model`` (same architecture).

        Raises:
            CheckpointError: the parameter names or shapes do not match.

        """
        own = model.state_dict()
        missing = sorted(set(own) - set(self.model_state))
        unexpected = sorted(set(self.model_state) - set(own))
        wrong = sorted(
            k
            for k in set(own) & set(self.model_state)
            if list(own[k].shape) != list(self.model_state[k].shape)
        )
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"checkpoint {self.path} does not fit this model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}"
            )
        model.set_state_dict(self.model_state)

    def load_optimizer(self, optimizer: paddle.optimizer.Optimizer, model: paddle.nn.Layer) -> None:
        """Restore the optimizer state (accumulators, LR schedule) for ``model``'s params."""
        if self.optimizer_state is None:
            hint = ""
            if "exported_from" in self.record:
                origin = self.record["exported_from"].get("record")
                hint = f": it is an export (weights only); resume from the run, {origin}"
            raise CheckpointError(f"checkpoint {self.path} has no optimizer state{hint}")
        optimizer.set_state_dict(_unrename_state(self.optimizer_state, model))


def _all_finite(model: paddle.nn.Layer) -> bool:
    return all(bool(paddle.isfinite(p).all()) for p in model.parameters())


class CheckpointManager:
    """Saves and loads the ``last`` / ``best`` checkpoints of one run.

    Args:
        run_dir: The run's output folder; checkpoints go to ``run_dir/checkpoints``.

    Example:
        >>> import tempfile, paddle
        >>> net = paddle.nn.Linear(2, 2)
        >>> opt = paddle.optimizer.Adam(1e-3, parameters=net.parameters())
        >>> manager = CheckpointManager(tempfile.mkdtemp())
        >>> _ = manager.save(["last"], net, opt, iteration=3, config={"seed": 0})
        >>> manager.load("last").iteration
        3

    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / CHECKPOINT_DIR

    def record_path(self, tag: str) -> Path:
        """Where the record of ``tag`` lives."""
        return self.directory / f"{tag}.json"

    def has(self, tag: str) -> bool:
        """Whether a ``tag`` record exists."""
        return self.record_path(tag).is_file()

    def save(
        self,
        tags: list[str] | tuple[str, ...],
        model: paddle.nn.Layer,
        optimizer: paddle.optimizer.Optimizer | None,
        iteration: int,
        config: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
    ) -> Path:
        """Write the model, optimizer and random states, then point ``tags`` at them.

        Args:
            tags: Record names to update, e.g. ``["last"]`` or ``["last", "best"]``.
            model: The model whose ``state_dict`` is saved.
            optimizer: Its optimizer (``None`` to save weights only).
            iteration: Completed meta-iterations.
            config: Run configuration (JSON-serialisable).
            state: Extra JSON-serialisable trainer state (best metric, ...).

        Returns:
            Path of the first record written.

        Raises:
            CheckpointError: the weights are NaN / infinite (never saved over a good one).

        """
        if not _all_finite(model):
            raise CheckpointError(
                f"refusing to save a checkpoint at iteration {iteration}: the weights contain "
                "NaN or inf; the previous checkpoint is kept"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = f"iter-{int(iteration):07d}"
        files = {"model": f"{stem}.pdparams"}
        blobs = {"model": _serialize(model.state_dict())}
        if optimizer is not None:
            files["optimizer"] = f"{stem}.pdopt"
            blobs["optimizer"] = _serialize(_rename_state(optimizer.state_dict(), model))
        for key, data in blobs.items():
            path = self.directory / files[key]
            # A kept or best checkpoint often coincides with the "last" one just written for
            # the same iteration: reading back is much cheaper than a rewrite and an fsync.
            if not _holds(path, data):
                atomic_write_bytes(path, data)
        record = {
            "format": FORMAT,
            "iteration": int(iteration),
            "files": files,
            "sha256": {key: _sha256(data) for key, data in blobs.items()},
            "rng": capture_rng_state(),
            "config": config or {},
            "state": state or {},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        written = []
        for tag in tags:
            path = self.record_path(tag)
            atomic_write_json(path, dict(record, tag=tag))
            written.append(path)
        self._prune()
        return written[0]

    def kept(self) -> list[Path]:
        """Records of the checkpoints kept for good (:func:`kept_tag`), oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob(f"{KEPT_PREFIX}*.json"))

    def _records(self) -> list[dict[str, Any]]:
        out = []
        for path in self.directory.glob("*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def _prune(self) -> None:
        keep = {name for rec in self._records() for name in (rec.get("files") or {}).values()}
        for path in self.directory.iterdir():
            stale_tmp = path.name.startswith(".") and path.name.endswith(_TMP_SUFFIX)
            orphan = path.name.startswith("iter-") and path.name not in keep
            if stale_tmp or orphan:
                path.unlink(missing_ok=True)

    def load(self, tag: str = "last") -> Checkpoint:
        """Load the ``tag`` checkpoint (see :func:`load_checkpoint`)."""
        path = self.record_path(tag)
        if not path.is_file():
            raise CheckpointError(f"no '{tag}' checkpoint in {self.directory}")
        return load_checkpoint(path)


def resolve_checkpoint(path: str | os.PathLike, which: str = "best") -> Path:
    """Find a checkpoint record from a run folder, its ``checkpoints`` folder or a file.

    A folder resolves to its ``which`` record (``"best"``, falling back to ``"last"``);
    a ``.pdparams`` / ``.pdopt`` file to the record that points at it.

    Example:
        >>> resolve_checkpoint("runs/does-not-exist")  # doctest: +SKIP
        Traceback (most recent call last):
        CheckpointError: ...

    """
    path = Path(path).expanduser()
    if path.is_dir():
        for folder in (path / CHECKPOINT_DIR, path):
            for tag in (which, "last", "best"):
                candidate = folder / f"{tag}.json"
                if candidate.is_file():
                    return candidate
        raise CheckpointError(
            f"no checkpoint found in {path}: expected {path / CHECKPOINT_DIR}/best.json or "
            "last.json (written by `paddlefsl train`)"
        )
    if path.suffix == ".json" and path.is_file():
        return path
    if path.suffix in (".pdparams", ".pdopt") and path.is_file():
        for candidate in sorted(path.parent.glob("*.json")):
            try:
                files = json.loads(candidate.read_text()).get("files", {})
            except (OSError, ValueError):
                continue
            if path.name in files.values():
                return candidate
        raise CheckpointError(f"no checkpoint record in {path.parent} refers to {path.name}")
    raise CheckpointError(f"checkpoint {path} does not exist")


def _run_folder(record_path: Path, record: dict[str, Any]) -> Path:
    # A run keeps its records in <run>/checkpoints/; an export keeps its record at the top.
    folder = record_path.parent
    if folder.name == CHECKPOINT_DIR and "exported_from" not in record:
        return folder.parent
    return folder


def _read_record(record_path: Path) -> dict[str, Any]:
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint record {record_path}: {err}") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{record_path} is not a paddlefsl checkpoint record")
    files, sums = record.get("files"), record.get("sha256")
    if (
        not isinstance(files, dict)
        or "model" not in files
        or not isinstance(sums, dict)
        or set(files) - set(sums)
        or "iteration" not in record
    ):
        raise CheckpointError(
            f"checkpoint record {record_path} is incomplete (it needs iteration, files and "
            "sha256 entries); it was not written by paddlefsl"
        )
    return record


def _read_file(record_path: Path, record: dict[str, Any], key: str) -> bytes:
    file = record_path.parent / record["files"][key]
    try:
        data = file.read_bytes()
    except OSError as err:
        raise CheckpointError(f"checkpoint file {file} is missing: {err}") from err
    if _sha256(data) != record["sha256"][key]:
        raise CheckpointError(f"checkpoint file {file} is damaged (sha256 mismatch)")
    return data


def load_checkpoint(path: str | os.PathLike, which: str = "best") -> Checkpoint:
    """Load a checkpoint: the record, the model state and the optimizer state.

    Args:
        path: A run folder, its ``checkpoints`` folder, an export folder, a record
            ``.json`` or a ``.pdparams`` file.
        which: For folders, ``"best"`` or ``"last"``.

    Raises:
        CheckpointError: missing files, a checksum mismatch or an unknown format.

    """
    record_path = resolve_checkpoint(path, which)
    record = _read_record(record_path)
    loaded = {key: _deserialize(_read_file(record_path, record, key)) for key in record["files"]}
    return Checkpoint(record, record_path, loaded["model"], loaded.get("optimizer"))


def export_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    which: str = "best",
    overwrite: bool = False,
) -> Path:
    """Copy a checkpoint's weights into a small, self-contained folder for sharing.

    ``destination`` receives ``model.pdparams`` (the model weights, byte for byte; no
    optimizer state), ``best.json`` (a record of the same format: iteration, config,
    trainer state, sha256, and ``exported_from``, the source record and its time; no
    random states) and, when the run has one, ``metrics.jsonl``. The machine-specific
    config fields ``output`` and ``data_root`` are cleared, so the dataset folder is
    given at evaluation time. :func:`load_checkpoint` and ``paddlefsl eval`` accept the
    folder like a run folder.

    Files are written atomically and the record last, so an interrupted export leaves
    either no record or a complete export. Exporting the same weights again refreshes
    the folder; replacing a different export needs ``overwrite`` and removes the
    replaced export's ``eval_*.json`` and ``learning_curve.png``.

    Args:
        source: A run folder, its ``checkpoints`` folder, a record ``.json`` or a
            ``.pdparams`` file (as for :func:`load_checkpoint`).
        destination: The export folder (created if needed).
        which: For folders, ``"best"`` or ``"last"``.
        overwrite: Replace a different export already in ``destination``.

    Returns:
        Path of the exported record, ``destination/best.json``.

    Raises:
        CheckpointError: the source is missing or damaged (sha256 mismatch), or
            ``destination`` is a training run or holds a different export.

    Example:
        >>> import tempfile, pathlib, paddle
        >>> net = paddle.nn.Linear(2, 2)
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> _ = CheckpointManager(run).save(["best"], net, None, iteration=3)
        >>> record = export_checkpoint(run, run.parent / (run.name + "-export"))
        >>> record.name, load_checkpoint(record.parent).iteration
        ('best.json', 3)

    """
    record_path = resolve_checkpoint(source, which)
    record = _read_record(record_path)
    model = _read_file(record_path, record, "model")
    destination = Path(destination).expanduser()
    config = dict(record.get("config") or {})
    for name in MACHINE_FIELDS:
        if name in config:
            config[name] = None
    exported = {
        "format": FORMAT,
        "tag": "best",
        "iteration": int(record["iteration"]),
        "files": {"model": EXPORT_MODEL_FILE},
        "sha256": {"model": _sha256(model)},
        "config": config,
        "state": dict(record.get("state") or {}),
        "saved_at": record.get("saved_at"),
        "exported_from": {"record": str(record_path), "saved_at": record.get("saved_at")},
    }
    replacing = _check_export_destination(destination, record_path, exported, overwrite)
    metrics = _run_folder(record_path, record) / METRICS_FILE

    destination.mkdir(parents=True, exist_ok=True)
    target = destination / EXPORT_RECORD_FILE
    if replacing:
        # Drop the old record first: it must never point at the new weights.
        target.unlink()
        fsync_path(destination, directory=True)
        for stale in (*destination.glob("eval_*.json"), destination / "learning_curve.png"):
            stale.unlink(missing_ok=True)
    atomic_write_bytes(destination / EXPORT_MODEL_FILE, model)
    if metrics.is_file():
        atomic_write_bytes(destination / METRICS_FILE, metrics.read_bytes())
    elif replacing:
        (destination / METRICS_FILE).unlink(missing_ok=True)
    atomic_write_json(target, exported)
    return target


def _check_export_destination(
    destination: Path, record_path: Path, exported: dict[str, Any], overwrite: bool
) -> bool:
    """Raise if ``destination`` may not receive the export; True if it replaces another."""
    if destination.exists() and not destination.is_dir():
        raise CheckpointError(f"export destination {destination} is a file, not a folder")
    if not destination.is_dir():
        return False
    if destination.resolve() == record_path.parent.resolve():
        raise CheckpointError(
            f"cannot export {record_path} into its own folder {destination}; choose another one"
        )
    force = "pass --force (overwrite=True) to replace it, or choose another folder"
    record_file = destination / EXPORT_RECORD_FILE
    if not record_file.is_file():
        if (destination / CHECKPOINT_DIR).exists() or (destination / "last.json").exists():
            raise CheckpointError(
                f"{destination} holds a training run's checkpoints, not an export; export "
                "into a new folder"
            )
        if (destination / EXPORT_MODEL_FILE).exists() and not overwrite:
            raise CheckpointError(
                f"{destination} holds {EXPORT_MODEL_FILE} but no {EXPORT_RECORD_FILE} (an "
                f"interrupted export?); {force}"
            )
        return False
    try:
        old = json.loads(record_file.read_text())
    except (OSError, ValueError) as err:
        if not overwrite:
            raise CheckpointError(f"cannot read {record_file} ({err}); {force}") from err
        return True
    if not isinstance(old, dict) or "exported_from" not in old:
        raise CheckpointError(
            f"{destination} holds a training run's checkpoints, not an export; export into "
            "a new folder"
        )
    if (old.get("sha256") or {}).get("model") == exported["sha256"]["model"]:
        return False  # the same weights: refresh the files
    if not overwrite:
        origin = (old.get("exported_from") or {}).get("record")
        raise CheckpointError(
            f"{destination} already holds a different export (iteration "
            f"{old.get('iteration')} of {origin}); {force}"
        )
    return True

"""Checkpoints of a training run, and resuming from them.

A checkpoint is a pair of files in one folder, written atomically by rank 0 after
``epochs_done`` epochs:

* ``checkpoint-EEEEEE.model.pt``: the model with the weights the run would return if it
  ended there (those of the best epoch so far, or the starting weights if no epoch beat
  them), with :func:`dolfinx_mno.io.save_model` (a checkpoint is a model file, usable as
  a closure); its metadata is the caller's plus ``{"training": {"epochs": ...,
  "best_epoch": ..., "settings": ...}}``.
* ``checkpoint-EEEEEE.state.pt``: tensors and plain containers only (loadable with
  ``weights_only=True``): the epochs done, the settings (JSON), the model file's SHA-256,
  the optimiser's and the scheduler's ``state_dict``, the history, the best weights, the
  early-stopping counter, and the weights after the last epoch (``"weights"``; ``None``
  when they are the best ones, which the model file holds), from which a resumed run
  continues; a fingerprint of the training and validation data (``"data"``: counts and
  checksums, compared on resume); and the SHA-256 of all of these (``"sha256"``),
  checked on resume.

The model file is written first and the state second; older pairs are deleted only after
both are in place, and :meth:`Checkpoints.resume` takes the newest state whose model file
has the digest it recorded, so a run killed between the two writes resumes from the
previous pair. Newer pairs passed over as damaged (unreadable, truncated, failing their
SHA-256, or another file of that name) are named in one ``RuntimeWarning``, on every
rank, with the checkpoint resumed instead.

The checkpoint options of ``fit`` and ``fit_rollout``: ``checkpoint_dir`` (the folder,
created by rank 0; ``None`` for no checkpoints), ``checkpoint_every`` (a checkpoint every
this many epochs, and at the end), ``resume`` (continue from the newest complete
checkpoint in the folder, or start afresh if there is none) and ``metadata`` (a JSON dict
stored in the checkpoint model files). A fresh run (``resume=False``) refuses a folder that
already holds checkpoint files, before training: a later resume would not know which
run's pair to take. With ``checkpoint_dir`` the model's architecture
must be registered (:func:`dolfinx_mno.io.register_architecture`; checked before
training), since a checkpoint is a model file. A run resumes only with the data and the settings
of the interrupted one (injected optimisers and schedules compared by class and
configuration, the architecture as the model file records it but for its ``seed``);
only ``epochs``, ``checkpoint_every``, ``metadata``, ``spec``, ``progress`` and
``callback`` may change (other training or validation data of the same sizes are told by
the data fingerprint). Anything else is refused, naming what differs, before anything
is loaded; a state that still fails to load leaves the model, optimiser and schedule as
they were.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpi4py import MPI

import torch

from dolfinx_mno._mpi import agree, describe, on_root
from dolfinx_mno.io import (
    ModelFileError,
    architecture_config,
    atomic_torch_save,
    read_model_file,
    read_torch_file,
    tensor_bytes,
    verify_digest,
)
from dolfinx_mno.io import save_model as save_model_file
from dolfinx_mno.training.optim import Scheduler
from dolfinx_mno.training.state import TrainingHistory, TrainingState, clone_state

__all__ = ["STATE_FORMAT", "STATE_FORMAT_VERSION", "Checkpoints"]

#: Identifies a training-state file and its layout version.
STATE_FORMAT = "dolfinx_mno.training_state"
STATE_FORMAT_VERSION = 1
_CHECKPOINT = re.compile(r"^checkpoint-(\d{6,})\.state\.pt$")
#: Either file of a pair: a fresh run refuses a folder that holds any.
_CHECKPOINT_FILE = re.compile(r"^checkpoint-(\d{6,})\.(model|state)\.pt$")


def _as_json(value: Any) -> Any:
    """An architecture as JSON gives it back (tuples become lists), without its ``seed``s.

    A seed sets the initial weights only, which a resume replaces: a run resumed with a
    model built from another seed is the same architecture.
    """

    def without_seeds(item: Any) -> Any:
        if isinstance(item, dict):
            return {k: without_seeds(v) for k, v in item.items() if k != "seed"}
        if isinstance(item, list):
            return [without_seeds(v) for v in item]
        return item

    return without_seeds(json.loads(json.dumps(value, sort_keys=True)))


def _paths(directory: Path, epochs_done: int) -> tuple[Path, Path]:
    stem = directory / f"checkpoint-{epochs_done:06d}"
    return Path(f"{stem}.model.pt"), Path(f"{stem}.state.pt")


def _state_digest(contents: Mapping[str, Any]) -> str:
    """SHA-256 over a state's contents but its ``"sha256"``.

    Every value: tensors by dtype, shape and bytes, containers in order (dicts by key),
    other values by type and ``repr``.
    """
    sha = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            sha.update(f"tensor {value.dtype} {list(value.shape)}".encode())
            sha.update(tensor_bytes(value))
        elif isinstance(value, Mapping):
            sha.update(b"{")
            for key in sorted(value, key=repr):
                sha.update(repr(key).encode() + b":")
                feed(value[key])
            sha.update(b"}")
        elif isinstance(value, list | tuple):
            sha.update(b"[" if isinstance(value, list) else b"(")
            for item in value:
                feed(item)
            sha.update(b"]")
        else:
            sha.update(f"{type(value).__name__} {value!r};".encode())

    feed({k: v for k, v in contents.items() if k != "sha256"})
    return sha.hexdigest()


def _load_state(state_path: Path) -> dict[str, Any]:
    """A training-state file's contents, verified.

    Raises:
        ModelFileError: Not a training-state file, or one that fails its SHA-256 check
            (a state written before it held one is not checked).
    """
    contents = read_torch_file(
        state_path, "training-state file", STATE_FORMAT, STATE_FORMAT_VERSION
    )
    if "sha256" in contents:
        verify_digest(
            state_path,
            lambda: _state_digest(contents),
            contents["sha256"],
            "the training-state file is corrupted.",
        )
    return contents


def latest_checkpoint(directory: Path) -> tuple[int | None, list[str]]:
    """The newest complete (model, state) pair in ``directory``, and the pairs passed over.

    A pair is complete when the model file's digest is the one the state recorded; a
    model file written just before an interruption, without its state, is not a pair (no
    state file names it) and is left out silently. A newer state whose model file or
    itself is missing, damaged or not one (another file of that name) is passed over for
    the newest intact pair, and said so.

    Returns:
        The epochs done of the newest complete pair (``None``: none), and for each newer
        pair passed over, newest first, why: ``"the pair after E epochs (TypeName:
        message naming the file)"``.
    """
    if not directory.is_dir():
        return None, []
    found = sorted(
        (int(m.group(1)) for f in directory.iterdir() if (m := _CHECKPOINT.match(f.name))),
        reverse=True,
    )
    skipped: list[str] = []
    for epochs_done in found:
        model_path, state_path = _paths(directory, epochs_done)
        try:
            state = _load_state(state_path)
            digest = read_model_file(model_path).sha256
        except (ModelFileError, OSError) as err:  # damaged or missing: not a complete pair
            reason = describe(err, first_line=True).rstrip(".")
            skipped.append(f"the pair after {epochs_done} epochs ({reason})")
            continue
        if digest == state.get("model_sha256"):
            return epochs_done, skipped
        skipped.append(
            f"the pair after {epochs_done} epochs (the model file {os.fspath(model_path)!r} "
            "is not the one its state was written with: the SHA-256 differs)"
        )
    return None, skipped


def _warn_skipped(directory: Path, skipped: list[str], choice: int | None) -> None:
    """Warn that damaged checkpoints were passed over, and say what is resumed instead.

    Every rank warns, with rank 0's findings: a warning filter that turns warnings into
    errors then raises on every rank, not on rank 0 alone before a collective.
    """
    if not skipped:
        return
    instead = (
        f"Resuming from {_paths(directory, choice)[1].name!r} (after {choice} epochs) instead."
        if choice is not None
        else "No intact checkpoint is left: the run starts afresh."
    )
    warnings.warn(
        f"resume=True passed over {len(skipped)} damaged checkpoint(s) in "
        f"{os.fspath(directory)!r}: {'; '.join(skipped)}. {instead} Remove or restore the "
        "damaged files to silence this warning.",
        RuntimeWarning,
        # The caller of fit or fit_rollout, past this package and torch's decorators.
        skip_file_prefixes=(str(Path(__file__).parents[1]), str(Path(torch.__file__).parent)),
    )


class Checkpoints:
    """The checkpoints of one run in ``directory`` (collective on ``comm``).

    Args:
        directory: The folder (created by rank 0).
        every: Write a checkpoint every this many epochs, and at the end of the run.
        settings: The run's settings (JSON); a resumed run must have the same.
        metadata: JSON metadata for the model files, e.g. the operand spec.
        comm: The communicator of the run.
        data: A fingerprint of the run's data, stored in the state files and compared on
            resume: ``{what: {"count": n, "checksum": "…"}}``, ``what`` naming the data
            for the messages (``"training samples"``, ``"validation trajectories"``, ...).
        resume: The run resumes from the folder's checkpoints. A fresh run (``False``)
            refuses a folder that already holds checkpoint files: its own checkpoints would
            sit beside the earlier run's, and a later ``resume=True`` would take the
            newest pair, whichever run wrote it.

    Raises:
        FileExistsError: A fresh run's folder holds checkpoint files, or ``directory`` is
            a file (on every rank, before training).
        PermissionError: No file can be written in the folder (on every rank, before
            training).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        every: int,
        settings: Mapping[str, Any],
        metadata: Mapping[str, Any] | None,
        comm: MPI.Comm,
        resume: bool = False,
        data: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.directory = Path(directory)
        self.data = None if data is None else {k: dict(v) for k, v in data.items()}
        self.every = int(every)
        self.settings = dict(settings)
        self.metadata = dict(metadata or {})
        self.comm = comm
        on_root(
            comm,
            lambda: self._prepare(resume),
            f"Preparing the checkpoint folder {os.fspath(self.directory)!r}",
        )

    def _prepare(self, resume: bool) -> None:
        """Create the folder, check it is writable and, if fresh, holds no checkpoint (root).

        Writing is tried as a checkpoint does it, with a temporary file, so that a folder
        without write permission fails before training, not after ``every`` epochs.
        """
        directory = self.directory
        directory.mkdir(parents=True, exist_ok=True)
        try:
            handle, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-", suffix=".tmp")
            os.close(handle)
            os.unlink(probe)
        except OSError as err:
            raise PermissionError(
                f"Cannot write checkpoints in {os.fspath(directory)!r} ({describe(err)}); "
                "choose a checkpoint_dir you can write to, or make this one writable."
            ) from err
        if resume:
            return
        found = [
            (int(m.group(1)), f.name)
            for f in directory.iterdir()
            if (m := _CHECKPOINT_FILE.match(f.name))
        ]
        if found:
            epochs_done, name = max(found)
            raise FileExistsError(
                f"The checkpoint folder {os.fspath(directory)!r} already holds {len(found)} "
                f"checkpoint file(s) of an earlier run (the newest: {name!r}, after "
                f"{epochs_done} epochs). Pass resume=True to continue that run, or, to start "
                "afresh, choose another checkpoint_dir or remove those files."
            )

    @classmethod
    def from_options(
        cls,
        options: Mapping[str, Any],
        *,
        settings: Mapping[str, Any],
        metadata: Mapping[str, Any] | None,
        comm: MPI.Comm,
        data: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Checkpoints | None:
        """The checkpoints that ``fit``'s or ``fit_rollout``'s options ask for (collective).

        From ``checkpoint_dir``, ``checkpoint_every`` and ``resume``; ``None`` without a
        folder. ``data``: the fingerprint of the run's data (see :class:`Checkpoints`).
        """
        directory = options["checkpoint_dir"]
        if directory is None:
            return None
        every = options["checkpoint_every"]
        return cls(
            directory,
            every=every,
            settings=settings,
            metadata=metadata,
            comm=comm,
            resume=bool(options["resume"]),
            data=data,
        )

    def due(self, epochs_done: int, last: bool) -> bool:
        """Whether to write a checkpoint after ``epochs_done`` epochs (``last``: run over)."""
        return last or epochs_done % self.every == 0

    def save(
        self,
        epochs_done: int,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Scheduler | None,
        state: TrainingState,
    ) -> None:
        """Write the (model, state) pair of ``epochs_done``, then remove older pairs.

        The model file holds the best weights so far (what the run would return), the
        state the current ones if they differ.
        """
        directory, comm = self.directory, self.comm
        model_path, state_path = _paths(directory, epochs_done)
        info = {
            "training": {
                "epochs": epochs_done,
                "best_epoch": state.history.best_epoch,
                "settings": self.settings,
            }
        }
        current = clone_state(model)
        best = state.best_state
        if current.keys() == best.keys() and all(torch.equal(current[k], best[k]) for k in best):
            weights = None
            digest = save_model_file(
                model_path, model, metadata={**self.metadata, **info}, comm=comm
            )
        else:
            weights = current
            model.load_state_dict(best)  # in place: the optimiser keeps its parameters
            try:
                digest = save_model_file(
                    model_path, model, metadata={**self.metadata, **info}, comm=comm
                )
            finally:
                model.load_state_dict(current)
        contents = {
            "format": STATE_FORMAT,
            "format_version": STATE_FORMAT_VERSION,
            "epochs_done": epochs_done,
            "settings": json.dumps(self.settings, sort_keys=True),
            "model_sha256": digest,
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "history": dataclasses.asdict(state.history),
            "best_state": dict(state.best_state),
            "bad_epochs": state.bad_epochs,
            "weights": weights,
            "data": self.data,
        }

        def write() -> None:
            contents["sha256"] = _state_digest(contents)
            atomic_torch_save(contents, state_path)
            for old in directory.iterdir():
                match = _CHECKPOINT.match(old.name)
                if match and int(match.group(1)) < epochs_done:
                    for path in _paths(directory, int(match.group(1))):
                        path.unlink(missing_ok=True)

        on_root(comm, write, f"Writing the checkpoint {os.fspath(state_path)!r}")

    def resume(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Scheduler | None,
    ) -> TrainingState | None:
        """Load the newest complete checkpoint into the training objects (collective).

        Returns:
            The restored state (``history.resumed_from`` set), or ``None`` if the folder
            holds no complete checkpoint.

        Warns:
            RuntimeWarning: Newer pairs were passed over as damaged (on every rank).

        Raises:
            ModelFileError: An unreadable state file (on every rank).
            ValueError: A checkpoint of other settings or data (on every rank).
        """
        comm = self.comm
        # Rank 0 chooses, so that every rank restores the same pair.
        choice, skipped = on_root(
            comm,
            lambda: latest_checkpoint(self.directory),
            f"Choosing a checkpoint in {os.fspath(self.directory)!r}",
        )
        _warn_skipped(self.directory, skipped, choice)
        if choice is None:
            return None
        cause: Exception | None = None
        contents: dict[str, Any] = {}
        try:
            contents = self._load(choice, model, optimizer, scheduler)
        except (ValueError, OSError, RuntimeError, KeyError) as err:
            cause = err
        agree(comm, None, "Resuming from the checkpoint", ValueError, cause=cause)
        history = TrainingHistory(**contents["history"])
        history.resumed_from = choice
        best_state = {k: v.clone() for k, v in contents["best_state"].items()}
        return TrainingState(history, best_state, int(contents["bad_epochs"]))

    def _check_data(self, state_path: Path, saved: Mapping[str, Any] | None) -> None:
        """Refuse a checkpoint whose data fingerprint differs from this run's (local).

        A state written before it held one (``saved`` is ``None``) is not checked.
        """
        data = self.data
        if saved is None or data is None or saved == data:
            return

        def described(entry: Mapping[str, Any] | None) -> str:
            if entry is None:
                return "none"
            return f"{entry['count']} with checksum {entry['checksum']}"

        differ = "; ".join(
            f"the {what} differ ({described(saved.get(what))} then, "
            f"{described(data.get(what))} now)"
            for what in sorted(saved.keys() | data.keys())
            if saved.get(what) != data.get(what)
        )
        raise ValueError(
            f"The checkpoint {os.fspath(state_path)!r} was trained on other data: {differ}. "
            "Its best loss and early-stopping state belong to those data. Resume with the "
            "data the run started with, or train on these in a fresh run: another "
            "checkpoint_dir, with resume=False."
        )

    def _load(
        self,
        epochs_done: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Scheduler | None,
    ) -> dict[str, Any]:
        """Check the pair of ``epochs_done`` against this run and load it (local)."""
        model_path, state_path = _paths(self.directory, epochs_done)
        contents = _load_state(state_path)
        saved, settings = json.loads(contents["settings"]), self.settings
        if saved != settings:
            differ = ", ".join(
                f"{k}: {saved.get(k)!r} then, {settings.get(k)!r} now"
                for k in sorted(saved.keys() | settings.keys())
                if saved.get(k) != settings.get(k)
            )
            raise ValueError(
                f"The checkpoint {os.fspath(state_path)!r} was written with other data or "
                f"settings ({differ}); resume with the same ones, or start afresh in "
                "another folder."
            )
        self._check_data(state_path, contents.get("data"))
        saved_model = read_model_file(model_path)
        architecture = architecture_config(model)
        if _as_json(saved_model.architecture) != _as_json(architecture):
            raise ValueError(
                f"The checkpoint {os.fspath(model_path)!r} holds another model: "
                f"{saved_model.architecture} then, {architecture} now. Resume with the same "
                "architecture, or start afresh in another folder."
            )
        # The weights after the last epoch: the state's, or (the best ones, or a state
        # written before it held them) the model file's.
        weights = contents.get("weights")
        if weights is None:
            weights = saved_model.state_dict
        current = model.state_dict()
        statistics = [k for k in current if "_normalization." in k and k in weights]
        if any(not torch.equal(weights[k], current[k].cpu()) for k in statistics):
            raise ValueError(
                f"The checkpoint {os.fspath(model_path)!r} was trained on other data: the "
                "statistics of the training split differ. Resume with the same data, or "
                "start afresh in another folder."
            )
        # torch copies what fits before it reports what does not: keep the objects as they
        # were if any part fails to load. Tensors only: neuraloperator's models add their
        # init kwargs to the state_dict as "_metadata", a dict.
        model_before = clone_state(model)
        optimizer_before = copy.deepcopy(optimizer.state_dict())
        scheduler_before = None if scheduler is None else copy.deepcopy(scheduler.state_dict())
        try:
            model.load_state_dict(weights)
            optimizer.load_state_dict(contents["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(contents["scheduler"])
        except (ValueError, RuntimeError, KeyError) as err:
            model.load_state_dict(model_before)
            optimizer.load_state_dict(optimizer_before)
            if scheduler is not None and scheduler_before is not None:
                scheduler.load_state_dict(scheduler_before)
            raise ValueError(
                f"The checkpoint {os.fspath(state_path)!r} does not fit this model, optimiser "
                f"or schedule ({type(err).__name__}: {err}); nothing was changed. Resume "
                "with the same ones, or start afresh in another folder."
            ) from err
        return contents

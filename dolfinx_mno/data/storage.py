"""Closure training data in HDF5: an append-only writer and a reader.

File layout (one file per data set; ``S`` samples, ``P`` points per sample, ``C`` cells)::

    /                 attributes: format, format_version, num_complete, created, versions,
                      num_inputs, value_shape, num_points, points_per_cell, dtype,
                      time_step, units, and the sampler's metadata (operands, input_names,
                      restriction, coarse_mesh, fine_mesh, ...)
    /inputs           (S, P, num_inputs)       closure inputs
    /targets          (S, P, *value_shape)     closure targets
    /time             (S,)                     time of each sample (NaN if not given)
    /cell_index       (C,)                     global cell index of the points' cells, sorted
    /coordinates      (P, gdim)                physical coordinates of the points (optional)

Points are ordered by global cell index (the cells' order by midpoint,
:mod:`dolfinx_mno.cell_order`), then by point of the quadrature rule, whatever the number
of MPI ranks. Only rank 0 writes the file (serial h5py).

Gridded data (fields on a grid, for neural operators, e.g. from
:class:`~dolfinx_mno.data.GriddedSampler`; ``format`` ``dolfinx_mno.gridded_data``)::

    /                 attributes: format, format_version, num_complete, created, versions,
                      grid_shape, in_channels, out_channels, [grid_lower, grid_upper],
                      dtype, time_step, units, and further metadata
    /inputs           (S, in_channels, *grid_shape)    model inputs
    /targets          (S, out_channels, *grid_shape)   model targets
    /time             (S,)                             time of each sample (NaN if not given)

**Crash safety.** Each append resizes the datasets to ``num_complete + 1`` rows, writes
the row, flushes (and calls ``fsync``), and only then increments the ``num_complete``
attribute and flushes again. Readers trust only the first ``num_complete`` rows; the writer
overwrites anything beyond them. A process killed at any point keeps every sample whose
append had returned.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from mpi4py import MPI

import h5py
import numpy as np
import torch

from dolfinx_mno._mpi import agree_on, describe, on_root
from dolfinx_mno.data.sample import ClosureSample
from dolfinx_mno.grid import Grid

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "GRIDDED_FORMAT",
    "GRIDDED_FORMAT_VERSION",
    "ClosureDataReader",
    "ClosureDataWriter",
    "GriddedDataReader",
    "GriddedDataWriter",
]

#: Value of the ``format`` attribute of closure data files.
FORMAT = "dolfinx_mno.closure_data"
#: Version of the layout; readers refuse newer versions.
FORMAT_VERSION = 1
#: Value of the ``format`` attribute of gridded data files.
GRIDDED_FORMAT = "dolfinx_mno.gridded_data"
#: Version of the gridded layout; readers refuse newer versions.
GRIDDED_FORMAT_VERSION = 1

# Attributes that describe the run rather than the data; they may differ on reopening.
_RUN_ATTRIBUTES = ("format", "format_version", "num_complete", "created", "versions")
# Attributes holding JSON text (everything that is not a string or a number).
_JSON_LIST = "json_attributes"
# Target size of one HDF5 chunk (h5py recommends 10 KiB to 1 MiB).
_CHUNK_BYTES = 1 << 20


def _versions() -> dict[str, str]:
    import dolfinx

    try:
        mno = importlib.metadata.version("dolfinx_mno")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source tree
        mno = "0.0.0"
    return {
        "dolfinx_mno": mno,
        "dolfinx": dolfinx.__version__,
        "torch": torch.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
    }


def _normalise(metadata: dict[str, typing.Any]) -> dict[str, typing.Any]:
    """JSON round trip: the values a reader will see (tuples become lists, ...)."""
    try:
        return typing.cast(dict[str, typing.Any], json.loads(json.dumps(metadata)))
    except (TypeError, ValueError) as err:
        raise TypeError(f"Metadata must be JSON-serialisable: {err}") from err


def _write_attributes(attrs: h5py.AttributeManager, metadata: dict[str, typing.Any]) -> None:
    encoded = []
    for key, value in metadata.items():
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            attrs[key] = value
        else:
            attrs[key] = json.dumps(value)
            encoded.append(key)
    attrs[_JSON_LIST] = json.dumps(sorted(encoded))


def _read_attributes(attrs: h5py.AttributeManager) -> dict[str, typing.Any]:
    encoded = set(json.loads(attrs.get(_JSON_LIST, "[]")))
    metadata: dict[str, typing.Any] = {}
    for key, value in attrs.items():
        if key == _JSON_LIST:
            continue
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        metadata[key] = json.loads(value) if key in encoded else value
    return metadata


def _open_hdf5(path: Path, mode: str, writing: bool) -> h5py.File:
    """``h5py.File(path, mode)``, with a clear error if another process holds the file.

    HDF5 locks a file while it is open: exclusively for a writer, shared for a reader. A
    second process that opens it gets h5py's bare ``BlockingIOError`` ("unable to lock
    file"); this says which file, why, and what to do.

    Args:
        path: The file.
        mode: h5py's mode.
        writing: Whether the caller opens the file to write it (a writer checking a file
            before appending opens it read-only first).
    """
    try:
        return h5py.File(path, mode)
    except BlockingIOError as err:
        if writing:
            message = (
                f"Cannot open {path} for writing: another process has it open (HDF5 locks "
                "the file while a ClosureDataWriter, a ClosureDataReader or any h5py "
                "program holds it). Close it there or wait for that process to finish, or "
                "write to another file."
            )
        else:
            message = (
                f"Cannot read {path}: another process holds it open for writing (HDF5 "
                "locks the file while a ClosureDataWriter writes to it). Read it once the "
                "writer has closed it (ClosureDataWriter.close() or the end of its `with` "
                "block) or its process has ended."
            )
        raise BlockingIOError(message) from err
    except OSError as err:  # h5py's "truncated file", "file signature not found", ...
        if not path.exists():
            raise
        raise OSError(
            f"Cannot open {path} as HDF5 ({str(err).splitlines()[0]}): the file is damaged "
            "or truncated (an interrupted copy), or not HDF5. Write a new file (mode='w' "
            "or another path)."
        ) from err


def _chunk_points(num_points: int, row_bytes: int) -> int:
    return int(max(1, min(num_points, _CHUNK_BYTES // max(row_bytes, 1))))


# The reader class of each format, for the hint when a file is opened with the other one.
_READER_OF_FORMAT = {
    FORMAT: ("closure data", "ClosureDataReader"),
    GRIDDED_FORMAT: ("gridded data", "GriddedDataReader"),
}


def _check_format(metadata: dict[str, typing.Any], path: Path, kind: str, version: int) -> None:
    """Raise ``ValueError`` unless ``metadata`` are those of a ``kind`` file we can read."""
    fmt = {"closure data": FORMAT, "gridded data": GRIDDED_FORMAT}[kind]
    if metadata.get("format") != fmt:
        other = _READER_OF_FORMAT.get(str(metadata.get("format")))
        hint = f" (it holds {other[0]}: read it with {other[1]})" if other else ""
        raise ValueError(f"{path} is not a dolfinx_mno {kind} file{hint}.")
    if int(metadata.get("format_version", 0)) > version:
        raise ValueError(
            f"{path} has format version {metadata['format_version']}; this "
            f"dolfinx_mno reads versions ≤ {version}."
        )


class _FileOptions(typing.TypedDict, total=False):
    """The keyword arguments every writer takes (see :class:`ClosureDataWriter`)."""

    dtype: typing.Any
    time_step: float | None
    units: dict[str, str] | None
    metadata: dict[str, typing.Any] | None
    mode: str
    fsync: bool


class _Closing:
    """``with`` support for the files: ``__exit__`` calls ``close()``."""

    def close(self) -> None:
        """Close the file."""
        raise NotImplementedError

    def __enter__(self) -> typing.Self:
        return self

    def __exit__(self, *args: typing.Any) -> None:
        self.close()


class _SampleFileWriter(_Closing):
    """What the writers share: rank 0's file, the reopening check, the crash-safe append.

    Collective. Rank 0 holds the file; a reopened file's metadata must be the writer's;
    one row is appended to every dataset crash-safely. A subclass checks its arguments,
    then calls this constructor with its ``description`` (the attributes that define the
    data), and defines :meth:`_create_datasets`.
    """

    _kind: typing.ClassVar[str]
    _format: typing.ClassVar[str]
    _format_version: typing.ClassVar[int]

    def __init__(
        self,
        path: str | os.PathLike,
        comm: MPI.Comm,
        *,
        description: dict[str, typing.Any],
        dtype: typing.Any = np.float64,
        time_step: float | None = None,
        units: dict[str, str] | None = None,
        metadata: dict[str, typing.Any] | None = None,
        mode: str = "a",
        fsync: bool = True,
    ):
        self.path = Path(path)
        self.comm = comm
        self.dtype = np.dtype(dtype)
        self._fsync = bool(fsync)
        if mode not in ("a", "w", "x"):
            raise ValueError(f"mode must be 'a', 'w' or 'x', got {mode!r}.")
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}.")
        description = {
            **description,
            "dtype": self.dtype.name,
            "time_step": None if time_step is None else float(time_step),
            "units": dict(units or {}),
        }
        clash = sorted(set(metadata or {}) & (set(description) | set(_RUN_ATTRIBUTES)))
        if clash or _JSON_LIST in (metadata or {}):
            raise ValueError(f"metadata must not redefine the reserved attribute(s) {clash}.")
        self.metadata = _normalise({**description, **(metadata or {})})

        self._closed = False
        self._file: h5py.File | None = None
        self._fd: int | None = None
        # Rank 0 alone touches the file; every rank gets its count or raises its error.
        self._num_complete = on_root(comm, lambda: self._open(mode), f"Opening {self.path}")

    # -- file handling (rank 0) -------------------------------------------------------

    def _open(self, mode: str) -> int:
        """Open or create the file; returns its number of complete samples (rank 0)."""
        try:
            self._open_file(mode)
        except BaseException:
            self._close_file()
            raise
        assert self._file is not None
        return int(self._file.attrs["num_complete"])

    def _open_file(self, mode: str) -> None:
        if mode == "x" and self.path.exists():
            raise FileExistsError(f"{self.path} exists (mode='x').")
        if mode == "a" and self.path.exists():
            # Compare read-only first: a mismatch leaves the file untouched.
            with _open_hdf5(self.path, "r", writing=True) as existing:
                self._check_existing(existing)
            self._file = _open_hdf5(self.path, "r+", writing=True)
        else:
            if self.path.exists():
                # HDF5 truncates a file before it tries to lock it: "w" on a file that
                # another process writes would destroy that process's samples. Opening
                # it "r+" takes the same (exclusive) lock without truncating.
                try:
                    _open_hdf5(self.path, "r+", writing=True).close()
                except BlockingIOError:
                    raise
                except OSError:
                    pass  # not an HDF5 file: replaced below
            self._file = _open_hdf5(self.path, "w", writing=True)
            self._create(self._file)
        if self._fsync:
            self._fd = os.open(self.path, os.O_RDONLY)

    def _check_existing(self, existing: h5py.File) -> None:
        stored = _read_attributes(existing.attrs)
        _check_format(stored, self.path, self._kind, self._format_version)
        given = self.metadata
        stored = {k: v for k, v in stored.items() if k not in _RUN_ATTRIBUTES}
        missing = "<missing>"
        differences = [
            f"{key}: file has {stored.get(key, missing)!r}, given {given.get(key, missing)!r}"
            for key in sorted(set(stored) | set(given))
            if stored.get(key, missing) != given.get(key, missing)
        ]
        if differences:
            raise ValueError(
                f"Cannot append to {self.path}: its metadata differ from this writer's "
                "(use another file, or mode='w' to replace it):\n  " + "\n  ".join(differences)
            )

    def _create_datasets(self, file: h5py.File) -> None:
        raise NotImplementedError

    def _create(self, file: h5py.File) -> None:
        self._create_datasets(file)
        file.create_dataset("time", shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.float64)
        run = {
            "format": self._format,
            "format_version": self._format_version,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": _versions(),
        }
        _write_attributes(file.attrs, {**run, **self.metadata})
        file.attrs["num_complete"] = np.int64(0)
        self._flush()

    def _flush(self) -> None:
        assert self._file is not None
        self._file.flush()
        if self._fd is not None:
            os.fsync(self._fd)

    def _close_file(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()  # type: ignore[union-attr]
            self._file = None
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]
            self._fd = None

    def _append_row(
        self,
        rows: dict[str, np.ndarray],
        time: float | None,
        once: dict[str, np.ndarray | None] | None = None,
    ) -> None:
        """Write one row of each dataset in ``rows`` and the time, then commit (rank 0).

        Data, flush, then ``num_complete += 1``, flush. ``once``: datasets written with the
        first row only (those that are ``None`` are not written).
        """
        file = self._file
        assert file is not None
        n = int(file.attrs["num_complete"])
        # Rows beyond num_complete are debris of an interrupted append: overwrite them.
        for name in (*rows, "time"):
            file[name].resize(n + 1, axis=0)
        for name, row in rows.items():
            file[name][n] = row
        file["time"][n] = np.nan if time is None else float(time)
        for name, data in (once or {}).items():
            if data is not None and name not in file:
                file.create_dataset(name, data=data)
        self._flush()
        file.attrs["num_complete"] = np.int64(n + 1)
        self._flush()

    def _write_on_rank_zero(self, write: Callable[[], None]) -> int:
        """Run ``write`` on rank 0 and share its verdict (collective).

        Every failure names the file and is raised on every rank: a ``ValueError`` as a
        ``ValueError`` (a sample that does not fit the file), anything else as an
        ``OSError``.

        Returns:
            The number of complete samples.
        """

        def guarded() -> None:
            try:
                write()
            except Exception as err:
                kind = ValueError if isinstance(err, ValueError) else OSError
                raise kind(
                    f"Cannot append to {self.path}: {describe(err)}. The "
                    f"{self._num_complete} samples written before are intact."
                ) from err

        on_root(self.comm, guarded, f"Appending to {self.path}")
        self._num_complete += 1
        return self._num_complete

    # -- public API -------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """Number of complete samples in the file."""
        return self._num_complete

    def close(self) -> None:
        """Close the file (collective; appending afterwards raises)."""
        self._closed = True
        if self.comm.rank == 0:
            self._close_file()
        self.comm.Barrier()

    def __del__(self):
        """Close the file if still open (rank 0)."""
        self._close_file()


class ClosureDataWriter(_SampleFileWriter):
    """Append closure training samples to an HDF5 file, crash-safely (collective).

    Every rank calls the constructor and :meth:`append`; samples are gathered on rank 0 in
    rank-independent order (global cell index, then quadrature point) and written there
    with serial h5py. All arguments are checked on every rank before any communication,
    and errors are agreed on, so every rank raises the same error; a file is never left
    invalid by an error.

    Args:
        path: The file.
        comm: The communicator the samples are distributed over.
        num_inputs: Input columns per point.
        value_shape: Shape of the target at one point.
        num_points: Points per sample, over all ranks.
        points_per_cell: Points of the quadrature rule on one cell.
        dtype: dtype of inputs and targets (``float32`` or ``float64``).
        time_step: The time step of the samples, recorded as metadata.
        units: Units of the quantities, e.g. ``{"u": "m/s", "time": "s"}``.
        metadata: Further JSON-serialisable metadata, one attribute per key (e.g.
            :meth:`dolfinx_mno.data.ClosureSampler.metadata`).
        mode: ``"a"``: append to an existing file with the same metadata, or create it;
            ``"w"``: create, replacing any file; ``"x"``: create, fail if it exists.
        fsync: ``fsync`` the file after every flush, so that complete samples also survive
            an operating-system crash, not only a crash of the process.

    Raises:
        ValueError: Bad shapes or mode (``num_points`` of 0: a sampler whose ``cells=``
            select no cell); reopening a file whose metadata differ (nothing is changed
            then); a file that is not closure data.
        FileExistsError: ``mode="x"`` and the file exists.
        BlockingIOError: Another process holds the file open (a writer or a reader); on
            every rank, before the file is changed (``mode="w"`` included).
    """

    _kind = "closure data"
    _format = FORMAT
    _format_version = FORMAT_VERSION

    def __init__(
        self,
        path: str | os.PathLike,
        comm: MPI.Comm,
        *,
        num_inputs: int,
        value_shape: Sequence[int],
        num_points: int,
        points_per_cell: int,
        **options: typing.Unpack[_FileOptions],
    ):
        """Open or create the file (collective); see the class docstring for the arguments."""
        self.num_inputs = int(num_inputs)
        self.value_shape = tuple(int(n) for n in value_shape)
        self.num_points = int(num_points)
        self.points_per_cell = int(points_per_cell)
        if self.num_inputs < 1 or any(n < 1 for n in self.value_shape):
            raise ValueError(
                f"Need num_inputs ≥ 1 and a positive value_shape, got {self.num_inputs} and "
                f"{self.value_shape}."
            )
        if self.num_points < 1:  # rank-independent: num_points counts every rank's points
            raise ValueError(
                f"num_points must be positive, got {self.num_points} (a ClosureSampler whose "
                "cells= select no cell on any rank has no point to write)."
            )
        if self.points_per_cell < 1 or self.num_points % self.points_per_cell:
            raise ValueError(
                f"num_points ({self.num_points}) must be a positive multiple of "
                f"points_per_cell ({self.points_per_cell})."
            )
        description: dict[str, typing.Any] = {
            "num_inputs": self.num_inputs,
            "value_shape": list(self.value_shape),
            "num_points": self.num_points,
            "points_per_cell": self.points_per_cell,
        }
        super().__init__(path, comm, description=description, **options)

    @classmethod
    def from_sampler(
        cls,
        path: str | os.PathLike,
        sampler: typing.Any,
        *,
        fine_mesh: typing.Any = None,
        time_step: float | None = None,
        units: dict[str, str] | None = None,
        attributes: dict[str, typing.Any] | None = None,
        mode: str = "a",
        fsync: bool = True,
    ) -> ClosureDataWriter:
        """A writer for the samples of a :class:`~dolfinx_mno.data.ClosureSampler`.

        Args:
            path: The file.
            sampler: The sampler; its shapes and :meth:`~ClosureSampler.metadata` are
                recorded.
            fine_mesh: The fine mesh, whose size is recorded.
            time_step: The time step between samples.
            units: Units of the quantities.
            attributes: Further JSON-serialisable metadata.
            mode: See :class:`ClosureDataWriter`.
            fsync: See :class:`ClosureDataWriter`.
        """
        mesh = sampler.coarse_state.function_space.mesh
        metadata = sampler.metadata(fine_mesh)
        clash = sorted(set(attributes or {}) & set(metadata))
        if clash:
            raise ValueError(f"attributes must not redefine the sampler's metadata {clash}.")
        metadata.update(attributes or {})
        return cls(
            path,
            mesh.comm,
            num_inputs=sampler.num_inputs,
            value_shape=sampler.value_shape,
            num_points=sampler.num_points,
            points_per_cell=sampler.points_per_cell,
            dtype=sampler.dtype,
            time_step=time_step,
            units=units,
            metadata=metadata,
            mode=mode,
            fsync=fsync,
        )

    # -- file layout (rank 0) ---------------------------------------------------------

    def _create_datasets(self, file: h5py.File) -> None:
        row_bytes = self.dtype.itemsize * max(self.num_inputs, int(np.prod(self.value_shape)))
        chunk = _chunk_points(self.num_points, row_bytes)
        file.create_dataset(
            "inputs",
            shape=(0, self.num_points, self.num_inputs),
            maxshape=(None, self.num_points, self.num_inputs),
            chunks=(1, chunk, self.num_inputs),
            dtype=self.dtype,
        )
        file.create_dataset(
            "targets",
            shape=(0, self.num_points, *self.value_shape),
            maxshape=(None, self.num_points, *self.value_shape),
            chunks=(1, chunk, *self.value_shape),
            dtype=self.dtype,
        )

    # -- public API -------------------------------------------------------------------

    def append(self, sample: ClosureSample, time: float | None = None) -> int:
        """Append one sample (collective); returns the number of complete samples.

        The sample is checked on every rank, gathered on rank 0 in global order and written
        there: data, flush, then ``num_complete += 1``, flush.

        Args:
            sample: This rank's share of the sample (from
                :meth:`~dolfinx_mno.data.ClosureSampler.sample`, or built by hand).
            time: Time of the sample, as given on rank 0 (stored as NaN if ``None``).

        Raises:
            ValueError: On all ranks, if the shapes or dtype do not match the file's on any
                rank, the points do not add up to ``num_points``, the cells differ from those
                of the first sample, or the file is closed. The file is not changed.
            OSError: On all ranks, if writing failed on rank 0; the samples written before
                stay readable.
        """
        comm = self.comm
        error = None
        if not isinstance(sample, ClosureSample):
            error = f"expected a ClosureSample, got {type(sample).__name__}"
        elif MPI.Comm.Compare(sample.comm, comm) not in (MPI.IDENT, MPI.CONGRUENT):
            error = "the sample is distributed over another communicator than the writer's"
        else:
            error = sample.check(self.num_inputs, self.value_shape, self.dtype)
        if (
            error is None
            and np.asarray(sample.cell_index).size * self.points_per_cell
            != (sample.inputs.shape[0])
        ):
            error = (
                f"{sample.inputs.shape[0]} points on {np.asarray(sample.cell_index).size} "
                f"cells, but the file has {self.points_per_cell} points per cell"
            )
        rows = None
        if error is None:  # every rank-local step comes before the agreement
            try:
                rows = sample._pack()
            except Exception as err:
                error = f"cannot pack the sample's rows: {describe(err)}"
        if self._closed:
            error = "the writer is closed"
        # One collective agrees on the verdict before any data moves.
        report = (sample.inputs.shape[0], sample.coordinates is not None) if error is None else None
        reports = agree_on(
            comm,
            report,
            f"Appending to {self.path}",
            ValueError,
            reason=error,
            note="Nothing was written.",
        )
        counts, with_coordinates = zip(*reports, strict=True)
        problem = None
        if sum(counts) != self.num_points:
            problem = (
                f"the sample has {sum(counts)} points over all ranks, the file {self.num_points}"
            )
        elif len(set(with_coordinates)) > 1:
            problem = "some ranks give coordinates and others do not"
        if problem is not None:
            raise ValueError(f"Cannot append to {self.path}: {problem}. Nothing was written.")
        assert rows is not None
        gathered = sample._gather(rows, root=0)

        def write() -> None:
            assert gathered is not None  # on rank 0
            self._write_row(*gathered, time)

        return self._write_on_rank_zero(write)

    def _write_row(
        self,
        inputs: np.ndarray,
        targets: np.ndarray,
        cell_index: np.ndarray,
        coordinates: np.ndarray | None,
        time: float | None,
    ) -> None:
        file = self._file
        assert file is not None
        if "cell_index" in file:
            if not np.array_equal(file["cell_index"][...], cell_index):
                raise ValueError(
                    "the sample's cells (global cell indices) differ from those of the "
                    "samples in the file (was the coarse mesh changed?)"
                )
        self._append_row(
            {"inputs": inputs, "targets": targets},
            time,
            once={"cell_index": cell_index, "coordinates": coordinates},
        )


class GriddedDataWriter(_SampleFileWriter):
    """Append gridded training samples (fields) to an HDF5 file, crash-safely (collective).

    A sample is a pair of fields on one grid: the model's input ``(in_channels, *grid)``
    and its target ``(out_channels, *grid)``, as a
    :class:`~dolfinx_mno.data.GriddedSampler` gathers them on its root. They are given on
    rank 0, which writes them with serial h5py; the other ranks call :meth:`append` too
    and pass ``None``. The checks are agreed on, so every rank raises the same error, and
    the append is crash-safe as :class:`ClosureDataWriter`'s.

    Args:
        path: The file.
        comm: The communicator.
        grid: The grid: a :class:`~dolfinx_mno.grid.Grid` (its corners and shape are
            recorded, and :attr:`GriddedDataReader.grid` rebuilds it) or a grid shape.
        in_channels: Channels of an input field.
        out_channels: Channels of a target field.
        dtype: dtype of inputs and targets (``float32`` or ``float64``).
        time_step: The time step of the samples, recorded as metadata.
        units: Units of the quantities.
        metadata: Further JSON-serialisable metadata, one attribute per key (e.g. the
            operands and the sampler's ``extension_value`` and ``mask_channel``).
        mode: See :class:`ClosureDataWriter`.
        fsync: See :class:`ClosureDataWriter`.

    Raises:
        ValueError: Bad shapes or mode; reopening a file whose metadata differ (nothing is
            changed then); a file that is not gridded data.
        FileExistsError: ``mode="x"`` and the file exists.

    Example:
        >>> sampler = GriddedSampler([u, u.dx(0)], grid)
        >>> with GriddedDataWriter("fields.h5", comm, grid=grid, in_channels=2,
        ...                        out_channels=1) as writer:
        ...     writer.append(sampler(), target_on_root, time=t)
    """

    _kind = "gridded data"
    _format = GRIDDED_FORMAT
    _format_version = GRIDDED_FORMAT_VERSION

    def __init__(
        self,
        path: str | os.PathLike,
        comm: MPI.Comm,
        *,
        grid: Grid | Sequence[int],
        in_channels: int,
        out_channels: int,
        **options: typing.Unpack[_FileOptions],
    ):
        """Open or create the file (collective); see the class docstring for the arguments."""
        shape = grid.shape if isinstance(grid, Grid) else grid
        self.grid_shape = tuple(int(n) for n in shape)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        if not self.grid_shape or any(n < 1 for n in self.grid_shape):
            raise ValueError(f"Need a grid shape of positive sizes, got {self.grid_shape}.")
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(
                f"Need in_channels ≥ 1 and out_channels ≥ 1, got {self.in_channels} and "
                f"{self.out_channels}."
            )
        description: dict[str, typing.Any] = {
            "grid_shape": list(self.grid_shape),
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
        }
        if isinstance(grid, Grid):
            description.update(grid_lower=list(grid.lower), grid_upper=list(grid.upper))
        super().__init__(path, comm, description=description, **options)

    def _create_datasets(self, file: h5py.File) -> None:
        for name, channels in (("inputs", self.in_channels), ("targets", self.out_channels)):
            field = (channels, *self.grid_shape)
            file.create_dataset(
                name,
                shape=(0, *field),
                maxshape=(None, *field),
                chunks=(1, *field),
                dtype=self.dtype,
            )

    def _check(self, inputs: typing.Any, targets: typing.Any) -> str | None:
        """Describe why the arrays do not fit the file, or return ``None``."""
        for name, array, channels in (
            ("inputs", inputs, self.in_channels),
            ("targets", targets, self.out_channels),
        ):
            expected = (channels, *self.grid_shape)
            if not isinstance(array, np.ndarray):
                return f"{name} must be a NumPy array on rank 0, got {type(array).__name__}"
            if array.shape != expected:
                return f"{name} have shape {array.shape}, expected {expected}"
            if array.dtype != self.dtype:
                return f"{name} have dtype {array.dtype}, expected {self.dtype}"
        return None

    def append(
        self,
        inputs: np.ndarray | None,
        targets: np.ndarray | None,
        time: float | None = None,
    ) -> int:
        """Append one sample (collective); returns the number of complete samples.

        Args:
            inputs: On rank 0, the input fields ``(in_channels, *grid_shape)``; ignored on
                the other ranks (pass ``None``).
            targets: On rank 0, the target fields ``(out_channels, *grid_shape)``.
            time: Time of the sample, as given on rank 0 (stored as NaN if ``None``).

        Raises:
            ValueError: On all ranks, if the shapes or dtype do not match the file's on
                rank 0, or the writer is closed. The file is not changed.
            OSError: On all ranks, if writing failed on rank 0; the samples written before
                stay readable.
        """
        error = "the writer is closed" if self._closed else None  # the same on every rank
        if error is None:
            check = lambda: self._check(inputs, targets)  # noqa: E731
            error = on_root(self.comm, check, f"Checking a sample for {self.path}")
        if error is not None:
            raise ValueError(f"Cannot append to {self.path}: {error}. Nothing was written.")

        def write() -> None:
            assert inputs is not None and targets is not None  # on rank 0
            self._append_row({"inputs": inputs, "targets": targets}, time)

        return self._write_on_rank_zero(write)


class _SampleFileReader(_Closing):
    """What the readers share: the checked file, sample selection, times (serial)."""

    _kind: typing.ClassVar[str]
    _format_version: typing.ClassVar[int]

    def __init__(self, path: str | os.PathLike):
        """Open the file for reading; see the class docstring."""
        self.path = Path(path)
        self._file = _open_hdf5(self.path, "r", writing=False)
        try:
            #: All attributes, JSON values decoded.
            self.metadata = _read_attributes(self._file.attrs)
            _check_format(self.metadata, self.path, self._kind, self._format_version)
            complete = int(self.metadata["num_complete"])
            for name in ("inputs", "targets"):
                stored = self._file[name].shape[0]
                if stored < complete:  # a damaged or hand-edited file
                    raise ValueError(
                        f"{self.path} is damaged: it says {complete} samples are complete, "
                        f"but its '{name}' holds {stored}."
                    )
        except Exception:
            self._file.close()
            raise
        #: Number of complete samples.
        self.num_samples = complete

    def _indices(self, samples: slice | Sequence[int] | None) -> np.ndarray:
        everything = np.arange(self.num_samples)
        if samples is None:
            return everything
        if isinstance(samples, slice):
            return everything[samples]
        indices = np.asarray(samples, dtype=np.int64).reshape(-1)
        n = self.num_samples
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(
                f"Sample indices {indices.tolist()} out of range: the file has "
                f"{self.num_samples} complete samples."
            )
        return everything[indices]

    def _read(self, name: str, samples: slice | Sequence[int] | None) -> np.ndarray:
        indices = self._indices(samples)
        dataset = self._file[name]
        if indices.size and np.all(np.diff(indices) == 1):
            block = dataset[int(indices[0]) : int(indices[-1]) + 1]
        else:
            unique, inverse = np.unique(indices, return_inverse=True)
            block = dataset[unique][inverse] if unique.size else dataset[0:0]
        return typing.cast(np.ndarray, block)

    def inputs(self, samples: slice | Sequence[int] | None = None) -> np.ndarray:
        """The inputs of the selected samples (all by default)."""
        raise NotImplementedError

    def targets(self, samples: slice | Sequence[int] | None = None) -> np.ndarray:
        """The targets of the selected samples (all by default)."""
        raise NotImplementedError

    def times(self, samples: slice | Sequence[int] | None = None) -> np.ndarray:
        """Time of each selected sample, ``(num_selected,)`` (NaN where not given)."""
        return self._read("time", samples)

    def tensors(
        self,
        samples: slice | Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets as torch tensors, shaped as :meth:`inputs` and :meth:`targets`.

        Args:
            samples: Which complete samples; all by default.
            dtype: Target dtype; the file's by default.
            device: Target device; the CPU by default.
        """
        return (
            torch.from_numpy(self.inputs(samples)).to(dtype=dtype, device=device),
            torch.from_numpy(self.targets(samples)).to(dtype=dtype, device=device),
        )

    def close(self) -> None:
        """Close the file."""
        self._file.close()


class ClosureDataReader(_SampleFileReader):
    """Read closure training data written by :class:`ClosureDataWriter` (serial).

    Only the first ``num_complete`` samples are read; rows of an interrupted append are
    ignored. Arrays are returned flattened over samples and points, as a pointwise model
    consumes them. :func:`dolfinx_mno.training.fit` takes a reader directly (each rank
    reads its block of the samples).

    Args:
        path: The file.

    Raises:
        ValueError: The file is not closure data or has a newer format version.
        BlockingIOError: Another process holds the file open for writing (a running
            :class:`ClosureDataWriter`); the message says so and what to do.

    Example:
        >>> with ClosureDataReader("data.h5") as data:
        ...     inputs, targets = data.tensors(dtype=torch.float32)
    """

    _kind = "closure data"
    _format_version = FORMAT_VERSION

    def __init__(self, path: str | os.PathLike):
        """Open the file for reading; see the class docstring."""
        super().__init__(path)
        self.num_points = int(self.metadata["num_points"])
        self.num_inputs = int(self.metadata["num_inputs"])
        self.value_shape = tuple(int(n) for n in self.metadata["value_shape"])

    def inputs(self, samples: slice | Sequence[int] | None = None) -> np.ndarray:
        """Closure inputs, ``(num_selected * num_points, num_inputs)``.

        Args:
            samples: Which complete samples (a slice or indices); all by default.
        """
        return self._read("inputs", samples).reshape(-1, self.num_inputs)

    def targets(self, samples: slice | Sequence[int] | None = None) -> np.ndarray:
        """Closure targets, ``(num_selected * num_points, *value_shape)``."""
        return self._read("targets", samples).reshape(-1, *self.value_shape)

    @property
    def cell_index(self) -> np.ndarray | None:
        """Global cell index of each cell, ``(num_points // points_per_cell,)``."""
        return self._file["cell_index"][...] if "cell_index" in self._file else None

    @property
    def coordinates(self) -> np.ndarray | None:
        """Physical coordinates of the points, ``(num_points, gdim)``, if stored."""
        return self._file["coordinates"][...] if "coordinates" in self._file else None


class GriddedDataReader(_SampleFileReader):
    """Read gridded training data written by :class:`GriddedDataWriter` (serial).

    Only the first ``num_complete`` samples are read. A sample is a pair of fields, as a
    grid model (``fit(..., grid=True)``, :class:`~dolfinx_mno.NonlocalClosure`) consumes
    them; :func:`dolfinx_mno.training.fit` takes a reader directly.

    Args:
        path: The file.

    Attributes:
        grid_shape: Points of the grid per direction.
        in_channels: Channels of an input field.
        out_channels: Channels of a target field.
        grid: The :class:`~dolfinx_mno.grid.Grid` if the writer was given one, else
            ``None``.

    Raises:
        ValueError: The file is not gridded data or has a newer format version.

    Example:
        >>> with GriddedDataReader("fields.h5") as data:
        ...     result = fit(fno, data, comm=comm)  # grid=True
    """

    _kind = "gridded data"
    _format_version = GRIDDED_FORMAT_VERSION

    def __init__(self, path: str | os.PathLike):
        """Open the file for reading; see the class docstring."""
        super().__init__(path)
        self.grid_shape = tuple(int(n) for n in self.metadata["grid_shape"])
        self.in_channels = int(self.metadata["in_channels"])
        self.out_channels = int(self.metadata["out_channels"])
        self.grid: Grid | None = None
        if "grid_lower" in self.metadata:
            self.grid = Grid(
                tuple(self.metadata["grid_lower"]),
                tuple(self.metadata["grid_upper"]),
                self.grid_shape,
            )

    def inputs(self, samples: slice | Sequence[int] | None = None) -> np.ndarray:
        """Input fields, ``(num_selected, in_channels, *grid_shape)``.

        Args:
            samples: Which complete samples (a slice or indices); all by default.
        """
        return self._read("inputs", samples)

    def targets(self, samples: slice | Sequence[int] | None = None) -> np.ndarray:
        """Target fields, ``(num_selected, out_channels, *grid_shape)``."""
        return self._read("targets", samples)

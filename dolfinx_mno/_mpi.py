"""Agreement across ranks: a failure on some ranks raises the same exception on every rank.

A rank that raises while the others enter a collective call leaves them waiting forever.
DOLFINx therefore never lets a rank-local error reach a collective, and neither does
dolfinx_mno: rank-local work (reading a file, probing a model, evaluating it) runs first,
then the ranks agree on the outcome with **one** collective, and either all ranks go on or
all ranks raise. Every such decision in the package goes through this module, in one of
four ways:

1. **Agree on an error** (:func:`rank_local`, :func:`agree`, :func:`agree_on`): every rank
   works, then one ``allgather`` of a short description of each rank's failure (or
   ``None``), with a small value per rank if the caller needs the others' (sample counts,
   a digest, a cache flag). Used by ``closure.py`` (construction, ``Closure.update``),
   ``nonlocal_closure.py`` (construction), ``data/restriction.py`` (coarse points outside
   the fine mesh, :class:`~dolfinx_mno.data.CellAverage` input checks), ``data/storage.py``
   (:meth:`~dolfinx_mno.data.ClosureDataWriter.append`'s checks, point counts and
   coordinates), ``io.py`` (:func:`~dolfinx_mno.save_model`: model checks and identical
   weights), ``timestepping.py`` (the ``before_step`` hook) and ``training.py`` (the input
   checks of ``fit`` and ``fit_rollout``, resuming).
2. **Run on the root and share the verdict** (:func:`on_root`): only the root works
   (writes or reads a file, sorts gathered rows) and one ``bcast`` gives every rank its
   result or its exception, the same type and text on every rank, whatever the number of
   ranks. Used by ``io.py`` (:func:`~dolfinx_mno.save_model` writes on rank 0),
   ``data/storage.py`` (the :class:`~dolfinx_mno.data.ClosureDataWriter` file is opened
   and written on rank 0), ``data/sample.py`` (the root sorts a gathered sample and checks
   its cells) and ``training.py`` (checkpoints written, and the one to resume from chosen,
   on rank 0).
3. **Stages of a collective pipeline** (:func:`collective_stages`, :func:`stage_entry`):
   a backward pass through torch's autograd engine runs collective stages (the adjoint
   solves, the transposed scatters) between rank-local ones the package does not call
   itself (a model's vector-Jacobian product). A rank whose local stage raises leaves the
   engine at once, while the others go on to the next collective stage. So every
   collective stage begins with :func:`stage_entry` (an :func:`agree` that has nothing
   to report), and the whole pass runs inside :func:`collective_stages`, which on a rank
   that raised a not-yet-agreed exception makes the one :func:`agree` that the other
   ranks' next stage entry (or the block's end) is waiting in. Exceptions raised by an
   agreement are marked, so no rank agrees twice on the same failure. Used by
   ``rollout.py`` (:meth:`~dolfinx_mno.rollout.Rollout.gradient`) with the stages of
   ``step_adjoint.py`` and ``nonlocal_adjoint.py``.
4. **Passive wait**: the root runs a long computation (the model of a
   :class:`~dolfinx_mno.NonlocalClosure`) while the other ranks wait for its verdict on a
   nonblocking broadcast, asleep rather than spinning on a core, and learn the reason
   only on failure, in the message format of :func:`failure_message`. Used by
   ``NonlocalClosure.update`` (:func:`agree_with_root`, :func:`wait_passively`, at the
   end of this module).

Arguments that must be the same on every rank (a quadrature degree, a grid shape, a number
of steps) are compared once by :func:`same_everywhere`, which raises the same
``ValueError`` on every rank if they differ. Used by ``closure.py`` and
``nonlocal_closure.py`` (construction) and ``rollout.py`` (``run``, ``gradient``).

The first form, around a block or with a reason computed by hand::

    with rank_local(comm, "Building closure 'q'"):
        model = load_model(path)  # may fail on some ranks only
    # Every rank got here, or every rank raised: collective calls are safe again.

    reason = check(values)  # a description of what went wrong here, or None
    agree(comm, reason, "Update 3 of closure 'q'", ClosureEvaluationError,
          note="The previous closure values were kept.")

    counts = agree_on(comm, num_local_points, "Appending", ValueError, reason=reason)

What the first form raises (the same type and text on every rank):

* If every rank failed with the same error (the same type and text, as bad input that is
  the same everywhere, or any error in a single process), every rank re-raises its own
  exception unchanged, so serial runs see plain Python errors.
* Otherwise every rank raises ``error_type`` (by default the type of the first failing
  rank's exception, or :class:`RuntimeError`), with the message of :func:`failure_message`:
  ``"{what} failed on rank(s) [1, 2] (2 of 4 ranks); on rank 1: {reason}. {note}"``. On a
  failing rank it is chained to (``raise ... from``) the original exception, whose
  traceback thus stays visible.

This module is self-contained: it depends on nothing else in the package.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import time
import typing
from collections.abc import Callable, Iterator, Sequence

from mpi4py import MPI

import numpy as np

__all__ = [
    "agree",
    "agree_on",
    "agree_with_root",
    "collective_stages",
    "describe",
    "failure_message",
    "on_root",
    "rank_local",
    "same_everywhere",
    "stage_entry",
    "wait_passively",
]

#: The ``what`` of a rollout's backward pass and of its collective stages' entries.
BACKWARD_PASS = "The backward pass of the rollout"

#: Attribute set on exceptions that every rank raised from one agreement.
_AGREED = "_dolfinx_mno_agreed"

#: Failing ranks listed in a message before the list is cut short.
_MAX_LISTED_RANKS = 8

#: What one rank tells the others about its failure: ``(reason, module, qualname)`` of the
#: exception behind it (``None`` for both without one), or ``None`` if it did not fail.
_Failure = tuple[str, str | None, str | None] | None


def describe(error: BaseException, *, first_line: bool = False) -> str:
    """``"TypeName: message"`` (or just the type name for an empty message).

    With ``first_line``, only the message's first non-blank line (torch.compile's errors
    run over many lines).
    """
    text = str(error)
    if first_line:
        text = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def failure_message(what: str, reasons: Sequence[str | None], note: str = "") -> str:
    """The message raised when some ranks failed, the same on every rank.

    Args:
        what: What failed, e.g. ``"Update 3 of closure 'q'"``.
        reasons: One entry per rank: why it failed, or ``None``.
        note: Appended after the reason, e.g. what state was kept.

    Returns:
        ``"{what} failed on rank(s) [r, ...] (k of n ranks); on rank r: {reason}."`` and
        the note; the first failing rank's reason is quoted.
    """
    failed = [rank for rank, reason in enumerate(reasons) if reason is not None]
    if not failed:
        raise ValueError("failure_message needs at least one failing rank.")
    listed = ", ".join(str(rank) for rank in failed[:_MAX_LISTED_RANKS])
    if len(failed) > _MAX_LISTED_RANKS:
        listed += ", ..."
    size = len(reasons)
    first = failed[0]
    reason = str(reasons[first]).rstrip(". ")
    message = (
        f"{what} failed on rank(s) [{listed}] ({len(failed)} of {size} "
        f"{'rank' if size == 1 else 'ranks'}); on rank {first}: {reason}."
    )
    return f"{message} {note}" if note else message


def _exception_type(module: str, qualname: str) -> type[Exception] | None:
    """The exception class ``module.qualname`` if that module is imported, else ``None``.

    Nothing is imported: every rank runs the same program, so the class that one rank
    raised is loaded on all of them (a class local to a function is not found anywhere).
    """
    found: object = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if isinstance(found, type) and issubclass(found, Exception):
        return found
    return None


def _failure(text: str, cause: BaseException | None) -> _Failure:
    """What a failing rank tells the others: ``text`` and the type of ``cause``."""
    kind = type(cause) if cause is not None else None
    return (
        text,
        None if kind is None else kind.__module__,
        None if kind is None else kind.__qualname__,
    )


def agree_on[T](
    comm: MPI.Comm,
    value: T | None,
    what: str,
    error_type: type[Exception] | None = None,
    *,
    reason: str | None = None,
    cause: BaseException | None = None,
    note: str = "",
) -> list[T]:
    """Every rank's ``value`` if no rank failed, else the same exception on every rank.

    Collective: one ``allgather`` of ``(failure, value)`` per rank (an exception itself is
    never pickled). A rank failed if it gives a ``reason`` or a ``cause``. What is raised is
    described in the module docstring.

    Args:
        comm: The communicator whose ranks must agree.
        value: This rank's contribution, e.g. its number of points (pickled: keep it small);
            not sent from a rank that failed, so it may be ``None`` there.
        what: What was attempted, the subject of the message (:func:`failure_message`).
        error_type: The type raised on every rank; by default the type of the first failing
            rank's ``cause`` (rebuilt from its message on the other ranks), or
            :class:`RuntimeError` where that rank gave no ``cause`` or the type cannot be
            rebuilt from a message.
        reason: Why this rank failed; by default ``describe(cause)``.
        cause: The exception behind the failure on this rank; the raised exception is
            chained to it, and it is re-raised unchanged if every rank failed in the same
            way.
        note: Appended to the message, e.g. ``"The previous values were kept."``.

    Returns:
        ``[value of rank 0, value of rank 1, ...]``, the same list on every rank.

    Raises:
        Exception: On every rank, if any rank gave a ``reason`` or a ``cause``.

    Example:
        >>> counts = agree_on(comm, len(rows), "Appending the sample", reason=problem)
        >>> total = sum(counts)  # the same on every rank
    """
    failure: _Failure = None
    if reason is not None:
        failure = _failure(str(reason), cause)
    elif cause is not None:
        failure = _failure(describe(cause), cause)
    entry = (failure, None if failure is not None else value)
    # One rank agrees with itself: no allgather (and no pickling) on the hot path.
    entries = [entry] if comm.size == 1 else comm.allgather(entry)
    failures = [entry for entry, _ in entries]
    first = next((entry for entry in failures if entry is not None), None)
    if first is None:  # every rank sent its value
        return [typing.cast(T, shared) for _, shared in entries]
    _, module, qualname = first
    same_everywhere = all(entry == first for entry in failures)
    if (
        same_everywhere
        and cause is not None
        and (error_type is None or isinstance(cause, error_type))
    ):
        raise _agreed(cause)
    message = failure_message(what, [None if e is None else e[0] for e in failures], note)
    kind: type[Exception] | None = error_type
    if kind is None and module is not None and qualname is not None:
        kind = _exception_type(module, qualname)
    error: Exception
    try:
        error = (kind or RuntimeError)(message)
    except Exception:  # a type that cannot be built from a message alone
        error = RuntimeError(message)
    if cause is not None:
        raise _agreed(error) from cause
    raise _agreed(error)


def _agreed[E: BaseException](error: E) -> E:
    """Mark ``error`` as raised on every rank by one agreement (see :func:`is_agreed`)."""
    try:
        setattr(error, _AGREED, True)
    except AttributeError:  # pragma: no cover - exceptions without a __dict__
        pass
    return error


def is_agreed(error: BaseException) -> bool:
    """Whether every rank raised ``error`` from the same agreement (:func:`agree_on`)."""
    return bool(getattr(error, _AGREED, False))


def agree(
    comm: MPI.Comm,
    reason: str | None,
    what: str,
    error_type: type[Exception] | None = None,
    *,
    cause: BaseException | None = None,
    note: str = "",
) -> None:
    """Raise the same exception on every rank if any rank failed (collective).

    :func:`agree_on` without values. On several ranks one ``Allreduce`` of a flag says
    whether any rank failed (no pickling: this runs at every closure update); only then
    does one ``allgather`` of a short tuple of strings per rank bring the reasons.

    Args:
        comm: The communicator whose ranks must agree.
        reason: Why this rank failed, or ``None`` if it did not (and gives no ``cause``).
        what: What was attempted, the subject of the message (:func:`failure_message`).
        error_type: As for :func:`agree_on`.
        cause: The exception behind ``reason`` on this rank (see :func:`agree_on`).
        note: Appended to the message, e.g. ``"The previous values were kept."``.

    Raises:
        Exception: On every rank, if any rank gave a ``reason`` or a ``cause``.
    """
    if reason is None and cause is None and comm.size == 1:  # every update of a serial run
        return
    if comm.size > 1:
        failed = np.array([reason is not None or cause is not None], dtype=np.int32)
        comm.Allreduce(MPI.IN_PLACE, failed, op=MPI.MAX)
        if not failed[0]:
            return
    agree_on(comm, None, what, error_type, reason=reason, cause=cause, note=note)


def same_everywhere(comm: MPI.Comm, what: str, note: str = "", /, **settings: typing.Any) -> None:
    """Raise the same :class:`ValueError` on every rank if ``settings`` differ (collective).

    For arguments that must be the same on every rank (a quadrature degree, a number of
    steps): given different ones, the ranks would go on to make collective calls that do
    not match, and hang or compute something silently wrong. One ``allgather`` of the
    (small, picklable) settings; nothing on one rank.

    Args:
        comm: The communicator whose ranks must agree.
        what: What is being done, the subject of the message.
        note: Appended to the message (what to do about it).
        settings: The settings, by name.

    Raises:
        ValueError: On every rank, naming each setting that differs and its value on
            every rank.
    """
    if comm.size == 1:
        return
    everyone = comm.allgather(settings)
    differ = [name for name in settings if any(s[name] != settings[name] for s in everyone)]
    if differ:
        shown = "; ".join(
            f"{name}: {[s[name] for s in everyone]} on ranks 0..{comm.size - 1}" for name in differ
        )
        raise ValueError(
            f"{what}: every rank must pass the same arguments, but they differ ({shown})."
            + (f" {note}" if note else "")
        )


def on_root[T](comm: MPI.Comm, action: Callable[[], T], what: str, *, root: int = 0) -> T:
    """Run ``action`` on ``root`` only; every rank returns its result or raises its error.

    Collective: one ``bcast`` from ``root``. Only the root works, so a failure can only be
    the root's, and it does not depend on the number of ranks: every rank raises the
    root's exception, the same type and text. The root re-raises its own exception object
    (with its traceback); the other ranks build its type (found by name among the imported
    modules, as for :func:`agree_on`) from its text. Where that does not reproduce the
    type and text (a type unknown elsewhere, or not built from a message alone, such as
    :class:`KeyError`), every rank raises :class:`RuntimeError` with the message of
    :func:`failure_message`, chained on the root; a single process re-raises its own.

    Args:
        comm: The communicator whose ranks must agree.
        action: The root's work. Its result is pickled on the root (a result that cannot
            be pickled is a failure there too) and broadcast: keep it small, and leave a
            large one (gathered arrays) in a variable of the caller on the root.
        what: What the action does, e.g. ``"Writing 'model.pt'"``, the subject of the
            :class:`RuntimeError` above.
        root: The rank that runs ``action``.

    Returns:
        ``action()``, on every rank (the root's own object on the root).

    Raises:
        Exception: The root's, on every rank.

    Example:
        >>> num_complete = on_root(comm, lambda: count_samples(path), f"Reading {path}")
    """
    result: T | None = None
    payload = b""
    failure: _Failure = None
    cause: Exception | None = None
    if comm.rank == root:
        try:
            result = action()
            if comm.size > 1:
                payload = pickle.dumps(result)
        except Exception as error:
            cause = error
            failure = _failure(str(error), error)
    failure, payload = comm.bcast((failure, payload), root=root)
    if failure is None:
        return typing.cast(T, result if comm.rank == root else pickle.loads(payload))
    if cause is not None and comm.size == 1:
        raise cause
    text, module, qualname = failure
    assert module is not None and qualname is not None
    kind = _exception_type(module, qualname)
    rebuilt: Exception | None = None
    with contextlib.suppress(Exception):  # a type not built from a message alone
        rebuilt = kind(text) if kind is not None else None
    if rebuilt is None or str(rebuilt) != text:
        reasons: list[str | None] = [None] * comm.size
        reasons[root] = f"{qualname.rsplit('.', 1)[-1]}: {text}" if text else qualname
        rebuilt = RuntimeError(failure_message(what, reasons))
    elif cause is not None:
        raise cause
    if cause is not None:
        raise rebuilt from cause
    raise rebuilt


@contextlib.contextmanager
def rank_local(
    comm: MPI.Comm,
    what: str,
    error_type: type[Exception] | None = None,
    *,
    note: str = "",
) -> Iterator[None]:
    """Run a block of rank-local work, then agree on its outcome (collective on exit).

    The block must not call collectives: a rank that raised skips the rest of its block.
    Any :class:`Exception` is caught; :class:`BaseException` (``KeyboardInterrupt``)
    passes through.

    Args:
        comm: The communicator whose ranks must agree.
        what: What the block does, the subject of the message.
        error_type: As for :func:`agree`; by default the type of the first failing rank's
            exception.
        note: Appended to the message.

    Raises:
        Exception: On every rank, if the block raised on any rank (see :func:`agree`).

    Example:
        >>> with rank_local(mesh.comm, "Reading the model"):
        ...     model = load_model(path)
    """
    try:
        yield
    except Exception as error:
        agree(comm, describe(error), what, error_type, cause=error, note=note)
        raise  # not reached: agree raises on a rank that failed
    agree(comm, None, what, error_type, note=note)


def stage_entry(comm: MPI.Comm, what: str) -> None:
    """Begin a collective stage of a :func:`collective_stages` block (collective).

    An :func:`agree` with nothing to report: it completes when every rank has reached the
    stage, or matches the agreement of a rank that failed before it, and then raises that
    rank's failure on every rank. Give the ``what`` of the enclosing block, so that every
    rank raises the same message.
    """
    agree(comm, None, what)


@contextlib.contextmanager
def collective_stages(
    comm: MPI.Comm, what: str, error_type: type[Exception] | None = None
) -> Iterator[None]:
    """Run a pipeline whose collective stages begin with :func:`stage_entry` (collective).

    A rank whose rank-local part raises (an exception not raised by an agreement) makes
    one :func:`agree` with its reason, which the other ranks meet at their next
    :func:`stage_entry` or at the end of the block; an exception that an agreement raised
    is already the same on every rank and passes through. Every rank then raises the same
    exception, and none is left waiting in a collective call.

    Args:
        comm: The communicator whose ranks must agree.
        what: What the pipeline does, the subject of the message; the stages' entries must
            use the same text.
        error_type: As for :func:`agree`.

    Raises:
        Exception: On every rank, if the pipeline raised on any rank.

    Example:
        >>> with collective_stages(comm, "The backward pass of the rollout"):
        ...     gradients = torch.autograd.grad(loss, parameters)
    """
    try:
        yield
    except Exception as error:
        if not is_agreed(error):
            agree(comm, describe(error), what, error_type, cause=error)
        raise
    agree(comm, None, what, error_type)


# -- work on the root alone -------------------------------------------------------------
# Where only the root computes (a non-local closure's model), the other ranks need its
# verdict, not an agreement: one nonblocking broadcast of a flag, waited on asleep, and a
# second broadcast of the reason only if the root failed.


def wait_passively(request: MPI.Request, shortest: float = 50e-6, longest: float = 1e-3) -> None:
    """Complete ``request``, sleeping between tests instead of spinning in MPI.

    ``Request.Wait`` polls: a rank waiting for another rank's long computation (a model on
    the root) would occupy a core that the computation could use. Here the pause between
    tests grows with the time waited (2 % of it, from ``shortest`` to ``longest``
    seconds), so the extra latency stays small for short waits: a rank waiting 0.5 s uses
    about 0.01 s of CPU time, at most about ``longest`` of extra latency.

    Args:
        request: A nonblocking MPI request.
        shortest: First pause, in seconds.
        longest: Longest pause, in seconds.
    """
    start = time.perf_counter()
    while not request.Test():
        waited = time.perf_counter() - start
        time.sleep(min(longest, max(shortest, 0.02 * waited)))


def agree_with_root(
    comm: MPI.Comm,
    reason: str | None,
    what: str,
    error_type: type[Exception] = RuntimeError,
    *,
    root: int = 0,
    cause: BaseException | None = None,
    note: str = "",
) -> None:
    """Raise the same exception on every rank if the root failed (collective).

    The counterpart of :func:`agree` for work done on the root alone: only the root's
    ``reason`` counts (the other ranks pass ``None``). The other ranks wait for the root
    asleep (:func:`wait_passively` on a nonblocking broadcast of one flag), so that their
    cores are free for the root's work, and receive the reason only if the root failed: a
    success costs one broadcast of one integer.

    Args:
        comm: The communicator whose ranks must agree.
        reason: On the root, why its work failed, or ``None``; ignored elsewhere.
        what: What was attempted, the subject of the message (:func:`failure_message`).
        error_type: The type raised on every rank.
        root: The rank that did the work.
        cause: On the root, the exception behind ``reason``; the root's exception is
            chained to it.
        note: Appended to the message, e.g. ``"The previous values were kept."``.

    Raises:
        Exception: ``error_type`` on every rank, if the root gave a ``reason``, with the
            message ``"{what} failed on rank(s) [root] (1 of n ranks); on rank root:
            {reason}. {note}"`` (also in a single process).
    """
    failed = np.array([comm.rank == root and reason is not None], dtype=np.int32)
    wait_passively(comm.Ibcast(failed, root=root))
    if not failed[0]:
        return
    reason = comm.bcast(reason, root=root)
    reasons: list[str | None] = [None] * comm.size
    reasons[root] = reason
    error = error_type(failure_message(what, reasons, note))
    if comm.rank == root and cause is not None:
        raise error from cause
    raise error

"""The rank-agreement helper: a failure on some ranks raises the same error on every rank."""

import time

from mpi4py import MPI

import pytest

from dolfinx_mno._mpi import (
    agree,
    agree_on,
    agree_with_root,
    describe,
    failure_message,
    on_root,
    rank_local,
    wait_passively,
)

COMM = MPI.COMM_WORLD
RANKS = "rank" if COMM.size == 1 else "ranks"


class ProbeError(ValueError):
    """A module-level exception type: every rank can rebuild it from its name."""


def _fail_on(ranks, message="broken"):
    if COMM.rank in ranks:
        raise ProbeError(f"{message} on {COMM.rank}")


@pytest.mark.mpi
def test_no_failure_passes_on_every_rank():
    with rank_local(COMM, "Nothing"):
        value = COMM.rank
    assert value == COMM.rank
    agree(COMM, None, "Nothing")


@pytest.mark.mpi
def test_failure_on_the_last_rank_raises_its_type_on_every_rank():
    last = COMM.size - 1
    start = time.perf_counter()
    with pytest.raises(ProbeError) as info, rank_local(COMM, "Reading the file", note="Retry."):
        _fail_on([last])
    assert time.perf_counter() - start < 5.0
    if COMM.size == 1:  # a single process re-raises its own exception unchanged
        assert str(info.value) == "broken on 0"
        return
    assert str(info.value) == (
        f"Reading the file failed on rank(s) [{last}] (1 of {COMM.size} ranks); on rank "
        f"{last}: ProbeError: broken on {last}. Retry."
    )
    if COMM.rank == last:
        assert isinstance(info.value.__cause__, ProbeError)
        assert str(info.value.__cause__) == f"broken on {last}"
    else:
        assert info.value.__cause__ is None


@pytest.mark.mpi
def test_the_same_error_everywhere_is_reraised_unchanged():
    with pytest.raises(ProbeError) as info, rank_local(COMM, "Reading the file"):
        error = ProbeError("the same everywhere")
        raise error
    assert info.value is error
    assert str(info.value) == "the same everywhere"


@pytest.mark.mpi
def test_different_errors_quote_the_first_failing_rank():
    with pytest.raises(ProbeError) as info, rank_local(COMM, "Probing"):
        _fail_on(range(COMM.size), "broken differently")
    listed = ", ".join(map(str, range(COMM.size)))
    if COMM.size > 1:
        assert str(info.value) == (
            f"Probing failed on rank(s) [{listed}] ({COMM.size} of {COMM.size} ranks); on "
            "rank 0: ProbeError: broken differently on 0."
        )


class Stubborn(Exception):
    """Cannot be built from a message alone."""

    def __init__(self, code, text):
        super().__init__(f"{code}: {text}")


@pytest.mark.mpi
def test_given_type_and_fallbacks():
    first = min(1, COMM.size - 1)
    # A given type wins, also over the same error everywhere.
    with pytest.raises(KeyError) as info, rank_local(COMM, "Step", error_type=KeyError):
        raise ProbeError("same")
    assert info.value.args == (
        f"Step failed on rank(s) [{', '.join(map(str, range(COMM.size)))}] "
        f"({COMM.size} of {COMM.size} {RANKS}); on rank 0: ProbeError: same.",
    )
    # A type that cannot be rebuilt from a message becomes a RuntimeError everywhere.
    with pytest.raises((RuntimeError, Stubborn)) as info, rank_local(COMM, "Step"):
        if COMM.rank == first:
            raise Stubborn(7, "no")
    if COMM.size > 1:
        assert type(info.value) is RuntimeError
        assert str(info.value).endswith(f"on rank {first}: Stubborn: 7: no.")
    else:
        assert type(info.value) is Stubborn
    # A reason without an exception: RuntimeError, or the given type.
    reason = "3 points are NaN" if COMM.rank == first else None
    with pytest.raises(RuntimeError, match=f"on rank {first}: 3 points are NaN.$"):
        agree(COMM, reason, "Update 1")
    with pytest.raises(ProbeError, match=f"^Update 1 failed on rank.s. .{first}. "):
        agree(COMM, reason, "Update 1", ProbeError)


@pytest.mark.mpi
def test_ranks_stay_in_step_after_an_agreed_failure():
    for _ in range(3):
        with pytest.raises(ProbeError), rank_local(COMM, "Loop"):
            _fail_on([0])
    assert COMM.allreduce(1) == COMM.size


@pytest.mark.mpi
def test_base_exceptions_pass_through():
    """KeyboardInterrupt is not caught (here raised on every rank, so no rank waits)."""
    with pytest.raises(KeyboardInterrupt), rank_local(COMM, "Interrupted"):
        raise KeyboardInterrupt


@pytest.mark.mpi
def test_agree_on_returns_every_ranks_value_in_rank_order():
    values = agree_on(COMM, (COMM.rank, 10 * COMM.rank), "Counting")
    assert values == [(rank, 10 * rank) for rank in range(COMM.size)]
    assert agree_on(COMM, None, "Nothing") == [None] * COMM.size


@pytest.mark.mpi
def test_agree_on_raises_on_every_rank_and_sends_no_value():
    last = COMM.size - 1
    reason = "5 points but 4 expected" if COMM.rank == last else None
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        agree_on(COMM, COMM.rank, "Appending", ValueError, reason=reason, note="Nothing written.")
    assert time.perf_counter() - start < 5.0
    assert str(info.value) == (
        f"Appending failed on rank(s) [{last}] (1 of {COMM.size} {RANKS}); on rank {last}: "
        "5 points but 4 expected. Nothing written."
    )
    assert info.value.__cause__ is None
    # A cause alone is a failure; its description is the reason.
    cause = ProbeError(f"broken on {COMM.rank}") if COMM.rank == last else None
    with pytest.raises(ProbeError) as info:
        agree_on(COMM, 1.5, "Probing", cause=cause)
    if COMM.size == 1:
        assert info.value is cause
    else:
        assert str(info.value) == (
            f"Probing failed on rank(s) [{last}] (1 of {COMM.size} ranks); on rank {last}: "
            f"ProbeError: broken on {last}."
        )
        assert info.value.__cause__ is cause  # None on the ranks that did not fail
    assert agree_on(COMM, COMM.rank, "Counting again") == list(range(COMM.size))


@pytest.mark.mpi
@pytest.mark.parametrize("root", ["first", "last"])
def test_on_root_runs_once_and_shares_the_result(root):
    root = 0 if root == "first" else COMM.size - 1
    calls = []

    def action():
        calls.append(COMM.rank)
        return {"rank": COMM.rank, "rows": [1, 2, 3]}

    result = on_root(COMM, action, "Reading", root=root)
    assert result == {"rank": root, "rows": [1, 2, 3]}
    assert calls == ([root] if COMM.rank == root else [])
    assert COMM.allreduce(len(calls)) == 1
    assert on_root(COMM, lambda: None, "Nothing", root=root) is None


@pytest.mark.mpi
@pytest.mark.parametrize("root", ["first", "last"])
def test_on_root_raises_the_roots_error_on_every_rank(root):
    root = 0 if root == "first" else COMM.size - 1
    error = ProbeError("the disk is full")

    def action():
        raise error

    start = time.perf_counter()
    with pytest.raises(ProbeError) as info:
        on_root(COMM, action, "Writing", root=root)
    assert time.perf_counter() - start < 5.0
    assert str(info.value) == "the disk is full"  # the same text whatever the rank count
    if COMM.rank == root:
        assert info.value is error
    else:
        assert info.value.__cause__ is None
    # An OSError subclass keeps its type and text.
    with pytest.raises(FileNotFoundError) as info:
        on_root(COMM, lambda: open("/nonexistent/dolfinx_mno/file"), "Reading", root=root)
    assert str(info.value) == (
        "[Errno 2] No such file or directory: '/nonexistent/dolfinx_mno/file'"
    )
    assert COMM.allreduce(1) == COMM.size


@pytest.mark.mpi
def test_on_root_falls_back_to_runtime_error_where_the_type_cannot_be_rebuilt():
    last = COMM.size - 1

    def stubborn():
        raise Stubborn(7, "no")

    def missing_key():
        return {}["step"]

    for action, reason in [(stubborn, "Stubborn: 7: no"), (missing_key, "KeyError: 'step'")]:
        with pytest.raises((RuntimeError, Stubborn, KeyError)) as info:
            on_root(COMM, action, "Writing 'model.pt'", root=last)
        if COMM.size == 1:  # a single process re-raises its own exception
            assert type(info.value) is not RuntimeError
            continue
        assert type(info.value) is RuntimeError
        assert str(info.value) == (
            f"Writing 'model.pt' failed on rank(s) [{last}] (1 of {COMM.size} ranks); on rank "
            f"{last}: {reason}."
        )
        assert (info.value.__cause__ is not None) == (COMM.rank == last)


@pytest.mark.mpi
def test_on_root_refuses_a_result_it_cannot_send():
    """A result that cannot be pickled fails on the root, before the broadcast: no hang."""
    values = on_root(COMM, lambda: [1.0, 2.0], "Reading")
    assert values == [1.0, 2.0]
    if COMM.size == 1:  # nothing is sent: the object itself is returned
        assert on_root(COMM, lambda: lambda: 1, "Building")() == 1
        return
    with pytest.raises(Exception, match="pickle") as info:
        on_root(COMM, lambda: lambda: 1, "Building")
    texts = COMM.allgather((type(info.value).__name__, str(info.value)))
    assert texts == [texts[0]] * COMM.size
    assert COMM.allreduce(1) == COMM.size


def test_failure_message():
    assert failure_message("Update 2", [None, "bad.", None, "worse"], "Kept.") == (
        "Update 2 failed on rank(s) [1, 3] (2 of 4 ranks); on rank 1: bad. Kept."
    )
    assert failure_message("Load", ["gone"]) == (
        "Load failed on rank(s) [0] (1 of 1 rank); on rank 0: gone."
    )
    many = failure_message("Sync", ["x"] * 20)
    assert many.startswith("Sync failed on rank(s) [0, 1, 2, 3, 4, 5, 6, 7, ...] (20 of 20")
    with pytest.raises(ValueError, match="at least one failing rank"):
        failure_message("Nothing", [None, None])
    assert describe(ValueError("bad")) == "ValueError: bad"
    assert describe(KeyError()) == "KeyError"


# -- work on the root alone: its verdict reaches every rank -------------------------------


@pytest.mark.mpi
def test_agree_with_root_passes_when_the_root_succeeds():
    # Only the root's reason counts: another rank's reason is ignored.
    agree_with_root(COMM, None if COMM.rank == 0 else "ignored", "Model", ProbeError)
    assert COMM.allreduce(1) == COMM.size  # the ranks are still in step


@pytest.mark.mpi
def test_agree_with_root_raises_the_roots_reason_on_every_rank():
    root = COMM.size - 1
    cause = KeyError("k") if COMM.rank == root else None
    reason = "the model returned NaN/Inf at 3 of 9 grid points" if COMM.rank == root else None
    with pytest.raises(ProbeError) as info:
        agree_with_root(COMM, reason, "Update 4", ProbeError, root=root, cause=cause, note="Kept.")
    assert str(info.value) == (
        f"Update 4 failed on rank(s) [{root}] (1 of {COMM.size} {RANKS}); on rank {root}: "
        "the model returned NaN/Inf at 3 of 9 grid points. Kept."
    )
    assert info.value.__cause__ is cause  # chained on the root only
    with pytest.raises(RuntimeError, match=r"^Step failed on rank\(s\) \[0\]"):
        agree_with_root(COMM, "no" if COMM.rank == 0 else None, "Step")


@pytest.mark.mpi
def test_ranks_waiting_for_the_root_sleep(time_asleep):
    """A rank waiting 0.3 s for the root sleeps through it: a few ms of CPU time, not 0.3 s."""
    if COMM.size == 1:
        pytest.skip("needs more than one rank")
    COMM.Barrier()
    cpu, wall = time.process_time(), time.perf_counter()
    if COMM.rank == 0:
        time.sleep(0.3)
    agree_with_root(COMM, None, "Sleep")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if COMM.rank != 0:
        assert wall > 0.25
        assert time_asleep[0] > 0.8 * wall, (time_asleep[0], wall)
        # Measured on 2 and 3 ranks: about 0.005 s on a quiet machine (MPI's own Wait polls
        # for the 0.3 s); a loose bound, as CI's load multiplies the cost of each wake-up.
        assert cpu < 0.1, cpu


def test_wait_passively_completes_a_request():
    request = MPI.COMM_SELF.Ibarrier()
    wait_passively(request)
    assert request == MPI.REQUEST_NULL


@pytest.mark.mpi
@pytest.mark.parametrize("failing", ["last", "none", "all"])
def test_agree_flags_then_gathers_the_reasons(failing):
    """``agree`` (the closure update's check): one flag reduction, reasons only on failure."""
    last = COMM.size - 1
    failing_ranks = {"last": [last], "none": [], "all": list(range(COMM.size))}[failing]
    reasons = [f"NaN at {r + 1} points" if r in failing_ranks else None for r in range(COMM.size)]
    if not failing_ranks:
        agree(COMM, reasons[COMM.rank], "Update 1")
    else:
        with pytest.raises(FloatingPointError) as info:
            agree(COMM, reasons[COMM.rank], "Update 1", FloatingPointError, note="Kept.")
        assert str(info.value) == failure_message("Update 1", reasons, "Kept.")
        assert f"on rank {failing_ranks[0]}: NaN at {failing_ranks[0] + 1} points" in str(
            info.value
        )
    assert COMM.allreduce(1) == COMM.size  # in step afterwards

"""A-posteriori training through the solver: learning, rank invariance, resume, stopping.

The problem: the heat equation with a reaction ``r(u) = -k u + s`` and a time-dependent
source, stepped IMEX on P1 (``(u - u_n)/dt - Δu = r(u_n) + sin(3t)``). The "fine"
trajectories come from the exact reaction in UFL; the coarse model is the same scheme with
a closure ``MLP(1, 1, [])`` (a ``torch.nn.Linear(1, 1)``: weight ``-k``, bias ``s``), so
the answer is known.
"""

import itertools
import re
import shutil
import tempfile
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from problems import DIRECT

import dolfinx_mno as mno
from dolfinx_mno import io
from dolfinx_mno.models import MLP
from dolfinx_mno.rollout import Rollout
from dolfinx_mno.timestepping import IMEXStepper, SSPRK3Stepper
from dolfinx_mno.training import fit_rollout, owned_states, shard
from dolfinx_mno.training.aposteriori import RolloutObjective
from dolfinx_mno.training.trajectories import TrajectoryWindows, split_windows

DT = 0.05
K, S = 2.0, 1.0  # the true reaction r(u) = -K u + S
A, B = -1.5 * K, 0.5 * K  # with memory: r = A u_n + B u_(n-1) + S (Adams–Bashforth 2 of it)
_prefixes = itertools.count()

INITIAL = [
    lambda x: np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]) + 0.5 * x[0],
    lambda x: np.cos(np.pi * x[0]) * x[1],
    lambda x: 1.0 - x[0] * x[1],
]


def heat(msh, model=None, initial=INITIAL[0], k=K, s=S, before=None, stepper=IMEXStepper):
    """The IMEX step and its closure; ``model=None``: the exact reaction in UFL.

    ``before``: the stepper keeps ``u_{n-1}`` (``older=[u_nm1]``, interpolating ``before``
    at the start), the reaction has memory, ``A u_n + B u_{n-1} + S``, and the closure
    reads ``(u_n, u_{n-1})``.
    """
    V = fem.functionspace(msh, ("Lagrange", 1))
    u_n, uh = fem.Function(V, name="u_n"), fem.Function(V, name="u")
    u_n.interpolate(initial)
    older = [] if before is None else [fem.Function(V, name="u_nm1")]
    for u_nm1 in older:
        u_nm1.interpolate(before)
    time = fem.Constant(msh, 0.0)
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = (u * v + DT * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx
    L = u_n * v * ufl.dx + DT * ufl.sin(3 * time) * v * ufl.dx
    closure = None
    if model is None:
        reaction = -k * u_n + s if before is None else A * u_n + B * older[0] + S
        L += DT * reaction * v * ufl.dx
    else:
        closure = mno.Closure(model, [u_n, *older], (), 2, device="cpu", name="reaction")
        L += DT * closure * v * closure.dx
    problem = mno.petsc.LinearProblem(
        a, L, u=uh, petsc_options=DIRECT, petsc_options_prefix=f"apost{next(_prefixes)}_"
    )
    return stepper(problem, uh, u_n, dt=DT, time=time, older=older), closure


def fine_trajectory(msh, initial, num_steps, k=K, s=S, stepper=IMEXStepper):
    """The exact scheme's states at t = 0, DT, ..., as owned arrays."""
    stepper, _ = heat(msh, None, initial, k, s, stepper=stepper)
    states = owned_states([stepper.u_previous])
    for _ in range(num_steps):
        stepper.step()
        states += owned_states([stepper.u])
    return states


def wrong_model(weight=0.0, bias=0.0):
    """``Linear(1, 1)`` (as a registered MLP, so that checkpoints can save it)."""
    model = MLP(1, 1, [], seed=0)
    with torch.no_grad():
        model.layers[0].weight.fill_(weight)
        model.layers[0].bias.fill_(bias)
    return model


def parameters(model):
    return np.array([model.layers[0].weight.item(), model.layers[0].bias.item()])


def coarse(msh, **model_kwargs):
    stepper, closure = heat(msh, wrong_model(**model_kwargs))
    return Rollout(stepper), closure


def a_priori_samples(comm, num_samples=30):
    """Global samples of the true reaction (shifted, so they pull away from it), sharded."""
    x = np.linspace(-1.0, 2.0, num_samples).reshape(-1, 1)
    y = -K * x[:, 0] + S + 0.5
    return shard(x, comm), shard(y, comm)


@pytest.fixture
def shared_dir():
    """A folder every rank sees: rank 0's, removed after the test."""
    comm = MPI.COMM_WORLD
    path = comm.bcast(tempfile.mkdtemp(prefix="mno-rollout-fit-") if comm.rank == 0 else None)
    yield Path(path)
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path)


def test_windows_and_their_split():
    """Starts 0, stride, ... up to num_states - 1 - horizon; a seeded, disjoint split."""
    trajectory = np.arange(18.0).reshape(6, 3)  # 6 states of 3 dofs
    data = TrajectoryWindows(
        [trajectory, list(trajectory[:4])], horizon=2, stride=2, num_owned=3, what="trajectory"
    )
    assert data.lengths == [6, 4]
    assert [(w.trajectory, w.start) for w in data.windows] == [(0, 0), (0, 2), (1, 0)]
    window = data.windows[1]
    assert np.array_equal(window.initial.numpy(), trajectory[2])
    assert np.array_equal(window.targets.numpy(), trajectory[3:5])
    many = TrajectoryWindows([trajectory] * 4, horizon=1, stride=1, num_owned=3, what="x")
    train, val = split_windows(many.windows, 0.25, seed=3)
    assert len(train) == 15 and len(val) == 5
    assert {id(w) for w in train} | {id(w) for w in val} == {id(w) for w in many.windows}
    assert [w.start for w in split_windows(many.windows, 0.25, seed=3)[1]] == [w.start for w in val]
    assert split_windows(many.windows, 0.0, seed=3) == (many.windows, many.windows)


def test_learns_a_linear_reaction_through_the_solver():
    """From r = 0 to r = -2u + 1 (to 1e-3), the rollout loss falling by orders of magnitude."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    trajectories = [fine_trajectory(msh, f, 4) for f in INITIAL[:2]]
    rollout, closure = coarse(msh)
    result = fit_rollout(
        rollout,
        trajectories,
        horizon=3,
        validation_fraction=0.0,
        batch_size=2,
        epochs=100,  # the loss falls below 1e-8 of its start at epoch 70
        learning_rate=0.1,
        lr_patience=10,
        patience=100,
        progress=False,
    )
    history = result.history
    assert result.model is closure.model and not closure.model.training
    assert history.epochs == 100 and history.resumed_from is None
    weight, bias = parameters(closure.model)
    assert abs(weight + K) <= 1e-3 * K and abs(bias - S) <= 1e-3 * S
    assert history.val_loss[0] > 1e-3
    assert history.best_val_loss <= 1e-8 * history.val_loss[0]
    # The trained closure reproduces the fine trajectory over the horizon and beyond.
    with torch.no_grad():
        states = rollout.run(torch.from_numpy(trajectories[0][0]), 4)
    error = max(
        np.abs(s.numpy() - t).max() for s, t in zip(states, trajectories[0][1:], strict=True)
    )
    assert error <= 1e-4 * np.abs(trajectories[0][-1]).max()


def test_learns_from_states_kept_every_few_steps():
    """Trajectories with a state every 2 coarse steps (``target_interval=2``): windows run
    2 × horizon steps from t0 + 2 s dt, and the reaction is still learnt to 1e-3."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    trajectories = [fine_trajectory(msh, f, 8)[::2] for f in INITIAL[:2]]  # t = 0, 2 DT, ...
    rollout, closure = coarse(msh)
    result = fit_rollout(
        rollout,
        trajectories,
        horizon=2,
        target_interval=2,
        validation_fraction=0.0,
        batch_size=2,
        epochs=80,  # the loss falls below 1e-8 of its start at epoch 63
        learning_rate=0.1,
        lr_patience=10,
        patience=80,
        progress=False,
    )
    weight, bias = parameters(closure.model)
    assert abs(weight + K) <= 1e-3 * K and abs(bias - S) <= 1e-3 * S
    assert result.history.best_val_loss <= 1e-8 * result.history.val_loss[0]
    # The objective runs the windows of the last start at its own time (the source
    # sin(3t) depends on it): the loss of the trained model there is round-off.
    objective = RolloutObjective(rollout, closure, horizon=2, scale=1.0, target_interval=2)
    late = TrajectoryWindows(
        [trajectories[0]], horizon=2, stride=1, num_owned=rollout.num_owned, what="x"
    ).windows[-1]
    assert late.start == 2
    assert objective.window_loss(late) <= 1e-12 * float((late.targets**2).sum())


@pytest.mark.mpi
def test_trajectories_from_another_time_run_at_their_own_time():
    """A trajectory that starts at t = 0.3 (the source sin(3t) depends on t): with its start
    time the exact model reproduces it; at the stepper's time (0) it does not. Validation
    start times need validation trajectories, one per trajectory."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    stepper, _ = heat(msh)
    stepper.t = 0.3
    later = owned_states([stepper.u_previous])
    for _ in range(3):
        stepper.step()
        later += owned_states([stepper.u])
    rollout, closure = coarse(msh, weight=-K, bias=S)  # the exact reaction
    objective = RolloutObjective(rollout, closure, horizon=3, scale=1.0)
    norm = sum(float((t**2).sum()) for t in later[1:])
    kwargs = dict(horizon=3, stride=1, num_owned=rollout.num_owned, what="trajectory")
    (timed,) = TrajectoryWindows([later], start_times=[0.3], **kwargs).windows
    (untimed,) = TrajectoryWindows([later], **kwargs).windows
    assert timed.origin == 0.3 and untimed.origin is None
    assert objective.window_loss(timed) <= 1e-24 * norm
    assert objective.window_loss(untimed) >= 1e-4 * norm
    assert rollout.stepper.t == 0.0  # restored
    with pytest.raises(ValueError, match="one finite start time per trajectory"):
        TrajectoryWindows([later], start_times=[0.3, 0.6], **kwargs)
    trajectory = fine_trajectory(msh, INITIAL[0], 3)
    with pytest.raises(ValueError, match="validation_start_times are the start times"):
        fit_rollout(rollout, [trajectory], horizon=2, validation_start_times=[0.3])
    # fit_rollout passes them on: held-out windows of the later trajectory, at their time.
    result = fit_rollout(
        rollout, [trajectory], horizon=2, validation=[later], validation_start_times=[0.3],
        epochs=1, learning_rate=1e-12, progress=False,
    )  # fmt: skip
    assert result.history.val_loss[0] <= 1e-20


def _train_on(comm, cells, epochs):
    msh = mesh.create_unit_square(comm, *cells)
    trajectories = [fine_trajectory(msh, f, 4) for f in INITIAL[:2]]
    rollout, closure = coarse(msh, weight=-0.5, bias=0.3)
    result = fit_rollout(
        rollout,
        trajectories,
        horizon=2,
        validation_fraction=1 / 3,
        batch_size=2,
        epochs=epochs,
        learning_rate=0.05,
        a_priori=a_priori_samples(comm),
        a_priori_weight=0.1,
        progress=False,
    )
    return parameters(closure.model), result.history


@pytest.mark.mpi
@pytest.mark.parametrize("cells", [(1, 1), (4, 3)])
def test_weights_do_not_depend_on_ranks(cells):
    """COMM_WORLD against COMM_SELF; (1, 1) on 3 ranks: a rank owns no cells."""
    serial, serial_history = _train_on(MPI.COMM_SELF, cells, 3)
    parallel, history = _train_on(MPI.COMM_WORLD, cells, 3)
    assert np.linalg.norm(serial - np.array([-0.5, 0.3])) > 0.05  # it trained
    assert np.linalg.norm(parallel - serial) <= 1e-10 * np.linalg.norm(serial)
    assert np.allclose(history.train_loss, serial_history.train_loss, rtol=1e-10, atol=0)
    assert np.allclose(history.val_loss, serial_history.val_loss, rtol=1e-10, atol=0)
    gathered = MPI.COMM_WORLD.allgather(parallel)
    assert all(np.array_equal(g, gathered[0]) for g in gathered)


def _train_ssprk3(comm, cells, epochs):
    msh = mesh.create_unit_square(comm, *cells)
    trajectories = [fine_trajectory(msh, f, 4, stepper=SSPRK3Stepper) for f in INITIAL[:2]]
    stepper, closure = heat(msh, wrong_model(), stepper=SSPRK3Stepper)
    result = fit_rollout(
        Rollout(stepper), trajectories, horizon=3, validation_fraction=0.0, batch_size=2,
        epochs=epochs, learning_rate=0.1, lr_patience=10, patience=100, progress=False,
    )  # fmt: skip
    return parameters(closure.model), result.history


@pytest.mark.mpi
def test_learns_a_linear_reaction_through_ssprk3_steps():
    """Through the three stages of SSP-RK3 steps: from r = 0 towards r = -2u + 1 (the
    reaction of the trajectories, stepped by the same scheme), with the same weights and
    losses on COMM_SELF and COMM_WORLD (a 1×1 mesh: on 3 ranks a rank owns no cells).

    The 40 epochs to the reaction run in the serial suite only: under MPI, the three epochs
    that equal the serial ones to 1e-10 show the same training (half the time it took).
    """
    if MPI.COMM_WORLD.size == 1:
        weights, history = _train_ssprk3(MPI.COMM_WORLD, (3, 3), 40)
        assert np.abs(weights - np.array([-K, S])).max() <= 0.02, weights
        assert history.best_val_loss <= 1e-3 * history.val_loss[0]
    serial, serial_history = _train_ssprk3(MPI.COMM_SELF, (1, 1), 3)
    parallel, parallel_history = _train_ssprk3(MPI.COMM_WORLD, (1, 1), 3)
    assert np.linalg.norm(serial) > 0.05  # it trained
    assert np.linalg.norm(parallel - serial) <= 1e-10 * np.linalg.norm(serial)
    assert np.allclose(parallel_history.train_loss, serial_history.train_loss, rtol=1e-10)


@pytest.mark.mpi
def test_objective_is_the_rollout_loss_plus_the_weighted_a_priori_loss():
    """One SGD step on one batch: the loss and the step, against a hand computation."""
    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, 3, 3)
    trajectories = [fine_trajectory(msh, f, 4) for f in INITIAL[:2]]
    rollout, closure = coarse(msh, weight=-0.5, bias=0.3)
    inputs, targets = a_priori_samples(comm)
    weight, lr, horizon = 0.7, 0.2, 2
    model = closure.model
    theta = [p.detach().clone() for p in model.parameters()]

    # By hand: the windows, their relative rollout loss and its gradient (stepper time set
    # to each window's start), and the relative a-priori loss and its gradient.
    windows = [(i, s) for i in range(2) for s in range(len(trajectories[i]) - horizon)]
    scale = comm.allreduce(
        sum(float(np.sum(np.square(trajectories[i][s + 1 : s + 1 + horizon]))) for i, s in windows)
    ) / len(windows)
    rollout_part, rollout_gradient = 0.0, [torch.zeros_like(p) for p in theta]
    for i, s in windows:
        rollout.stepper.t = s * DT
        result = rollout.gradient(
            torch.from_numpy(trajectories[i][s]), trajectories[i][s + 1 : s + 1 + horizon]
        )
        rollout_part += result.loss / (scale * len(windows))
        for total, g in zip(rollout_gradient, result.parameters[0], strict=True):
            total += g / (scale * len(windows))
    rollout.stepper.t = 0.0
    x, y = torch.from_numpy(inputs), torch.from_numpy(targets)
    local = ((model(x)[:, 0] - y) ** 2).sum()
    prior_scale = comm.allreduce(float((y**2).sum()))
    prior_gradient = [
        comm.allreduce(g.numpy()) for g in torch.autograd.grad(local, list(model.parameters()))
    ]
    prior_part = comm.allreduce(float(local.detach())) / prior_scale
    assert rollout_part > 1e-3 and prior_part > 1e-2
    expected = [
        t - lr * (g + weight * torch.from_numpy(p) / prior_scale)
        for t, g, p in zip(theta, rollout_gradient, prior_gradient, strict=True)
    ]

    result = fit_rollout(
        rollout,
        trajectories,
        horizon=horizon,
        validation_fraction=0.0,
        batch_size=len(windows),
        epochs=1,
        optimizer=lambda params: torch.optim.SGD(params, lr=lr),
        scheduler=lambda optimizer: None,
        a_priori=(inputs, targets),
        a_priori_weight=weight,
        progress=False,
    )
    history = result.history
    assert history.train_loss[0] == pytest.approx(rollout_part + weight * prior_part, rel=1e-12)
    for p, e in zip(model.parameters(), expected, strict=True):
        assert float((p.detach() - e).abs().max()) <= 1e-12 * float(e.abs().max())
    # The validation loss is the rollout part at the new weights (here: the same windows).
    objective = RolloutObjective(rollout, closure, horizon=horizon, scale=scale)
    data = TrajectoryWindows(
        trajectories, horizon=horizon, stride=1, num_owned=rollout.num_owned, what="trajectory"
    )
    assert history.val_loss[0] == pytest.approx(objective.rollout_loss(data.windows), rel=1e-12)


class Interrupt(Exception):
    pass


def stop_after(last_epoch):
    def callback(epoch, history):
        if epoch == last_epoch:
            raise Interrupt

    return callback


@pytest.mark.mpi
def test_interrupted_run_resumes_to_the_same_weights(shared_dir):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    trajectories = [fine_trajectory(msh, f, 4) for f in INITIAL[:2]]
    rollout, closure = coarse(msh)
    model = closure.model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    settings = dict(
        horizon=2,
        validation_fraction=0.25,
        batch_size=2,
        epochs=4,
        learning_rate=0.1,
        scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5),
        checkpoint_every=2,
        a_priori=a_priori_samples(MPI.COMM_WORLD),
        progress=False,
        metadata={"purpose": "test"},
    )
    straight = fit_rollout(rollout, trajectories, checkpoint_dir=shared_dir / "a", **settings)
    expected = parameters(model)
    model.load_state_dict(start)
    with pytest.raises(Interrupt):  # killed after epoch 2 (0-based): last checkpoint at 2
        fit_rollout(
            rollout,
            trajectories,
            checkpoint_dir=shared_dir / "b",
            callback=stop_after(2),
            **settings,
        )
    names = sorted(p.name for p in (shared_dir / "b").iterdir())
    assert names == ["checkpoint-000002.model.pt", "checkpoint-000002.state.pt"]
    with torch.no_grad():  # other weights: the checkpoint's win
        model.layers[0].weight.fill_(5.0)
    last = []
    resumed = fit_rollout(
        rollout,
        trajectories,
        checkpoint_dir=shared_dir / "b",
        resume=True,
        callback=lambda epoch, history: last.append(parameters(model)),
        **settings,
    )
    assert resumed.history.resumed_from == 2 and len(last) == 2
    assert np.array_equal(parameters(model), expected)
    assert resumed.history.val_loss == straight.history.val_loss
    assert (
        resumed.history.learning_rate
        == straight.history.learning_rate
        == [
            0.1,
            0.05,
            0.025,
            0.0125,
        ]
    )  # the schedule's state travelled too
    # The files: plain data, and a model file with the closure's spec.
    state = torch.load(shared_dir / "b" / "checkpoint-000004.state.pt", weights_only=True)
    assert state["epochs_done"] == 4
    contents = io.read_model_file(shared_dir / "b" / "checkpoint-000004.model.pt")
    assert contents.metadata["purpose"] == "test" and contents.spec == closure.spec
    assert contents.metadata["training"]["settings"]["horizon"] == 2
    # The weights fit_rollout returns (here the last epoch's, the best).
    assert np.array_equal(parameters(contents.build()), parameters(model))
    # Other settings are refused, naming them.
    with pytest.raises(ValueError, match=r"other data or settings \(horizon: 2 then, 3 now"):
        fit_rollout(
            rollout,
            trajectories,
            checkpoint_dir=shared_dir / "b",
            resume=True,
            **{**settings, "horizon": 3},
        )


def _fit_against_another_reaction(
    weight, bias, patience, checkpoint_dir=None, validation_s=0.5, resume=False
):
    """``fit_rollout`` on the reaction s = 1, validated on s = ``validation_s``, from
    ``weight``, ``bias``; returns the history, the closure and its parameters after each
    epoch."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    trajectories = [fine_trajectory(msh, f, 2) for f in INITIAL[:2]]
    validation = [fine_trajectory(msh, INITIAL[2], 2, s=validation_s)]
    rollout, closure = coarse(msh, weight=weight, bias=bias)
    seen = []
    result = fit_rollout(
        rollout,
        trajectories,
        horizon=2,
        validation=validation,
        batch_size=2,
        epochs=100,
        learning_rate=0.2,
        patience=patience,
        callback=lambda epoch, history: seen.append(parameters(closure.model)),
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=100,
        resume=resume,
        progress=False,
    )
    return result.history, closure, seen


@pytest.mark.mpi
def test_early_stopping_restores_the_best_weights(shared_dir):
    """Validation data of another reaction (s = 0.5): its loss rises once the fit passes it
    on its way from s = -2 to s = 1. The final checkpoint's model file holds the best
    weights too (it used to hold the last epoch's)."""
    history, closure, seen = _fit_against_another_reaction(0.0, -2.0, 2, shared_dir)
    assert history.stopped_early
    assert 0 < history.best_epoch and history.epochs == history.best_epoch + 3 < 100
    assert history.val_loss[history.best_epoch] == min(history.val_loss)
    assert np.array_equal(parameters(closure.model), seen[history.best_epoch])
    assert not np.array_equal(seen[-1], seen[history.best_epoch])
    final = io.load_model(shared_dir / f"checkpoint-{history.epochs:06d}.model.pt")
    assert np.array_equal(parameters(final), seen[history.best_epoch])
    state = torch.load(shared_dir / f"checkpoint-{history.epochs:06d}.state.pt", weights_only=True)
    last = [state["weights"][f"layers.0.{k}"].item() for k in ("weight", "bias")]
    assert np.array_equal(last, seen[-1])  # the state's: a resume continues from them
    assert history.best_val_loss < history.initial_val_loss
    # Validation trajectories of another reaction (s = 0.6, same lengths) used to resume
    # silently, with the best loss and the early stopping of s = 0.5.
    serial = mesh.create_unit_square(MPI.COMM_SELF, 3, 3)

    def fingerprint(s):
        trajectory = fine_trajectory(serial, INITIAL[2], 2, s=s)
        windows = TrajectoryWindows([trajectory], horizon=2, stride=1,
                                    num_owned=trajectory[0].size, what="trajectory")  # fmt: skip
        return windows.fingerprint(MPI.COMM_SELF)

    then, now = fingerprint(0.5), fingerprint(0.6)  # the same sums on one rank
    assert state["data"]["validation trajectories"] == then
    with pytest.raises(ValueError) as info:
        _fit_against_another_reaction(0.0, -2.0, 2, shared_dir, validation_s=0.6, resume=True)
    assert str(info.value) == (
        f"The checkpoint '{shared_dir}/checkpoint-{history.epochs:06d}.state.pt' was trained "
        f"on other data: the validation trajectories differ (1 with checksum "
        f"{then['checksum']} then, 1 with checksum {now['checksum']} now). Its best loss and "
        "early-stopping state belong to those data. Resume with the data the run started "
        "with, or train on these in a fresh run: another checkpoint_dir, with resume=False."
    )


@pytest.mark.mpi
def test_training_that_only_worsens_returns_the_starting_weights():
    """Started at the validation reaction's exact weights (s = 0.5), every epoch moves them
    towards the training reaction's (s = 1): the closure keeps the weights it was given."""
    history, closure, _ = _fit_against_another_reaction(-K, 0.5, patience=3)
    assert history.stopped_early and history.epochs == 3 and history.best_epoch == -1
    assert history.initial_val_loss == history.best_val_loss < 1e-20  # the same scheme
    assert min(history.val_loss) > 1e-6
    assert np.array_equal(parameters(closure.model), [-K, 0.5]) and not closure.model.training


def _raises_everywhere(error, message, call):
    """``call`` raises ``error`` with ``message`` (a regex) on every rank, the same text."""
    with pytest.raises(error, match=message) as info:
        call()
    texts = MPI.COMM_WORLD.allgather(str(info.value))
    assert all(text == texts[0] for text in texts)


@pytest.mark.mpi
def test_bad_input_raises_the_same_clear_error_on_every_rank(tiny_square):
    comm = MPI.COMM_WORLD
    trajectories = [fine_trajectory(tiny_square, f, 3) for f in INITIAL[:2]]
    rollout, closure = coarse(tiny_square)
    model = closure.model
    before = parameters(model)

    def fit(data=trajectories, **kwargs):
        return fit_rollout(rollout, data, **{"horizon": 2, "progress": False, **kwargs})

    exact = re.escape
    _raises_everywhere(
        ValueError,
        exact(
            "Trajectory 1 has 3 states, too few for a horizon of 3 steps (a window needs "
            "horizon + 1 = 4: the initial state and the targets); give a shorter horizon or "
            "longer trajectories."
        ),
        lambda: fit([trajectories[0], trajectories[1][:3]], horizon=3),
    )
    _raises_everywhere(
        TypeError,
        exact("The trajectory data must be a non-empty list of trajectories"),
        lambda: fit([]),
    )
    _raises_everywhere(
        ValueError,
        exact(
            "Trajectory 0 must be a list of states or an array (num_states, num_owned), got "
            "an array with 1 axes; pass [trajectory] for a single trajectory."
        ),
        lambda: fit(trajectories[0]),
    )
    # A state of the wrong shape on every rank (each rank's own shape in its message).
    bad = [[np.zeros(rollout.num_owned + 1), *trajectories[0][1:]]]
    _raises_everywhere(ValueError, "State 0 of trajectory 0 has shape", lambda: fit(bad))
    # ... and on one rank only.
    if comm.size > 1:
        one_bad = bad if comm.rank == 1 else trajectories
        _raises_everywhere(
            ValueError,
            r"^fit_rollout: checking the input failed on rank\(s\) \[1\] \(1 of ",
            lambda: fit(one_bad),
        )
        longer = [*trajectories, trajectories[0]] if comm.rank == 0 else trajectories
        _raises_everywhere(
            ValueError, r"^fit_rollout: the ranks passed different data", lambda: fit(longer)
        )
    # One trajectory of horizon + 1 states: one window, none left to validate on.
    _raises_everywhere(
        ValueError,
        exact(
            "fit_rollout: 1 windows with validation_fraction=0.2 leave 1 for training and 0 "
            "for validation; each needs one"
        ),
        lambda: fit([trajectories[0][:3]]),
    )
    u_n = rollout.stepper.u_previous
    other = mno.Closure(wrong_model(), [u_n], device="cpu", name="outsider")
    _raises_everywhere(
        ValueError,
        exact(
            "Closure 'outsider' is not in the rollout's step; train one of its closures "
            "['reaction']."
        ),
        lambda: fit(closure=other),
    )
    # Two closures in the step: which one to train must be said.
    stepper = rollout.stepper
    second = mno.Closure(wrong_model(), [u_n], (), 2, device="cpu", name="second")
    a, L = stepper.problem.ufl_forms
    v = ufl.TestFunction(u_n.function_space)
    two = mno.petsc.LinearProblem(
        a,
        L + DT * second * v * second.dx,
        u=stepper.u,
        petsc_options=DIRECT,
        petsc_options_prefix=f"apost{next(_prefixes)}_",
    )
    both = Rollout(IMEXStepper(two, stepper.u, u_n, dt=DT, time=stepper.time))
    _raises_everywhere(
        ValueError,
        exact(
            "The rollout has the closures ['reaction', 'second']: choose the one to train "
            "with closure=."
        ),
        lambda: fit_rollout(both, trajectories, horizon=2, progress=False),
    )
    for p in model.parameters():
        p.requires_grad_(False)
    _raises_everywhere(
        ValueError,
        exact(
            "The model of closure 'reaction' has no trainable parameters: nothing to train "
            "(set requires_grad on its parameters, or train another closure)."
        ),
        lambda: fit(),
    )
    for p in model.parameters():
        p.requires_grad_(True)
    _raises_everywhere(
        ValueError,
        exact("a_priori_weight was given without a_priori samples: give both."),
        lambda: fit(a_priori_weight=0.5),
    )
    _raises_everywhere(
        ValueError,
        exact(
            "validation_fraction splits the training windows, but validation trajectories "
            "were given: leave validation_fraction out."
        ),
        lambda: fit(validation=trajectories, validation_fraction=0.2),
    )
    inputs, targets = a_priori_samples(comm)
    _raises_everywhere(
        ValueError,
        r"^The a-priori inputs have shape \(\d+, 2\); closure 'reaction' takes "
        r"\(num_samples, 1\) \(its model inputs\)\.$",
        lambda: fit(a_priori=(np.hstack([inputs, inputs]), targets)),
    )
    _raises_everywhere(
        ValueError,
        exact("learning_rate set(s) the default optimizer, but optimizer= was given"),
        lambda: fit(learning_rate=0.1, optimizer=lambda params: torch.optim.SGD(params, lr=1)),
    )
    assert np.array_equal(parameters(model), before)  # nothing was trained


@pytest.mark.mpi
def test_progress_bar_on_rank_0_only(capsys):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 2, 2)
    rollout, _ = coarse(msh)
    fit_rollout(
        rollout,
        [fine_trajectory(msh, INITIAL[0], 3)],
        horizon=2,
        validation_fraction=0.0,
        epochs=1,
        progress=True,
    )
    err = capsys.readouterr().err
    assert ("fit_rollout" in err) == (MPI.COMM_WORLD.rank == 0)


# -- a reaction with memory: the stepper keeps u_(n-1) ---------------------------------------


def memory_trajectory(msh, initial, before, num_steps):
    """``[u_{-1}, u_0, ..., u_k]`` of the exact scheme: states one step apart."""
    stepper, _ = heat(msh, None, initial, before=before)
    states = owned_states([*stepper.older, stepper.u_previous])
    for _ in range(num_steps):
        stepper.step()
        states += owned_states([stepper.u])
    return states


def memory_model():
    model = MLP(2, 1, [], seed=0)
    with torch.no_grad():
        model.layers[0].weight.zero_()
        model.layers[0].bias.zero_()
    return model


def test_windows_with_older_states_start_after_them():
    trajectory = np.arange(18.0).reshape(6, 3)
    data = TrajectoryWindows(
        [trajectory], horizon=2, stride=1, num_owned=3, what="trajectory", num_older=2
    )
    assert [w.start for w in data.windows] == [2, 3]
    window = data.windows[0]
    assert [o.numpy().tolist() for o in window.older] == [
        trajectory[1].tolist(),
        trajectory[0].tolist(),
    ]
    with pytest.raises(ValueError, match=r"needs 2 older state\(s\), horizon \+ 1 = 7"):
        TrajectoryWindows([trajectory], horizon=4, stride=1, num_owned=3, what="x", num_older=2)


def _train_memory(comm, cells, epochs, learning_rate=0.1):
    msh = mesh.create_unit_square(comm, *cells)
    # u_(-1) far from u_0, so that the data tell A from B (u_n ≈ u_(n-1) later on).
    befores = INITIAL[1:] + INITIAL[:1]
    trajectories = [memory_trajectory(msh, f, g, 5) for f, g in zip(INITIAL, befores, strict=True)]
    stepper, closure = heat(msh, memory_model(), before=INITIAL[0])
    result = fit_rollout(
        Rollout(stepper, checkpoint_every=2),
        trajectories,
        horizon=3,
        start_times=[-DT] * len(trajectories),  # their first state is u_(-1)
        validation_fraction=0.0,
        batch_size=3,
        epochs=epochs,
        learning_rate=learning_rate,
        lr_patience=10,
        patience=epochs,
        progress=False,
    )
    layer = closure.model.layers[0]
    return np.array([*layer.weight.detach().numpy().ravel(), layer.bias.item()]), result.history


def test_learns_a_reaction_with_memory_through_the_solver():
    """From r = 0 to r = A u_n + B u_(n-1) + S (to 1e-3): the gradient follows each state
    through the step that reads it as u_(n-1); windows start at state 1."""
    weights, history = _train_memory(MPI.COMM_WORLD, (3, 3), 150)
    expected = np.array([A, B, S])
    assert np.abs(weights - expected).max() <= 1e-3 * np.abs(expected).max()
    assert history.best_val_loss <= 1e-8 * history.val_loss[0]


@pytest.mark.mpi
@pytest.mark.parametrize("cells", [(1, 1), (4, 3)])
def test_weights_with_memory_do_not_depend_on_ranks(cells):
    """COMM_WORLD against COMM_SELF; (1, 1) on 3 ranks: a rank owns no cells."""
    serial, serial_history = _train_memory(MPI.COMM_SELF, cells, 3)
    parallel, history = _train_memory(MPI.COMM_WORLD, cells, 3)
    assert np.linalg.norm(serial) > 0.05  # it trained
    assert np.linalg.norm(parallel - serial) <= 1e-10 * np.linalg.norm(serial)
    assert np.allclose(history.train_loss, serial_history.train_loss, rtol=1e-10, atol=0)


@pytest.mark.mpi
def test_memory_needs_every_coarse_step(tiny_square):
    stepper, _ = heat(tiny_square, memory_model(), before=INITIAL[0])
    trajectory = memory_trajectory(tiny_square, INITIAL[0], INITIAL[1], 6)
    _raises_everywhere(
        ValueError,
        re.escape(
            "The rollout's stepper keeps 1 older state(s) u_(n-1), ...: a window starts from "
            "the trajectory's states one coarse step apart, so the trajectories must hold "
            "every coarse step (target_interval=1, got 2)."
        ),
        lambda: fit_rollout(
            Rollout(stepper), [trajectory[::2]], horizon=2, target_interval=2, progress=False
        ),
    )


@pytest.mark.mpi
def test_training_leaves_the_simulation_where_it_was(tiny_square):
    """fit_rollout runs the stepper from every window's start; afterwards the states, the
    time and the closure's values are those from before (they used to be the last
    window's), and the next step continues the user's simulation with the trained model."""
    trajectories = [fine_trajectory(tiny_square, f, 4) for f in INITIAL[:2]]
    stepper, closure = heat(tiny_square, wrong_model(), initial=INITIAL[2])
    stepper.run(2, progress=False)  # a simulation under way
    rollout = Rollout(stepper)
    kept = [f.x.array.copy() for f in (stepper.u, stepper.u_previous, closure)]
    t, time = stepper.t, float(stepper.time.value)
    fit_rollout(rollout, trajectories, horizon=2, validation_fraction=0.0, batch_size=2,
                epochs=3, learning_rate=0.1, progress=False)  # fmt: skip
    for function, before in zip((stepper.u, stepper.u_previous, closure), kept, strict=True):
        np.testing.assert_array_equal(function.x.array, before)
    assert (stepper.t, float(stepper.time.value)) == (t, time)
    # One more step from there equals one step of a fresh stepper with the trained model.
    fresh, _ = heat(tiny_square, closure.model)
    fresh.u_previous.x.array[:] = stepper.u_previous.x.array
    fresh.t = t
    stepper.step()
    fresh.step()
    np.testing.assert_allclose(stepper.u.x.array, fresh.u.x.array, rtol=1e-13, atol=1e-13)

"""Training: convergence, reproducibility, schedules, checkpoints and resume, rank invariance."""

import shutil
import tempfile
import tracemalloc
import warnings
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
import torch

import dolfinx_mno as mno
from dolfinx_mno import io
from dolfinx_mno.data import (
    ClosureDataReader,
    ClosureDataWriter,
    ClosureSample,
    GriddedDataReader,
    GriddedDataWriter,
)
from dolfinx_mno.models import MLP
from dolfinx_mno.training import fit, read_shard, shard

SERIAL = MPI.COMM_SELF


def known_function(num_samples, seed=1):
    """y = sin(x0) + x1² on [-1.5, 1.5]²: inputs (n, 2), targets (n,)."""
    x = np.random.default_rng(seed).uniform(-1.5, 1.5, size=(num_samples, 2))
    return x, np.sin(x[:, 0]) + x[:, 1] ** 2


def weights(model):
    """The tensors of a state_dict (neuraloperator adds its init kwargs as "_metadata")."""
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def max_difference(a, b):
    assert list(a) == list(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture
def shared_dir():
    """A folder every rank sees: rank 0's, removed after the test."""
    comm = MPI.COMM_WORLD
    path = comm.bcast(tempfile.mkdtemp(prefix="mno-fit-") if comm.rank == 0 else None)
    yield Path(path)
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path)


def test_fit_learns_a_known_function():
    x, y = known_function(1000)
    result = fit(
        MLP(2, 1, [32, 32], seed=0),
        x,
        y,
        comm=SERIAL,
        epochs=80,
        batch_size=50,
        chunk_size=50,
        learning_rate=1e-2,
        progress=False,
    )
    history = result.history
    assert isinstance(result.model, mno.NormalizedModel)
    assert len(history.train_loss) == len(history.val_loss) == history.epochs == 80
    # Measured: 4.75e-1 after the first epoch, 1.64e-4 at best (epoch 71), test RMSE 1.22e-2.
    assert history.val_loss[0] > 0.1
    assert history.best_val_loss < 5e-4
    assert history.best_val_loss == min(history.val_loss)
    assert history.val_loss[history.best_epoch] == history.best_val_loss
    x_test, y_test = known_function(2000, seed=2)
    with torch.no_grad():
        prediction = result.model(torch.from_numpy(x_test)).numpy().ravel()
    rmse = np.sqrt(np.mean((prediction - y_test) ** 2))
    assert rmse < 3e-2
    # The statistics are those of the training split (800 of the 1000 samples).
    shift = result.model.input_normalization.shift.numpy()
    assert np.all(np.abs(shift) < 0.15) and not np.allclose(shift, x.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(result.model.output_normalization.scale, y.std(), rtol=0.05)


def test_same_seed_same_weights_other_seed_other_weights():
    x, y = known_function(300)
    settings = dict(comm=SERIAL, epochs=5, batch_size=32, chunk_size=8, progress=False)
    runs = [fit(MLP(2, 1, [16], seed=0), x, y, seed=s, **settings) for s in (7, 7, 8)]
    a, b, c = (weights(r.model) for r in runs)
    assert max_difference(a, b) == 0.0
    assert runs[0].history.val_loss == runs[1].history.val_loss
    assert max_difference(a, c) > 1e-3
    # The caller's random state is untouched.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(MLP(2, 1, [4], seed=0), x, y, **settings)
    assert torch.equal(torch.rand(3), expected)


def test_plateau_schedule_and_early_stopping():
    # Noise cannot be learnt: the validation loss stalls, the rate halves, training stops.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 2)), rng.normal(size=200)
    result = fit(
        MLP(2, 1, [16], seed=0),
        x,
        y,
        comm=SERIAL,
        epochs=200,
        batch_size=20,
        chunk_size=20,
        learning_rate=1e-2,
        lr_patience=2,
        lr_factor=0.5,
        min_learning_rate=1e-3,
        patience=8,
        progress=False,
    )
    history = result.history
    assert history.stopped_early
    assert history.epochs == history.best_epoch + 8 + 1 < 200
    rates = sorted(set(history.learning_rate), reverse=True)
    assert rates[0] == 1e-2 and len(rates) >= 2
    np.testing.assert_allclose(rates, [max(1e-2 * 0.5**k, 1e-3) for k in range(len(rates))])
    assert history.learning_rate == sorted(history.learning_rate, reverse=True)


@pytest.mark.mpi
def test_training_that_only_worsens_returns_the_starting_weights():
    """A linear model started at the exact weights of linear targets with noise of 0.1:
    Adam's first steps of 1.0 throw it far off, and ``fit`` returns the weights it was
    given (``best_epoch`` -1) instead of its first epoch's."""
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    y = 2.0 * x[:, 0] - x[:, 1] + 0.5 + 0.1 * rng.normal(size=200)
    model = MLP(2, 1, [], seed=0)
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.tensor([[2.0, -1.0]]))
        model.layers[0].bias.fill_(0.5)
    start = weights(model)
    x, y = shard(x, comm), shard(y, comm)
    result = fit(model, x, y, comm=comm, epochs=50, batch_size=20, learning_rate=1.0,
                 normalize=False, patience=3, progress=False)  # fmt: skip
    history = result.history
    assert history.stopped_early and history.epochs == 3 and history.best_epoch == -1
    assert history.best_val_loss == history.initial_val_loss < 0.02  # the noise's 0.01
    assert min(history.val_loss) > 2 * history.initial_val_loss
    assert max_difference(weights(result.model), start) == 0.0


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        (
            "min_delta",
            float("nan"),
            r"min_delta must be in \[0, 1\) \(a relative improvement\), got nan",
        ),
        ("min_delta", 1.0, r"min_delta must be in \[0, 1\) \(a relative improvement\), got 1\.0"),
        ("min_delta", -0.1, r"min_delta must be in \[0, 1\) \(a relative improvement\), got -0\.1"),
        ("seed", -1, r"seed must be a non-negative integer, got -1"),
        ("seed", 1.5, r"seed must be a non-negative integer, got 1\.5"),
        ("lr_factor", float("nan"), r"lr_factor must be a finite number, got nan\.$"),
    ],
)
def test_early_stopping_and_seed_settings_are_checked(option, value, expected):
    """min_delta=nan or 1 was accepted (an audit): no epoch counted as an improvement, and
    fit returned the untrained model after `patience` epochs without a word; -0.1 made
    every worse epoch the best. seed=1.5 trained with seed 1, seed=-1 failed in NumPy
    with "expected non-negative integer". lr_factor=nan was taken by torch, which then
    never lowered the rate (learning_rate=3: 3, 3, 3, 3, 3, 3 instead of 3, 3, 1.5, 0.75, ...)."""
    x, y = known_function(20)
    with pytest.raises((ValueError, TypeError), match=expected):
        fit(MLP(2, 1, [4]), x, y, comm=SERIAL, epochs=1, progress=False, **{option: value})


class NaNAfter(torch.nn.Module):
    """An MLP whose output turns NaN after ``calls`` forward passes (a diverging model)."""

    def __init__(self, calls):
        super().__init__()
        self.mlp, self.calls = MLP(2, 1, [4], seed=0), calls

    def forward(self, x):
        self.calls -= 1
        return self.mlp(x) * (float("nan") if self.calls < 0 else 1.0)


def test_divergence_and_interrupt_leave_the_best_weights():
    """A loss turning NaN in epoch 4 left the model with NaN weights (an audit: a user who
    caught the FloatingPointError and saved the model saved NaN); a KeyboardInterrupt left
    those of a half-done epoch. Now both leave the best epoch's weights, and say so."""
    x, y = known_function(40)
    settings = dict(comm=SERIAL, batch_size=8, progress=False)
    network = MLP(2, 1, [4], seed=0)
    fit(network, x, y, epochs=4, **settings)
    reference = weights(network)
    model = NaNAfter(1 + 4 * (4 + 1) + 2)  # the initial validation, 4 epochs of 4 + 1 passes
    expected = (
        r"^Training diverged in epoch 4: training loss nan, validation loss nan\. Lower the "
        r"learning rate, or check the data\. The model's weights were restored to those of "
        r"epoch 3 \(the best so far\)\.$"
    )
    with pytest.raises(FloatingPointError, match=expected):
        fit(model, x, y, epochs=10, **settings)
    assert max_difference(weights(model.mlp), reference) == 0.0

    def interrupt(epoch, history):
        if epoch == 3:
            raise KeyboardInterrupt

    model = MLP(2, 1, [4], seed=0)
    with pytest.raises(KeyboardInterrupt):
        fit(model, x, y, epochs=10, callback=interrupt, **settings)
    assert max_difference(weights(model), reference) == 0.0 and not model.training


def test_without_normalisation_and_value_shapes():
    x = np.random.default_rng(0).normal(size=(120, 3))
    y = np.stack([x, 2 * x], axis=1)  # (n, 2, 3): a closure with value_shape (2, 3)
    model = MLP(3, 6, [8], seed=0)
    result = fit(model, x, y, comm=SERIAL, epochs=3, normalize=False, progress=False)
    assert result.model is model
    assert result.history.epochs == 3 and result.history.val_loss[-1] < result.history.val_loss[0]


@pytest.mark.mpi
def test_bad_input_fails_on_every_rank():
    comm = MPI.COMM_WORLD
    x, y = known_function(60)
    last = comm.size - 1
    local_x, local_y = shard(x, comm), shard(y, comm)
    bad_y = local_y[:-1] if comm.rank == last else local_y
    expected = (
        rf"^fit: checking the input failed on rank\(s\) \[{last}\] \(1 of {comm.size} "
        rf"ranks?\); on rank {last}: ValueError: inputs have"
    )
    with pytest.raises(ValueError, match=expected):
        fit(MLP(2, 1, [4]), local_x, bad_y, progress=False)
    with pytest.raises(ValueError, match=r"targets have 3 components per sample"):
        fit(MLP(2, 1, [4]), local_x, np.zeros((local_x.shape[0], 3)), progress=False)
    nan_x = local_x.copy()
    nan_x[:1] = np.nan if comm.rank == 0 else nan_x[:1]
    with pytest.raises(ValueError, match=r"rank\(s\) \[0\].*NaN or Inf in 1 of"):
        fit(MLP(2, 1, [4]), nan_x, local_y, progress=False)
    with pytest.raises(ValueError, match=r"validation_fraction must be in \(0, 1\)"):
        fit(MLP(2, 1, [4]), local_x, local_y, validation_fraction=1.0, progress=False)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
        fit(MLP(2, 1, [4]), local_x, local_y, resume=True, progress=False)
    with pytest.raises(FloatingPointError, match="Training diverged in epoch 0: training loss inf"):
        fit(MLP(2, 1, [4]), local_x, 1e200 * local_y, normalize=False, progress=False)


@pytest.mark.mpi
def test_settings_that_differ_between_ranks_are_refused():
    """Each rank fitting with its own epochs (an audit: each rank meant a fit of its own and
    left out comm=) deadlocked in the loss allreduce; now every rank raises, naming the
    settings by rank. comm=MPI.COMM_SELF gives independent fits."""
    comm = MPI.COMM_WORLD
    x, y = known_function(60)
    local_x, local_y = shard(x, comm), shard(y, comm)
    if comm.size > 1:
        epochs = [2 + r for r in range(comm.size)]
        with pytest.raises(ValueError) as info:
            fit(MLP(2, 1, [4]), local_x, local_y, epochs=2 + comm.rank, seed=0, progress=False)
        assert str(info.value).startswith(
            f"fit: the ranks were given different settings, by rank: {{'epochs': {epochs}}}."
        )
        with pytest.raises(ValueError, match=r"\{'batch_size': \[8, 9"):
            fit(MLP(2, 1, [4]), local_x, local_y, epochs=1, batch_size=8 + comm.rank,
                progress=False)  # fmt: skip
    alone = fit(
        MLP(2, 1, [4]), local_x, local_y, epochs=1 + comm.rank, comm=MPI.COMM_SELF, progress=False
    )
    assert alone.history.epochs == 1 + comm.rank


@pytest.mark.mpi
def test_sizes_must_be_integers_on_every_rank():
    """``batch_size=0`` is not "the default", ``True`` is not 1 and 2.5 is not 2."""
    comm = MPI.COMM_WORLD
    x, y = known_function(60)
    local_x, local_y = shard(x, comm), shard(y, comm)
    ranks = list(range(comm.size))
    for name, value, text in [
        ("batch_size", 0, "ValueError: batch_size must be a positive integer, got 0."),
        (
            "chunk_size",
            True,
            "TypeError: chunk_size must be a positive integer, got True (a bool).",
        ),
        ("patience", 2.5, "TypeError: patience must be a positive integer, got 2.5 (float)."),
        ("lr_patience", -1, "ValueError: lr_patience must be a non-negative integer, got -1."),
        ("epochs", 1.0, "TypeError: epochs must be a non-negative integer, got 1.0 (float)."),
        ("checkpoint_every", 0, "ValueError: checkpoint_every must be a positive integer, got 0."),
    ]:
        with pytest.raises(ValueError) as info:
            fit(MLP(2, 1, [4]), local_x, local_y, progress=False, **{name: value})
        expected = (
            f"fit: checking the input failed on rank(s) {ranks} ({comm.size} of {comm.size} "
            f"{'rank' if comm.size == 1 else 'ranks'}); on rank 0: {text}"
        )
        assert str(info.value).removesuffix(".") == expected.removesuffix(".")


@pytest.mark.mpi
def test_same_weights_on_any_number_of_ranks():
    """Uneven shards (one rank may hold nothing) on all ranks == all data on one rank."""
    comm = MPI.COMM_WORLD
    x, y = known_function(333)
    bounds = [round(333 * (r / comm.size) ** 2) for r in range(comm.size + 1)]
    bounds[1] = bounds[0] if comm.size == 3 else bounds[1]  # rank 0 holds no sample
    mine = slice(bounds[comm.rank], bounds[comm.rank + 1])
    settings = dict(epochs=12, batch_size=40, chunk_size=8, learning_rate=5e-3, seed=3)
    parallel = fit(MLP(2, 1, [16, 16], seed=0), x[mine], y[mine], progress=False, **settings)
    serial = fit(MLP(2, 1, [16, 16], seed=0), x, y, comm=SERIAL, progress=False, **settings)
    # Measured: 0 (bit for bit) on 2 and 3 ranks.
    assert max_difference(weights(parallel.model), weights(serial.model)) <= 1e-12
    np.testing.assert_allclose(parallel.history.val_loss, serial.history.val_loss, rtol=1e-12)
    np.testing.assert_allclose(parallel.history.train_loss, serial.history.train_loss, rtol=1e-12)
    assert parallel.history.val_loss[-1] < 0.6 * parallel.history.val_loss[0]
    # And every rank holds the same model.
    gathered = comm.allgather(weights(parallel.model))
    assert all(max_difference(gathered[0], w) == 0.0 for w in gathered)


@pytest.mark.mpi
def test_an_epoch_does_not_keep_each_minibatch_gradients():
    """Memory does not grow with the minibatches of an epoch (it once kept, per minibatch,
    the gathered gradients of every chunk, 36 MB for an FNO, until the epoch ended: fitting
    an FNO to 2,952 fields ran out of memory). A rank holding no sample takes part."""
    comm = MPI.COMM_WORLD
    model_size = sum(p.numel() for p in MLP(2, 1, [200, 200]).parameters())

    def one_epoch(num_samples):
        x, y = known_function(num_samples)
        # Under MPI, rank 0 holds no sample.
        shares = [np.arange(0)] * (comm.size > 1) + np.array_split(
            np.arange(num_samples), max(comm.size - 1, 1)
        )
        mine = shares[comm.rank]
        fit(MLP(2, 1, [200, 200], seed=0), x[mine], y[mine], epochs=1, batch_size=4,
            chunk_size=1, normalize=False, progress=False)  # fmt: skip

    def peak_of_one_epoch(num_samples):
        tracemalloc.start()
        one_epoch(num_samples)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return comm.allreduce(peak, op=MPI.MAX)

    one_epoch(60)  # the first fit's one-time allocations, untraced
    small, large = peak_of_one_epoch(60), peak_of_one_epoch(180)
    # 24 more minibatches of 4 chunks: 24 × 4 × 8 B × model_size ≈ 31 MB if each minibatch's
    # gradients were kept (they were: 31.5 MB); measured now: 35 kB apart (serial).
    assert abs(large - small) < 4 * 8 * model_size, (small, large)


class Interrupt(Exception):
    pass


def stop_after(epoch):
    def callback(e, history):
        if e == epoch:
            raise Interrupt

    return callback


@pytest.mark.mpi
def test_interrupted_run_resumes_to_the_same_weights(shared_dir):
    comm = MPI.COMM_WORLD
    x, y = known_function(240)
    y = y + 0.3 * np.random.default_rng(3).normal(size=240)  # noise: the rate gets reduced
    x, y = shard(x, comm), shard(y, comm)
    settings = dict(
        epochs=16,
        batch_size=32,
        chunk_size=16,
        learning_rate=5e-2,
        lr_patience=0,
        patience=50,
        checkpoint_every=4,
        progress=False,
        metadata={"operands": ["u", "grad(u)"]},
    )
    straight = fit(MLP(2, 1, [16], seed=0), x, y, checkpoint_dir=shared_dir / "a", **settings)
    # Killed after epoch 13 (0-based): the last checkpoint is after 12 epochs.
    with pytest.raises(Interrupt):
        fit(
            MLP(2, 1, [16], seed=0),
            x,
            y,
            checkpoint_dir=shared_dir / "b",
            callback=stop_after(13),
            **settings,
        )
    names = sorted(p.name for p in (shared_dir / "b").iterdir())
    assert names == ["checkpoint-000012.model.pt", "checkpoint-000012.state.pt"]
    comm.Barrier()
    if comm.rank == 0:  # a model file written just before the kill, without its state
        shutil.copy(shared_dir / "b" / names[0], shared_dir / "b" / "checkpoint-000014.model.pt")
    comm.Barrier()
    # Resumed with a freshly initialised model of another seed: the checkpoint wins. The
    # model file without its state is an interrupted write, not damage: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        resumed = fit(
            MLP(2, 1, [16], seed=99), x, y, checkpoint_dir=shared_dir / "b", resume=True,
            **settings,
        )  # fmt: skip
    assert resumed.history.resumed_from == 12 and straight.history.resumed_from is None
    assert max_difference(weights(resumed.model), weights(straight.model)) == 0.0
    assert resumed.history.val_loss == straight.history.val_loss
    assert resumed.history.learning_rate == straight.history.learning_rate
    assert resumed.history.best_epoch == straight.history.best_epoch
    # The rate was reduced before and after the interruption: the schedule state travels.
    rates = straight.history.learning_rate
    assert rates[0] == 5e-2 and rates[11] == 6.25e-3 and rates[-1] == 3.90625e-4
    # The checkpoint files are plain data, and the model file is a model file.
    state = torch.load(shared_dir / "b" / "checkpoint-000016.state.pt", weights_only=True)
    assert state["epochs_done"] == 16 and state["history"]["val_loss"] == straight.history.val_loss
    contents = io.read_model_file(shared_dir / "b" / "checkpoint-000016.model.pt")
    assert contents.metadata["operands"] == ["u", "grad(u)"]
    assert contents.metadata["training"]["epochs"] == 16
    # Other settings are refused, naming them.
    with pytest.raises(ValueError, match=r"other data or settings \(batch_size: 32 then, 16 now"):
        fit(
            MLP(2, 1, [16], seed=0),
            x,
            y,
            checkpoint_dir=shared_dir / "b",
            resume=True,
            **{**settings, "batch_size": 16},
        )
    with pytest.raises(ValueError, match="was trained on other data"):
        fit(
            MLP(2, 1, [16], seed=0),
            x,
            1.01 * y,
            checkpoint_dir=shared_dir / "b",
            resume=True,
            **settings,
        )
    # resume=True without a checkpoint starts afresh.
    fresh = fit(
        MLP(2, 1, [16], seed=0), x, y, checkpoint_dir=shared_dir / "c", resume=True, **settings
    )
    assert fresh.history.resumed_from is None
    assert max_difference(weights(fresh.model), weights(straight.model)) == 0.0


@pytest.mark.mpi
def test_checkpoint_model_files_hold_the_best_weights(shared_dir):
    """After early stopping the last checkpoint's model file used to hold the last epoch's
    weights, not those fit returns. A checkpoint's model file holds the best weights so far;
    its state the last epoch's, so that a resume still continues exactly."""
    comm = MPI.COMM_WORLD
    x, y = known_function(240)
    y = y + 0.3 * np.random.default_rng(3).normal(size=240)
    x, y = shard(x, comm), shard(y, comm)
    settings = dict(epochs=40, batch_size=32, chunk_size=16, learning_rate=5e-2,
                    lr_patience=100, patience=4, checkpoint_every=1, progress=False)  # fmt: skip
    bests = []
    straight = fit(MLP(2, 1, [16], seed=0), x, y, checkpoint_dir=shared_dir / "a",
                   callback=lambda e, h: bests.append(h.best_epoch), **settings)  # fmt: skip
    history = straight.history
    assert history.stopped_early and history.best_epoch == history.epochs - 1 - 4
    final = shared_dir / "a" / f"checkpoint-{history.epochs:06d}.model.pt"
    assert max_difference(weights(io.load_model(final)), weights(straight.model)) == 0.0
    assert io.read_model_file(final).metadata["training"]["best_epoch"] == history.best_epoch
    # Interrupted after the first epoch that did not improve: its pair holds both weights.
    stop = next(e for e, best in enumerate(bests) if best < e)
    with pytest.raises(Interrupt):
        fit(MLP(2, 1, [16], seed=0), x, y, checkpoint_dir=shared_dir / "b",
            callback=stop_after(stop), **settings)  # fmt: skip
    state = torch.load(shared_dir / "b" / f"checkpoint-{stop + 1:06d}.state.pt", weights_only=True)
    assert state["weights"] is not None
    resumed = fit(MLP(2, 1, [16], seed=9), x, y, checkpoint_dir=shared_dir / "b", resume=True,
                  **settings)  # fmt: skip
    assert resumed.history.resumed_from == stop + 1
    assert max_difference(weights(resumed.model), weights(straight.model)) == 0.0
    assert resumed.history.val_loss == history.val_loss


def test_best_epoch_with_min_delta_is_the_last_epoch_that_improved_by_enough():
    """With min_delta > 0 the best epoch is not that of the lowest validation loss."""
    x, y = known_function(300)
    y = y + 0.3 * np.random.default_rng(8).normal(size=300)
    network, seen = MLP(2, 1, [16], seed=0), []
    result = fit(network, x, y, comm=SERIAL, epochs=60, batch_size=32, chunk_size=16,
                 learning_rate=5e-2, lr_patience=100, patience=6, min_delta=0.05,
                 progress=False, callback=lambda e, h: seen.append(weights(network)))  # fmt: skip
    history = result.history
    best, expected = history.initial_val_loss, -1
    for epoch, loss in enumerate(history.val_loss):  # the rule, replayed
        if loss < best * (1 - 0.05):
            best, expected = loss, epoch
    assert history.best_epoch == expected and history.best_val_loss == best
    assert history.epochs == expected + 1 + 6 and history.stopped_early
    assert min(history.val_loss) < history.best_val_loss  # a later, smaller loss
    assert max_difference(weights(result.model.model), seen[expected]) == 0.0


@pytest.mark.mpi
def test_a_fresh_run_refuses_a_folder_with_checkpoints(shared_dir):
    """A fresh run beside an earlier run's later checkpoint used to be resumed from that
    one (the newest pair in the folder): it is refused, before any epoch, and nothing in
    the folder is touched."""
    comm = MPI.COMM_WORLD
    x, y = known_function(96)
    x, y = shard(x, comm), shard(y, comm)
    settings = dict(batch_size=16, chunk_size=8, progress=False, checkpoint_every=4)
    folder = shared_dir / "run"
    fit(MLP(2, 1, [8], seed=0), x, y, epochs=8, checkpoint_dir=folder, **settings)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    epochs = []
    message = (
        f"The checkpoint folder '{folder}' already holds 2 checkpoint file(s) of an earlier "
        "run (the newest: 'checkpoint-000008.state.pt', after 8 epochs). Pass resume=True "
        "to continue that run, or, to start afresh, choose another checkpoint_dir or remove "
        "those files."
    )
    with pytest.raises(FileExistsError) as info:
        fit(MLP(2, 1, [8], seed=1), x, y, epochs=12, checkpoint_dir=folder,
            callback=lambda e, h: epochs.append(e), **settings)  # fmt: skip
    assert str(info.value) == message and epochs == []
    comm.Barrier()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # A lone model file (the state was never written) counts too.
    comm.Barrier()
    if comm.rank == 0:
        (folder / "checkpoint-000008.state.pt").rename(shared_dir / "state.pt")
    comm.Barrier()
    with pytest.raises(FileExistsError, match=r"holds 1 checkpoint file\(s\).*000008\.model"):
        fit(MLP(2, 1, [8], seed=1), x, y, epochs=12, checkpoint_dir=folder, **settings)
    comm.Barrier()
    if comm.rank == 0:
        (shared_dir / "state.pt").rename(folder / "checkpoint-000008.state.pt")
    comm.Barrier()
    # resume=True continues the earlier run.
    resumed = fit(MLP(2, 1, [8], seed=1), x, y, epochs=12, checkpoint_dir=folder, resume=True,
                  **settings)  # fmt: skip
    assert resumed.history.resumed_from == 8 and resumed.history.epochs == 12


@pytest.mark.mpi
def test_a_folder_without_write_permission_is_refused_before_training(shared_dir, monkeypatch):
    """It used to fail at the first checkpoint, after checkpoint_every epochs. (The tests
    may run as root, whom chmod does not stop: the folder refuses temporary files here.)"""
    comm = MPI.COMM_WORLD
    x, y = known_function(64)
    x, y = shard(x, comm), shard(y, comm)
    folder = shared_dir / "read-only"
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(13, "Permission denied", str(folder / "x.tmp"))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    epochs = []
    with pytest.raises(PermissionError) as info:
        fit(MLP(2, 1, [8], seed=0), x, y, epochs=40, batch_size=16, chunk_size=8,
            checkpoint_dir=folder, checkpoint_every=20, progress=False,
            callback=lambda e, h: epochs.append(e))  # fmt: skip
    assert str(info.value) == (
        f"Cannot write checkpoints in '{folder}' (PermissionError: [Errno 13] Permission "
        f"denied: '{folder}/x.tmp'); choose a checkpoint_dir you can write to, or make this "
        "one writable."
    )
    assert epochs == []
    comm.Barrier()
    assert list(folder.iterdir()) == []


@pytest.mark.mpi
def test_progress_bar_on_rank_0_only(capsys):
    comm = MPI.COMM_WORLD
    x, y = known_function(40)
    fit(MLP(2, 1, [4], seed=0), shard(x, comm), shard(y, comm), epochs=2, progress=True)
    err = capsys.readouterr().err
    assert ("fit" in err) == (comm.rank == 0)


def test_fit_a_normalized_model_without_renormalising():
    """normalize=False trains the model as given, a NormalizedModel's statistics included."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (400, 1))
    y = 5.0 * x + 1.0
    model = mno.NormalizedModel(
        torch.nn.Linear(1, 1).double(),
        mno.AffineNormalization(shift=2.0, scale=3.0, width=1),
        mno.AffineNormalization(shift=-1.0, scale=4.0, width=1),
    )
    result = fit(
        model,
        x,
        y,
        comm=SERIAL,
        epochs=300,
        batch_size=50,
        learning_rate=5e-2,
        normalize=False,
        progress=False,
        patience=300,
    )
    with torch.no_grad():
        prediction = result.model(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(prediction - y)) < 1e-3


# -- grid models, per-channel statistics, split by group ---------------------------------


def periodic_operator(num_samples, size=16, seed=0):
    """u_k = 0.5 a_{k-1} - a_k + 2 b_{k+1} + 0.3 on a periodic 1D grid.

    Inputs (n, 2, size) (channels a, b of different means and spreads), targets
    (n, 1, size).
    """
    rng = np.random.default_rng(seed)
    a = rng.normal(3.0, 2.0, size=(num_samples, size))
    b = rng.normal(-1.0, 0.5, size=(num_samples, size))
    u = 0.5 * np.roll(a, 1, -1) - a + 2.0 * np.roll(b, -1, -1) + 0.3
    return np.stack([a, b], axis=1), u[:, None, :]


class PeriodicStencil(torch.nn.Module):
    """A periodic 3-point stencil, (batch, 2, size) -> (batch, 1, size), float64.

    A circular ``Conv1d`` would do, but float64 convolutions take a slow path on the CPU.
    """

    def __init__(self, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        weight = 0.3 * torch.randn(1, 2, 3, generator=generator, dtype=torch.float64)
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        stencil = torch.stack([torch.roll(x, 1, -1), x, torch.roll(x, -1, -1)], dim=-1)
        return torch.einsum("bink,oik->bon", stencil, self.weight) + self.bias[:, None]


def periodic_conv(seed=0):
    return PeriodicStencil(seed)


def test_grid_model_learns_a_known_linear_operator():
    x, u = periodic_operator(240)
    groups = np.arange(240) // 10  # 24 "trajectories" of 10 fields
    result = fit(
        periodic_conv(),
        x,
        u,
        comm=SERIAL,
        grid=True,
        groups=groups,
        epochs=40,
        batch_size=16,
        chunk_size=8,
        learning_rate=2e-2,
        progress=False,
    )
    model = result.model
    assert isinstance(model, mno.NormalizedModel)
    assert model.input_normalization.axis == model.output_normalization.axis == 1
    assert model.input_normalization.shift.shape == (2,)  # per channel, not per grid point
    history = result.history
    # Measured: validation loss 0.81 after the first epoch, 6.8e-22 after 40; test RMSE
    # 6.1e-11 on both grids (the targets' standard deviation is 2.3).
    assert history.best_val_loss < 1e-12 * history.val_loss[0]
    # The operator on fresh fields, and on another grid: per-channel statistics let the
    # model run on any grid size.
    for size in (16, 40):
        x_test, u_test = periodic_operator(50, size=size, seed=7)
        with torch.no_grad():
            prediction = model(torch.from_numpy(x_test)).numpy()
        assert prediction.shape == u_test.shape
        assert np.sqrt(np.mean((prediction - u_test) ** 2)) < 1e-6 * u_test.std()


def test_grid_statistics_are_per_channel_of_the_training_groups():
    """Input and target statistics: numpy's per-channel mean/std over the training groups."""
    x, u = periodic_operator(40, size=12, seed=3)
    groups = np.repeat([5, 1, 9, 3], 10)  # four groups; one goes to validation
    result = fit(
        periodic_conv(),
        x,
        u,
        comm=SERIAL,
        grid=True,
        groups=groups,
        validation_fraction=0.25,
        epochs=1,
        progress=False,
    )
    model = result.model
    matches = []
    for held_out in np.unique(groups):
        train = groups != held_out
        mean_x = x[train].mean(axis=(0, 2))
        if np.allclose(model.input_normalization.shift.numpy(), mean_x, rtol=1e-14, atol=0):
            matches.append(held_out)
            np.testing.assert_allclose(
                model.input_normalization.scale, x[train].std(axis=(0, 2), ddof=1), rtol=1e-14
            )
            np.testing.assert_allclose(model.output_normalization.shift, [u[train].mean()])
            np.testing.assert_allclose(
                model.output_normalization.scale, [u[train].std(ddof=1)], rtol=1e-14
            )
    assert len(matches) == 1  # exactly three whole groups trained


def small_fno():
    """A tiny float64 1-D FNO: (batch, 2, n) -> (batch, 1, n), the same weights each call."""
    from neuralop.models import FNO

    from dolfinx_mno.torch_bridge import to_precision

    torch.manual_seed(0)
    model = FNO(n_modes=(4,), in_channels=2, out_channels=1, hidden_channels=4, n_layers=1)
    return to_precision(model, torch.float64)


@pytest.mark.mpi
@pytest.mark.parametrize("normalize", [True, False])
def test_an_interrupted_fno_run_resumes_to_the_same_weights(shared_dir, normalize):
    """neuraloperator's state_dict holds a non-tensor "_metadata" (also inside a
    NormalizedModel, and as the closure's model in fit_rollout): resuming used to fail
    with AttributeError: 'dict' object has no attribute 'detach'."""
    comm = MPI.COMM_WORLD
    x, u = periodic_operator(24, size=8)
    groups = np.arange(24) // 4
    x, u, groups = shard(x, comm), shard(u, comm), shard(groups, comm)
    settings = dict(grid=True, groups=groups, epochs=6, batch_size=4, chunk_size=2,
                    learning_rate=1e-2, patience=50, checkpoint_every=2, normalize=normalize,
                    progress=False)  # fmt: skip
    straight = fit(small_fno(), x, u, checkpoint_dir=shared_dir / "a", **settings)
    with pytest.raises(Interrupt):
        fit(small_fno(), x, u, checkpoint_dir=shared_dir / "b", callback=stop_after(2),
            **settings)  # fmt: skip
    resumed = fit(small_fno(), x, u, checkpoint_dir=shared_dir / "b", resume=True, **settings)
    assert resumed.history.resumed_from == 2
    assert max_difference(weights(resumed.model), weights(straight.model)) == 0.0
    assert resumed.history.val_loss == straight.history.val_loss


def test_normalise_inputs_or_targets_only():
    x, u = periodic_operator(60, size=8)
    settings = dict(comm=SERIAL, grid=True, epochs=2, batch_size=20, progress=False)
    inputs_only = fit(periodic_conv(), x, u, normalize_targets=False, **settings).model
    assert inputs_only.output_normalization.shift.item() == 0.0
    assert inputs_only.output_normalization.scale.item() == 1.0
    assert inputs_only.input_normalization.scale.min().item() < 0.9
    targets_only = fit(periodic_conv(), x, u, normalize=False, normalize_targets=True, **settings)
    norm = targets_only.model.input_normalization
    assert torch.equal(norm.shift, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(norm.scale, torch.ones(2, dtype=torch.float64))
    assert targets_only.model.output_normalization.scale.item() > 1.5
    # Pointwise: the targets' statistics per component; off means the identity.
    xp, yp = known_function(100)
    pointwise = fit(MLP(2, 1, [4], seed=0), xp, yp, comm=SERIAL, epochs=1, progress=False)
    raw = fit(
        MLP(2, 1, [4], seed=0),
        xp,
        yp,
        comm=SERIAL,
        epochs=1,
        normalize_targets=False,
        progress=False,
    )
    assert torch.equal(
        raw.model.input_normalization.shift, pointwise.model.input_normalization.shift
    )
    assert raw.model.output_normalization.scale.item() == 1.0
    assert raw.model.output_normalization.axis == pointwise.model.output_normalization.axis == -1


def test_split_by_group_is_disjoint_seeded_and_whole():
    from dolfinx_mno.training import _split

    rng = np.random.default_rng(0)
    groups = rng.integers(0, 37, size=1000)  # 37 groups of uneven sizes, interleaved
    splits = {}
    for seed in (0, 0, 1):
        train, val = _split(groups.size, 0.2, seed, groups)
        assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
        train_groups, val_groups = set(groups[train]), set(groups[val])
        assert not train_groups & val_groups
        assert len(val_groups) == round(0.2 * 37) == 7
        splits.setdefault(seed, []).append(val)
    assert np.array_equal(*splits[0])
    assert not np.array_equal(splits[0][0], splits[1][0])
    # Without groups: a split of the samples, as before.
    train, val = _split(100, 0.2, 0, None)
    assert val.size == 20 and np.array_equal(np.sort(np.concatenate([train, val])), np.arange(100))


@pytest.mark.mpi
def test_bad_grid_and_group_input_fails_on_every_rank():
    comm = MPI.COMM_WORLD
    x, u = periodic_operator(30, size=8)
    x, u = shard(x, comm), shard(u, comm)
    groups = shard(np.arange(30) // 3, comm)
    conv = periodic_conv()
    with pytest.raises(ValueError, match=r"With grid=True, inputs must have shape"):
        fit(conv, x[:, 0], u, grid=True, progress=False)
    with pytest.raises(ValueError, match=r"on a grid of shape \(8,\) but targets on \(7,\)"):
        fit(conv, x, u[..., :7], grid=True, progress=False)
    with pytest.raises(ValueError, match=r"must map \(batch, in_channels, \*grid\)"):
        fit(conv, x, np.concatenate([u, u], axis=1), grid=True, progress=False)
    with pytest.raises(ValueError, match=r"groups must have shape \(\d+,\), one id per local"):
        fit(conv, x, u, grid=True, groups=groups[:-1], progress=False)
    with pytest.raises(ValueError, match="groups must be integer ids, got dtype float64"):
        fit(conv, x, u, grid=True, groups=groups + 0.5, progress=False)
    with pytest.raises(ValueError, match=r"2 groups with validation_fraction=0.2 leave 2 groups"):
        fit(conv, x, u, grid=True, groups=groups // 6, progress=False)
    if comm.size > 1:
        # Another grid on the last rank; groups missing on rank 0.
        other = x[..., :6] if comm.rank == comm.size - 1 else x[..., :8]
        other_u = u[..., :6] if comm.rank == comm.size - 1 else u
        with pytest.raises(ValueError, match="the ranks' samples have different shapes"):
            fit(conv, other, other_u, grid=True, progress=False)
        with pytest.raises(ValueError, match=r"groups were given on rank\(s\) \[1"):
            fit(conv, x, u, grid=True, groups=None if comm.rank == 0 else groups, progress=False)


@pytest.mark.mpi
def test_grid_model_same_weights_on_any_number_of_ranks():
    """Fields, per-channel statistics and a split by group: independent of the ranks."""
    comm = MPI.COMM_WORLD
    x, u = periodic_operator(90, size=12, seed=5)
    groups = np.arange(90) % 9  # interleaved: each group's fields lie on several ranks
    bounds = [round(90 * (r / comm.size) ** 2) for r in range(comm.size + 1)]
    bounds[1] = bounds[0] if comm.size == 3 else bounds[1]  # rank 0 holds no field
    mine = slice(bounds[comm.rank], bounds[comm.rank + 1])
    settings = dict(grid=True, epochs=8, batch_size=20, chunk_size=4, learning_rate=1e-2, seed=2)
    parallel = fit(
        periodic_conv(), x[mine], u[mine], groups=groups[mine], progress=False, **settings
    )
    serial = fit(periodic_conv(), x, u, groups=groups, comm=SERIAL, progress=False, **settings)
    # Measured: 0 (bit for bit) on 2 and 3 ranks.
    assert max_difference(weights(parallel.model), weights(serial.model)) <= 1e-12
    np.testing.assert_allclose(parallel.history.val_loss, serial.history.val_loss, rtol=1e-12)
    assert parallel.history.val_loss[-1] < 0.5 * parallel.history.val_loss[0]
    gathered = comm.allgather(weights(parallel.model))
    assert all(max_difference(gathered[0], w) == 0.0 for w in gathered)


# -- injected optimiser and schedule ------------------------------------------------------


def sgd(lr=0.05, momentum=0.9):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def step_lr(step_size=2, gamma=0.5):
    return lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size, gamma)


def hand_written_loop(x, y, epochs, batch_size, seed, validation_fraction):
    """SGD with momentum and StepLR, written out: the weights after every epoch.

    The split and each epoch's order are those ``fit`` documents: a permutation seeded by
    ``[seed, 0x5EED]`` sends its first samples to validation, and epoch ``e`` visits the
    training samples in the order of a permutation seeded by ``[seed, e]``.
    """
    model = MLP(2, 1, [8], seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(x))
    train = order[round(validation_fraction * len(x)) :]
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y).reshape(-1, 1)
    after_epoch = []
    for epoch in range(epochs):
        shuffled = train[np.random.default_rng([seed, epoch]).permutation(len(train))]
        for start in range(0, len(shuffled), batch_size):
            batch = shuffled[start : start + batch_size]
            optimizer.zero_grad()
            loss = ((model(inputs[batch]) - targets[batch]) ** 2).sum() / len(batch)
            loss.backward()
            optimizer.step()
        scheduler.step()
        after_epoch.append(weights(model))
    return after_epoch


@pytest.mark.mpi
def test_injected_optimizer_and_scheduler_reproduce_a_hand_written_loop():
    """SGD + StepLR through fit, data-parallel, equal a serial hand-written loop (float64)."""
    comm = MPI.COMM_WORLD
    x, y = known_function(120)
    expected = hand_written_loop(x, y, epochs=5, batch_size=16, seed=4, validation_fraction=0.25)
    model = MLP(2, 1, [8], seed=0)
    after_epoch = []
    result = fit(
        model,
        shard(x, comm),
        shard(y, comm),
        optimizer=sgd(),
        scheduler=step_lr(),
        normalize=False,
        epochs=5,
        batch_size=16,
        chunk_size=4,  # four backward passes per step, spread over the ranks
        seed=4,
        validation_fraction=0.25,
        patience=10,
        progress=False,
        callback=lambda epoch, history: after_epoch.append(weights(model)),
    )
    assert result.history.learning_rate == [0.05, 0.05, 0.025, 0.025, 0.0125]
    # Measured: 3.3e-16 (serial, 2 and 3 ranks alike): the chunked gradient sum regroups the
    # batch sum at rounding level.
    for epoch in range(5):
        assert max_difference(after_epoch[epoch], expected[epoch]) <= 1e-12
    assert max_difference(expected[4], expected[0]) > 1e-2  # the loop did move the weights
    best = result.history.best_epoch
    assert max_difference(weights(result.model), after_epoch[best]) == 0.0


@pytest.mark.mpi
def test_resume_with_injected_optimizer_and_scheduler(shared_dir):
    """Momentum buffers and the schedule's position travel in the checkpoint."""
    comm = MPI.COMM_WORLD
    x, y = known_function(200)
    x, y = shard(x, comm), shard(y, comm)
    settings = dict(
        optimizer=sgd(lr=0.02),
        scheduler=step_lr(step_size=3),
        epochs=10,
        batch_size=32,
        chunk_size=8,
        patience=50,
        checkpoint_every=3,
        progress=False,
    )
    straight = fit(MLP(2, 1, [8], seed=0), x, y, checkpoint_dir=shared_dir / "a", **settings)
    with pytest.raises(Interrupt):
        fit(
            MLP(2, 1, [8], seed=0),
            x,
            y,
            checkpoint_dir=shared_dir / "b",
            callback=stop_after(7),
            **settings,
        )
    resumed = fit(
        MLP(2, 1, [8], seed=9), x, y, checkpoint_dir=shared_dir / "b", resume=True, **settings
    )
    assert resumed.history.resumed_from == 6
    assert max_difference(weights(resumed.model), weights(straight.model)) == 0.0
    assert resumed.history.val_loss == straight.history.val_loss
    assert straight.history.learning_rate == [0.02] * 3 + [0.01] * 3 + [0.005] * 3 + [0.0025]
    assert resumed.history.learning_rate == straight.history.learning_rate
    state = torch.load(shared_dir / "b" / "checkpoint-000010.state.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 10
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    # Another optimiser configuration, another schedule or the default Adam: refused.
    others = {
        r"optimizer: \{.*'momentum': 0\.9.* then, \{.*'momentum': 0\.5": dict(
            optimizer=sgd(lr=0.02, momentum=0.5)
        ),
        r"scheduler: \{.*'step_size': 3.* then, \{.*'step_size': 4": dict(
            scheduler=step_lr(step_size=4)
        ),
        r"learning_rate: None then, 0\.001 now.*optimizer: \{'class': 'torch\.optim\.sgd\.SGD'": (
            dict(optimizer=None)
        ),
    }
    for message, change in others.items():
        with pytest.raises(ValueError, match=f"other data or settings .*{message}"):
            fit(
                MLP(2, 1, [8], seed=0),
                x,
                y,
                checkpoint_dir=shared_dir / "b",
                resume=True,
                **{**settings, **change},
            )


@pytest.mark.mpi
def test_bad_optimizer_or_scheduler_fails_on_every_rank():
    comm = MPI.COMM_WORLD
    x, y = known_function(40)
    x, y = shard(x, comm), shard(y, comm)
    stray = torch.nn.Parameter(torch.zeros(2))
    bad = {
        r"learning_rate, weight_decay set\(s\) the default optimizer, but optimizer= was given": (
            dict(optimizer=sgd(), learning_rate=0.1, weight_decay=0.0)
        ),
        r"lr_patience set\(s\) the default scheduler, but scheduler= was given: set it in": dict(
            scheduler=step_lr(), lr_patience=3
        ),
        "TypeError: optimizer must be a factory params -> torch.optim.Optimizer": dict(
            optimizer=lambda params: "adam"
        ),
        "ValueError: The optimizer factory built an optimiser over tensors it was not given": (
            dict(optimizer=lambda params: torch.optim.SGD([*params, stray], lr=0.1))
        ),
        "TypeError: scheduler must be a factory optimizer -> torch.optim.lr_scheduler": dict(
            scheduler=lambda optimizer: 3
        ),
        "The scheduler factory built a schedule of another optimiser": dict(
            scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(
                torch.optim.SGD([stray], lr=0.1), 2
            )
        ),
    }
    for message, options in bad.items():
        with pytest.raises(
            ValueError, match=rf"fit: checking the input failed on rank\(s\) \[0.*{message}"
        ):
            fit(MLP(2, 1, [4], seed=0), x, y, epochs=1, progress=False, **options)
    # A factory returning None: a constant rate.
    constant = fit(
        MLP(2, 1, [4], seed=0),
        x,
        y,
        optimizer=sgd(),
        scheduler=lambda optimizer: None,
        epochs=3,
        progress=False,
    )
    assert constant.history.learning_rate == [0.05] * 3


# -- data files as input -------------------------------------------------------------------


def closure_data_file(path, num_samples, comm):
    """``num_samples`` stored samples of y = sin(x0) + x1², 60 points each (rank 0 writes).

    Returns the file's inputs (num_samples * 60, 2) and targets (num_samples * 60,).
    """
    x, y = known_function(60 * num_samples, seed=5)
    if comm.rank == 0:
        cells = np.arange(20, dtype=np.int64)
        with ClosureDataWriter(
            path, MPI.COMM_SELF, num_inputs=2, value_shape=(), num_points=60, points_per_cell=3
        ) as writer:
            for rows in np.split(np.arange(60 * num_samples), num_samples):
                writer.append(ClosureSample(x[rows], y[rows], cells, MPI.COMM_SELF))
    comm.Barrier()
    return x, y


@pytest.mark.mpi
def test_fit_on_a_closure_data_reader_equals_fit_on_arrays(shared_dir):
    """Every rank reads its block of the stored samples; on 3 ranks rank 0 reads none."""
    comm = MPI.COMM_WORLD
    path = shared_dir / "points.h5"
    x, y = closure_data_file(path, 2, comm)
    settings = dict(epochs=4, batch_size=16, chunk_size=4, learning_rate=1e-2, progress=False)
    with ClosureDataReader(path) as reader:
        # This rank's block of the 2 stored samples: [0, 0), [0, 1), [1, 2) on 3 ranks.
        first, last = 2 * comm.rank // comm.size, 2 * (comm.rank + 1) // comm.size
        local_x, local_y = read_shard(reader, comm)
        assert np.array_equal(local_x, x[60 * first : 60 * last])
        assert np.array_equal(local_y, y[60 * first : 60 * last])
        from_file = fit(MLP(2, 1, [8], seed=0), reader, **settings)
        by_group = fit(
            MLP(2, 1, [8], seed=0), reader, groups=[7, 3], validation_fraction=0.5, **settings
        )
    from_arrays = fit(MLP(2, 1, [8], seed=0), x, y, comm=SERIAL, **settings)
    groups = np.repeat([7, 3], 60)
    by_group_arrays = fit(
        MLP(2, 1, [8], seed=0),
        x,
        y,
        groups=groups,
        validation_fraction=0.5,
        comm=SERIAL,
        **settings,
    )
    # Measured: 0 (bit for bit) serially and on 2 and 3 ranks.
    assert max_difference(weights(from_file.model), weights(from_arrays.model)) == 0.0
    assert from_file.history.val_loss == from_arrays.history.val_loss
    assert max_difference(weights(by_group.model), weights(by_group_arrays.model)) == 0.0
    assert by_group.history.val_loss == by_group_arrays.history.val_loss
    assert from_file.history.val_loss != by_group.history.val_loss


@pytest.mark.mpi
def test_fit_on_a_gridded_data_reader_equals_fit_on_arrays(shared_dir):
    """Fields stored with GriddedDataWriter: fit(reader) is fit(arrays, grid=True)."""
    comm = MPI.COMM_WORLD
    path = shared_dir / "fields.h5"
    x, u = periodic_operator(30, size=12, seed=5)
    grid = mno.Grid((0.0,), (1.0,), (12,))
    with GriddedDataWriter(path, comm, grid=grid, in_channels=2, out_channels=1) as writer:
        for i in range(30):
            writer.append(x[i] if comm.rank == 0 else None, u[i] if comm.rank == 0 else None)
    ids = np.arange(30) % 6
    settings = dict(epochs=8, batch_size=8, chunk_size=2, learning_rate=2e-2, progress=False)
    with GriddedDataReader(path) as reader:
        from_file = fit(periodic_conv(), reader, groups=ids, **settings)
        with pytest.raises(ValueError, match=r"grid=False does not fit a GriddedDataReader"):
            fit(periodic_conv(), reader, grid=False, **settings)
        with pytest.raises(ValueError, match="pass no targets: the file has them"):
            fit(periodic_conv(), reader, u, **settings)
        with pytest.raises(ValueError, match=r"groups must have shape \(30,\), one id per stored"):
            fit(periodic_conv(), reader, groups=np.arange(12), **settings)
        if comm.size > 1:
            mixed = reader if comm.rank > 0 else shard(x, MPI.COMM_SELF)
            with pytest.raises(ValueError, match="pass a data reader on every rank or on none"):
                fit(periodic_conv(), mixed, None if comm.rank > 0 else u, grid=True, **settings)
    from_arrays = fit(periodic_conv(), x, u, grid=True, groups=ids, comm=SERIAL, **settings)
    assert isinstance(from_file.model, mno.NormalizedModel)
    # Measured: 0 (bit for bit) serially and on 2 and 3 ranks.
    assert max_difference(weights(from_file.model), weights(from_arrays.model)) == 0.0
    assert from_file.history.val_loss == from_arrays.history.val_loss
    assert from_file.history.val_loss[-1] < 0.5 * from_file.history.val_loss[0]


class OneRankFails(torch.nn.Module):
    """An MLP that raises on rank 1 (or 0 alone) once ``armed``: a model failing on one
    rank's chunk only, as batch norm does on a one-row chunk."""

    def __init__(self):
        super().__init__()
        self.net = MLP(2, 1, [8], seed=0)
        self.armed = False

    def forward(self, x):
        if self.armed and MPI.COMM_WORLD.rank == min(1, MPI.COMM_WORLD.size - 1):
            raise ValueError("bad chunk")
        return self.net(x)


@pytest.mark.mpi
def test_a_failure_on_one_rank_inside_the_epochs_raises_on_every_rank(shared_dir):
    """A callback or a model that raises on one rank used to leave the others waiting in
    the next collective; a checkpoint folder only rank 0 could not create, too."""
    comm = MPI.COMM_WORLD
    x, y = known_function(64)
    x, y = shard(x, comm), shard(y, comm)
    settings = dict(epochs=4, batch_size=16, chunk_size=8, progress=False)
    failing = min(1, comm.size - 1)

    def callback(epoch, history):
        if epoch == 1 and comm.rank == failing:
            raise Interrupt("stop here")

    with pytest.raises(Exception, match=r"stop here") as info:
        fit(MLP(2, 1, [8], seed=0), x, y, callback=callback, **settings)
    assert info.type is Interrupt or f"failed on rank(s) [{failing}]" in str(info.value)
    model = OneRankFails()

    def arm(epoch, history):
        model.armed = True

    with pytest.raises(ValueError, match=r"bad chunk"):  # the rank's own, or agreed on
        fit(model, x, y, callback=arm, **settings)
    model.armed = False
    blocker = shared_dir / "a_file"
    if comm.rank == 0:
        blocker.write_text("not a folder")
    comm.Barrier()
    with pytest.raises(FileExistsError, match="a_file"):
        fit(MLP(2, 1, [8], seed=0), x, y, checkpoint_dir=blocker, **settings)
    with pytest.raises(ValueError, match=r"The model \(Identity\) has no trainable parameters"):
        fit(torch.nn.Identity(), x, np.stack([y, y], axis=1), **settings)


class Plain(torch.nn.Module):
    """An unregistered architecture: it cannot be written to a model file."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1, dtype=torch.float64)

    def forward(self, x):
        return self.layer(x)


def one_group(params):
    """Adam, as the default but injected."""
    return torch.optim.Adam(params, lr=1e-3)


def two_groups(params):
    """The same Adam with the weights and the biases in two parameter groups."""
    params = list(params)
    return torch.optim.Adam([{"params": params[::2]}, {"params": params[1::2]}], lr=1e-3)


@pytest.mark.mpi
def test_a_resume_that_does_not_fit_changes_nothing(shared_dir):
    """Another architecture, another optimiser layout, other data (without the statistics
    that would tell): refused, the model as it was. A damaged newest pair falls back to
    an intact older one, and an unregistered model is refused before any epoch."""
    from dolfinx_mno.training.checkpoint import _state_digest

    comm = MPI.COMM_WORLD
    x, y = known_function(96)
    x, y = shard(x, comm), shard(y, comm)
    settings = dict(epochs=4, batch_size=16, chunk_size=8, progress=False, checkpoint_every=2)
    folder = shared_dir / "run"
    fit(MLP(2, 1, [8], seed=0), x, y, checkpoint_dir=folder, **settings)

    def refused(model, match, **options):
        before = weights(model)
        with pytest.raises(ValueError, match=match):
            fit(model, x, y, checkpoint_dir=folder, resume=True, **{**settings, **options})
        assert max_difference(weights(model), before) == 0.0

    refused(MLP(2, 1, [8], activation="relu", seed=0), r"holds another model")
    folder = shared_dir / "injected"
    fit(MLP(2, 1, [8], seed=0), x, y, checkpoint_dir=folder, optimizer=one_group, **settings)
    refused(MLP(2, 1, [8], seed=3), r"does not fit this model, optimiser.*nothing was changed",
            optimizer=two_groups)  # fmt: skip
    raw = shared_dir / "raw"
    fit(MLP(2, 1, [8], seed=0), x, y, checkpoint_dir=raw, normalize=False, **settings)
    before = MLP(2, 1, [8], seed=0)
    with pytest.raises(ValueError, match=r"other data or settings \(data_checksum: "):
        fit(before, 2 * x, y, checkpoint_dir=raw, resume=True, normalize=False, **settings)
    # The same data on this number of ranks resumes (the checksum is rank-invariant).
    again = fit(MLP(2, 1, [8], seed=5), x, y, checkpoint_dir=raw, resume=True, normalize=False,
                **{**settings, "epochs": 6})  # fmt: skip
    assert again.history.resumed_from == 4
    # Pairs after 2 and 4 epochs, the newest model file damaged: resume from 2.
    kept = shared_dir / "kept"
    fit(MLP(2, 1, [8], seed=0), x, y, checkpoint_dir=kept,
        callback=lambda e, h: None, **{**settings, "checkpoint_every": 2})  # fmt: skip
    comm.Barrier()
    if comm.rank == 0:
        newest = kept / "checkpoint-000004.model.pt"
        older_model, older_state = (kept / f"checkpoint-000002.{k}.pt" for k in ("model", "state"))
        shutil.copy(newest, older_model)  # re-create an older pair from the newest
        state = torch.load(kept / "checkpoint-000004.state.pt", weights_only=True)
        state["epochs_done"] = 2
        state["sha256"] = _state_digest(state)  # an intact state of its own
        torch.save(state, older_state)
        newest.write_bytes(newest.read_bytes()[:100])
    comm.Barrier()
    # It used to fall back without a word; every rank warns, naming the file and why.
    with pytest.warns(RuntimeWarning) as caught:
        resumed = fit(MLP(2, 1, [8], seed=0), x, y, checkpoint_dir=kept, resume=True, **settings)
    assert resumed.history.resumed_from == 2
    [message] = [str(w.message) for w in caught]
    assert message.startswith(
        f"resume=True passed over 1 damaged checkpoint(s) in '{kept}': the pair after 4 "
        f"epochs (ModelFileError: Could not read '{kept}/checkpoint-000004.model.pt': the file "
        "is truncated, corrupted or not a torch file (RuntimeError: PytorchStreamReader "
        "failed reading zip archive: failed finding central directory"  # torch's words
    )
    assert message.endswith(
        "). Resuming from 'checkpoint-000002.state.pt' (after 2 epochs) instead. Remove or "
        "restore the damaged files to silence this warning."
    )
    assert caught[0].filename == __file__  # the caller's line, past the package
    epochs = []
    with pytest.raises(ValueError, match=r"No registered architecture describes a Plain"):
        fit(Plain(), x, y[:, None], checkpoint_dir=shared_dir / "plain",
            callback=lambda e, h: epochs.append(e), **settings)  # fmt: skip
    assert epochs == []


@pytest.mark.mpi
def test_unreadable_state_files_are_passed_over_as_damaged_model_files_are(shared_dir):
    """A file named like a newer state file but not one used to block the resume with
    ModelFileError, although an intact pair was there."""
    comm = MPI.COMM_WORLD
    x, y = known_function(96)
    x, y = shard(x, comm), shard(y, comm)
    settings = dict(batch_size=16, chunk_size=8, progress=False, checkpoint_every=4)
    folder = shared_dir / "run"
    fit(MLP(2, 1, [8], seed=0), x, y, epochs=4, checkpoint_dir=folder, **settings)
    comm.Barrier()
    if comm.rank == 0:
        (folder / "checkpoint-000100.state.pt").write_text("not a checkpoint")
        torch.save({"format": "something else"}, folder / "checkpoint-000050.state.pt")
        shutil.copy(folder / "checkpoint-000004.model.pt", folder / "checkpoint-000050.model.pt")
        torch.save([1, 2], folder / "checkpoint-000030.state.pt")
    comm.Barrier()
    with pytest.warns(RuntimeWarning) as caught:
        resumed = fit(MLP(2, 1, [8], seed=0), x, y, epochs=8, checkpoint_dir=folder,
                      resume=True, **settings)  # fmt: skip
    assert resumed.history.resumed_from == 4 and resumed.history.epochs == 8
    assert [str(w.message) for w in caught] == [
        f"resume=True passed over 3 damaged checkpoint(s) in '{folder}': the pair after 100 "
        f"epochs (ModelFileError: Could not read '{folder}/checkpoint-000100.state.pt': it is "
        "not a torch file (torch.save writes a zip archive); the file is corrupted or of "
        "another kind); the pair after 50 epochs (ModelFileError: "
        f"'{folder}/checkpoint-000050.state.pt' is not a dolfinx_mno training-state file); "
        f"the pair after 30 epochs (ModelFileError: '{folder}/checkpoint-000030.state.pt' is "
        "not a dolfinx_mno training-state file). Resuming from 'checkpoint-000004.state.pt' "
        "(after 4 epochs) instead. Remove or restore the damaged files to silence this "
        "warning."
    ]
    # Nothing but the run's own older pair was removed.
    names = sorted(p.name for p in folder.iterdir())
    kept = ["000008.model", "000008.state", "000030.state", "000050.model", "000050.state"]
    assert names == [f"checkpoint-{name}.pt" for name in [*kept, "000100.state"]]


@pytest.mark.mpi
def test_a_damaged_state_file_fails_its_checksum(shared_dir):
    """A state file had no checksum: a changed bit in its best weights resumed silently,
    and the run returned other weights. Now its pair is passed over as damaged."""
    from dolfinx_mno.io import ModelFileError
    from dolfinx_mno.training.checkpoint import _load_state

    comm = MPI.COMM_WORLD
    x, y = known_function(96)
    x, y = shard(x, comm), shard(y, comm)
    settings = dict(epochs=4, batch_size=16, chunk_size=8, progress=False, checkpoint_every=4)
    straight = fit(MLP(2, 1, [8], seed=0), x, y, checkpoint_dir=shared_dir / "a", **settings)
    path = shared_dir / "a" / "checkpoint-000004.state.pt"
    state = _load_state(path)  # intact: verified
    assert len(state["sha256"]) == 64
    comm.Barrier()
    if comm.rank == 0:
        first = state["best_state"]["model.layers.0.weight"].view(-1)
        first[0] = np.nextafter(first[0].item(), np.inf)  # one bit of one weight
        torch.save(state, path)
    comm.Barrier()
    with pytest.raises(ModelFileError) as info:
        _load_state(path)
    assert str(info.value) == (
        f"SHA-256 mismatch in '{path}': the training-state file is corrupted."
    )
    with pytest.warns(RuntimeWarning) as caught:
        resumed = fit(MLP(2, 1, [8], seed=0), x, y, checkpoint_dir=shared_dir / "a",
                      resume=True, **settings)  # fmt: skip
    assert resumed.history.resumed_from is None  # no intact pair: a fresh start
    assert [str(w.message) for w in caught] == [
        f"resume=True passed over 1 damaged checkpoint(s) in '{shared_dir / 'a'}': the pair "
        f"after 4 epochs (ModelFileError: SHA-256 mismatch in '{path}': the training-state "
        "file is corrupted). No intact checkpoint is left: the run starts afresh. Remove or "
        "restore the damaged files to silence this warning."
    ]
    assert max_difference(weights(resumed.model), weights(straight.model)) == 0.0


@pytest.mark.mpi
def test_the_data_checksum_does_not_depend_on_the_ranks():
    from dolfinx_mno.training.samples import data_checksum, split_fingerprint, split_samples

    comm = MPI.COMM_WORLD
    x, y = known_function(1000)
    y = y[:, None]
    whole = data_checksum(x, y, 0, MPI.COMM_SELF, chunk=64)
    mine_x, mine_y = shard(x, comm), shard(y, comm)
    offset = comm.exscan(len(mine_x)) or 0
    assert data_checksum(mine_x, mine_y, offset, comm, chunk=37) == whole
    changed = x.copy()
    changed[500, 1] = np.nextafter(changed[500, 1], 2.0)  # one bit of one value
    assert data_checksum(changed, y, 0, MPI.COMM_SELF) != whole
    swapped = x[[1, 0, *range(2, 1000)]]  # two rows swapped
    assert data_checksum(swapped, y[[1, 0, *range(2, 1000)]], 0, MPI.COMM_SELF) != whole
    # The checksums of the two splits: as rank-invariant, adding up to the whole one's.
    split = split_samples(1000, 0.2, 0, None)
    parts = split_fingerprint(mine_x, mine_y, offset, split, comm)
    assert parts == split_fingerprint(x, y, 0, split, MPI.COMM_SELF)
    assert [parts[k]["count"] for k in parts] == [800, 200]
    total = sum(int(parts[k]["checksum"], 16) for k in parts) % 2**64
    assert f"{total:016x}" == whole


@pytest.mark.mpi
def test_a_resume_with_other_data_is_refused_naming_them(shared_dir):
    """Other validation samples (same sizes, same training statistics) used to resume
    silently, with a best loss and an early-stopping state of other data; so did a swap
    of two training samples."""
    from dolfinx_mno.training.samples import split_fingerprint, split_samples

    comm = MPI.COMM_WORLD
    x, y = known_function(96)
    settings = dict(epochs=2, batch_size=16, chunk_size=8, progress=False, checkpoint_every=2)
    folder = shared_dir / "run"
    fit(MLP(2, 1, [8], seed=0), shard(x, comm), shard(y, comm), checkpoint_dir=folder, **settings)
    split = split_samples(96, 0.2, 0, None)
    train_index, val_index = split
    before = split_fingerprint(x, y[:, None], 0, split, SERIAL)  # one rank: the same
    state = torch.load(folder / "checkpoint-000002.state.pt", weights_only=True)
    assert state["data"] == before
    assert [before[k]["count"] for k in before] == [77, 19]
    other = y.copy()
    other[val_index] += 1.0
    first, second = train_index[:2]
    order = np.arange(96)
    order[[first, second]] = [second, first]
    for changed_x, changed_y, what in ((x, other, "validation"), (x[order], y[order], "training")):
        after = split_fingerprint(changed_x, changed_y[:, None], 0, split, SERIAL)
        assert after[f"{what} samples"] != before[f"{what} samples"]
        with pytest.raises(ValueError) as info:
            fit(MLP(2, 1, [8], seed=0), shard(changed_x, comm), shard(changed_y, comm),
                checkpoint_dir=folder, resume=True, **{**settings, "epochs": 4})  # fmt: skip
        count = before[f"{what} samples"]["count"]
        assert str(info.value) == (
            f"The checkpoint '{folder}/checkpoint-000002.state.pt' was trained on other data: "
            f"the {what} samples differ ({count} with checksum "
            f"{before[f'{what} samples']['checksum']} then, {count} with checksum "
            f"{after[f'{what} samples']['checksum']} now). Its best loss and early-stopping "
            "state belong to those data. Resume with the data the run started with, or train "
            "on these in a fresh run: another checkpoint_dir, with resume=False."
        )
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint-000002.model.pt",
        "checkpoint-000002.state.pt",
    ]  # nothing trained or written

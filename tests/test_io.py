"""Model files: exact round trips, weights_only loading, refusal of bad files, MPI writes."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno import io
from dolfinx_mno.models import MLP
from dolfinx_mno.nonlocal_closure import NonlocalClosure
from dolfinx_mno.spec import SPEC_KEY, ClosureSpec

OPERANDS = {"operands": ["u", "grad(u)"], "value_shape": [], "quadrature_degree": 2}


@pytest.fixture
def shared_dir():
    """A folder every rank sees: rank 0's, removed after the test."""
    comm = MPI.COMM_WORLD
    path = comm.bcast(tempfile.mkdtemp(prefix="mno-io-") if comm.rank == 0 else None)
    yield Path(path)
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path)


@pytest.fixture
def registry():
    """Remove architectures a test registers."""
    before = set(io.registered_architectures())
    yield
    for name in set(io.registered_architectures()) - before:
        del io._REGISTRY[name]


def normalized_mlp(dtype="float64"):
    return mno.NormalizedModel(
        MLP(3, 1, [8, 8], activation="softplus", dtype=dtype, seed=3),
        mno.AffineNormalization([1.0, -2.0, 0.5], [2.0, 3.0, 0.25], width=3),
        mno.AffineNormalization(4.0, 0.5, width=1),
    )


def tensors(model):
    """The tensors of a state_dict (neuraloperator adds its init kwargs as "_metadata")."""
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def assert_same_state(a, b):
    sa, sb = tensors(a), tensors(b)
    assert sa
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def raw(path):
    return torch.load(path, weights_only=True)


def rewrite(path, payload, *, rehash=True):
    """Write ``payload`` back, with a valid digest if ``rehash`` (so later checks run)."""
    if rehash:
        header = {k: payload[k] for k in ("format", "format_version", "architecture")}
        header.update(metadata=payload["metadata"], versions=payload["versions"])
        payload["sha256"] = io._digest(header, payload["state_dict"])
    torch.save(payload, path)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_is_exact(tmp_path, dtype):
    model = normalized_mlp(dtype)
    path = tmp_path / "closure.pt"
    digest = io.save_model(path, model, metadata=OPERANDS)
    loaded = io.load_model(path)
    assert isinstance(loaded, mno.NormalizedModel) and isinstance(loaded.model, MLP)
    assert loaded.model.config == model.model.config
    assert_same_state(model, loaded)
    x = torch.randn(50, 3, dtype=getattr(torch, dtype))
    assert torch.equal(model(x), loaded(x))
    contents = io.read_model_file(path)
    assert contents.sha256 == digest and len(digest) == 64
    assert contents.metadata == OPERANDS
    assert contents.versions["torch"] == torch.__version__
    assert contents.versions["numpy"] == np.__version__
    assert set(contents.versions) == {"dolfinx_mno", "numpy", "python", "torch"}
    assert {"input_normalization.shift", "output_normalization.scale"} <= set(contents.state_dict)
    # The file is plain data: weights_only loading, JSON header, tensors.
    payload = raw(path)
    assert payload["format"] == "dolfinx_mno.model" and payload["format_version"] == 1
    assert json.loads(payload["architecture"])["kwargs"]["model"]["name"] == "mlp"


@pytest.mark.parametrize("name", ["FNO", "TFNO"])
def test_neuraloperator_round_trip(tmp_path, name):
    from neuralop import models

    torch.manual_seed(0)
    if name == "FNO":
        model = models.FNO(n_modes=(6,), in_channels=2, out_channels=1, hidden_channels=8)
        x = torch.randn(3, 2, 16)
    else:
        model = models.TFNO((4, 4), 1, 2, 6, n_layers=2, rank=0.5)
        x = torch.randn(2, 1, 12, 12)
    wrapped = mno.NormalizedModel(
        model, mno.AffineNormalization(width=1), mno.AffineNormalization(width=1)
    )
    for saved in (model, wrapped):
        io.save_model(tmp_path / "fno.pt", saved)
        loaded = io.load_model(tmp_path / "fno.pt")
        assert type(loaded) is type(saved)
        assert_same_state(saved, loaded)
        saved.eval()
        assert torch.equal(saved(x), loaded(x))
    contents = io.read_model_file(tmp_path / "fno.pt")
    assert contents.versions["neuraloperator"] == "2.0.0"
    kwargs = contents.architecture["kwargs"]["model"]["kwargs"]
    if name == "TFNO":
        assert kwargs == {
            "n_modes": [4, 4],
            "in_channels": 1,
            "out_channels": 2,
            "hidden_channels": 6,
            "n_layers": 2,
            "rank": 0.5,
        }
    else:
        assert kwargs["n_modes"] == [6] and "non_linearity" not in kwargs


def test_per_channel_normalisation_round_trip(tmp_path):
    """Channel-axis statistics (grid models) travel with the architecture; others do not."""
    from neuralop import models

    torch.manual_seed(0)
    fno = models.FNO(n_modes=(6,), in_channels=2, out_channels=1, hidden_channels=8)
    model = mno.NormalizedModel(
        fno,
        mno.AffineNormalization([1.0, -2.0], [2.0, 0.5], width=2, axis=1),
        mno.AffineNormalization(3.0, 4.0, width=1, axis=1),
    ).eval()
    io.save_model(tmp_path / "grid.pt", model)
    loaded = io.load_model(tmp_path / "grid.pt")
    kwargs = io.read_model_file(tmp_path / "grid.pt").architecture["kwargs"]
    assert kwargs["input_axis"] == kwargs["output_axis"] == 1
    assert loaded.input_normalization.axis == loaded.output_normalization.axis == 1
    assert_same_state(model, loaded)
    for size in (16, 24):  # per-channel statistics: any grid
        x = torch.randn(3, 2, size)
        assert torch.equal(model(x), loaded(x))
    # Pointwise models keep the description files had before the axes existed, and such
    # a description builds pointwise normalisations.
    io.save_model(tmp_path / "points.pt", normalized_mlp())
    kwargs = io.read_model_file(tmp_path / "points.pt").architecture["kwargs"]
    assert set(kwargs) == {"model", "num_inputs", "num_outputs"}
    assert io.load_model(tmp_path / "points.pt").output_normalization.axis == -1


def test_bounded_round_trip(tmp_path):
    """``Bounded`` around an MLP (inside a normalisation, as ``fit`` wraps it) and an FNO."""
    from neuralop import models

    torch.manual_seed(0)
    mlp = mno.NormalizedModel(
        mno.Bounded(MLP(2, 1, [8], seed=0), bound=2.5),
        mno.AffineNormalization([1.0, -1.0], [2.0, 0.5], width=2),
        mno.AffineNormalization(3.0, 4.0, width=1),
    )
    fno = mno.Bounded(models.FNO(n_modes=(4,), in_channels=1, out_channels=1,
                                 hidden_channels=4), bound=0.5).eval()  # fmt: skip
    for saved, x in ((mlp, torch.randn(7, 2, dtype=torch.float64)), (fno, torch.randn(2, 1, 12))):
        io.save_model(tmp_path / "bounded.pt", saved)
        loaded = io.load_model(tmp_path / "bounded.pt")
        assert_same_state(saved, loaded)
        assert torch.equal(saved(x), loaded(x))
    inner = io.read_model_file(tmp_path / "bounded.pt").architecture
    assert inner["name"] == "bounded" and inner["kwargs"]["bound"] == 0.5
    assert inner["kwargs"]["model"]["name"] == "neuralop.FNO"
    assert type(loaded) is mno.Bounded and loaded.bound == 0.5


def test_user_architecture(tmp_path, registry):
    class Cubic(torch.nn.Module):
        def __init__(self, width=2):
            super().__init__()
            self.config = {"width": width}
            self.weight = torch.nn.Parameter(torch.arange(width, dtype=torch.float64))

        def forward(self, x):
            return (self.weight * x**3).sum(dim=1, keepdim=True)

    io.register_architecture("cubic", Cubic)
    with pytest.raises(ValueError, match="'cubic' is already registered"):
        io.register_architecture("cubic", Cubic)
    model = Cubic(3)
    io.save_model(tmp_path / "cubic.pt", model)
    loaded = io.load_model(tmp_path / "cubic.pt")
    assert_same_state(model, loaded)
    # A function factory: models built by build_model remember their architecture.
    io.register_architecture("cubic4", lambda: Cubic(4))
    built = io.build_model({"name": "cubic4", "kwargs": {}})
    io.save_model(tmp_path / "cubic4.pt", built)
    assert io.read_model_file(tmp_path / "cubic4.pt").architecture["name"] == "cubic4"
    # The architecture changed since the file was written: the weights no longer fit.
    io.register_architecture("cubic", lambda width: Cubic(width + 1), overwrite=True)
    with pytest.raises(
        io.ModelFileError, match=r"(?s)do not match architecture 'cubic'.*size mismatch for weight"
    ):
        io.load_model(tmp_path / "cubic.pt")


def test_unsavable_models_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    with pytest.raises(
        io.ModelFileError, match="No registered architecture describes a Sequential"
    ):
        io.save_model(path, torch.nn.Sequential(torch.nn.Linear(2, 1)))
    from neuralop import models

    fno = models.FNO(n_modes=(4,), in_channels=1, out_channels=1, hidden_channels=4,
                     non_linearity=torch.nn.functional.relu)  # fmt: skip
    with pytest.raises(io.ModelFileError, match=r"argument non_linearity=.*relu.*is not JSON"):
        io.save_model(path, fno)
    with pytest.raises(io.ModelFileError, match=r"metadata must be JSON.*object"):
        io.save_model(path, MLP(1, 1), metadata={"bad": object()})
    with pytest.raises(io.ModelFileError, match="Unknown architecture 'nope'"):
        io.save_model(path, MLP(1, 1), architecture=("nope", {}))
    assert not path.exists()
    # NumPy values are converted without loss.
    io.save_model(path, MLP(1, 1), metadata={"value_shape": np.array([2, 2]), "q": np.int64(4)})
    assert io.read_model_file(path).metadata == {"value_shape": [2, 2], "q": 4}


def test_tampered_truncated_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    io.save_model(path, normalized_mlp(), metadata=OPERANDS)
    good = path.read_bytes()

    payload = raw(path)
    payload["state_dict"]["model.layers.0.weight"][0, 0] += 1e-12
    rewrite(path, payload, rehash=False)
    with pytest.raises(io.ModelFileError) as info:
        io.load_model(path)
    assert str(info.value) == (
        f"SHA-256 mismatch in {str(path)!r}: the file is corrupted (a damaged copy, disk or "
        "download), or its weights or header were edited after saving."
    )

    path.write_bytes(good)
    payload = raw(path)
    payload["metadata"] = json.dumps({"quadrature_degree": 4})
    rewrite(path, payload, rehash=False)
    with pytest.raises(io.ModelFileError, match="SHA-256 mismatch"):
        io.read_model_file(path)

    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(io.ModelFileError, match="truncated, corrupted or not a torch file"):
        io.load_model(path)

    # Bytes that are no zip archive fail in torch's unpickler too; that is not code refused.
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(io.ModelFileError) as info:
        io.load_model(path)
    assert str(info.value) == (
        f"Could not read {str(path)!r}: it is not a torch file (torch.save writes a zip "
        "archive); the file is corrupted or of another kind."
    )

    path.write_bytes(good)
    payload = raw(path)
    payload["format_version"] = 2
    rewrite(path, payload)
    with pytest.raises(io.ModelFileError, match=r"format version 2; .* reads format version 1"):
        io.load_model(path)

    torch.save({"weight": torch.ones(2)}, path)
    with pytest.raises(io.ModelFileError, match="is not a dolfinx_mno model file"):
        io.load_model(path)

    path.write_bytes(good)
    payload = raw(path)
    payload["architecture"] = json.dumps({"name": "nope", "kwargs": {}})
    rewrite(path, payload)
    with pytest.raises(io.ModelFileError, match=r"Unknown architecture 'nope' \(registered: \["):
        io.load_model(path)

    path.write_bytes(good)
    payload = raw(path)
    architecture = json.loads(payload["architecture"])
    architecture["kwargs"]["model"]["kwargs"]["hidden_features"] = [8, 9]
    payload["architecture"] = json.dumps(architecture)
    rewrite(path, payload)
    with pytest.raises(io.ModelFileError, match=r"do not match architecture 'normalized_model'"):
        io.load_model(path)

    del payload["sha256"]
    torch.save(payload, path)
    with pytest.raises(io.ModelFileError, match="lacks entries of a model file"):
        io.load_model(path)

    with pytest.raises(FileNotFoundError, match="No model file at"):
        io.load_model(tmp_path / "missing.pt")


def test_every_flipped_byte_is_refused_or_harmless(tmp_path):
    """Flip each byte of a small file: ModelFileError, or the exact model (never another)."""
    path, damaged = tmp_path / "model.pt", tmp_path / "damaged.pt"
    io.save_model(path, MLP(1, 1, [], seed=0))  # 2.3 KB; one-element tensors
    good = path.read_bytes()
    expected = tensors(io.load_model(path))
    refused = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a flipped pickle protocol byte makes torch warn
        for position in range(len(good)):
            flipped = bytearray(good)
            flipped[position] ^= 0xFF
            damaged.write_bytes(flipped)
            try:
                model = io.load_model(damaged)
            except io.ModelFileError as err:
                refused += 1
                # Each refusal names the file and the reason (see the test above).
                assert repr(str(damaged)) in str(err), (position, str(err))
                continue
            # Unused bytes (zip headers, padding): the model is exactly the saved one.
            loaded = tensors(model)
            assert list(loaded) == list(expected), position
            for key, tensor in expected.items():
                assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor)
    # The pickled header, the tensors and the digest are all covered.
    assert refused > len(good) // 3


def test_unreadable_tensors_are_a_model_file_error(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    io.save_model(path, MLP(2, 1, [3], seed=0))

    def unreadable(header, state_dict):
        raise RuntimeError("self.stride(-1) must be 1 to view Double as Byte\nmore")

    monkeypatch.setattr(io, "_digest", unreadable)
    with pytest.raises(io.ModelFileError) as info:
        io.load_model(path)
    assert str(info.value) == (
        f"Could not verify {str(path)!r}: the file is corrupted (RuntimeError: "
        "self.stride(-1) must be 1 to view Double as Byte)."
    )


MEASURE_LOAD = """
import json, resource, sys
import dolfinx_mno
from dolfinx_mno import io
io.load_model(sys.argv[1])  # a small good file: torch's loading machinery warmed up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    io.load_model(sys.argv[2])
    message = None
except io.ModelFileError as err:
    message = str(err)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grown_mib": (after - before) / 1024, "message": message}))
"""


def test_a_small_file_naming_a_huge_architecture_is_refused_before_allocating(tmp_path):
    """Before the fix, this 3 KB file allocated the 134 MB MLP before refusing it."""
    good, huge = tmp_path / "good.pt", tmp_path / "huge.pt"
    io.save_model(good, MLP(2, 1, [3], seed=0))
    payload = raw(good)
    architecture = json.loads(payload["architecture"])
    architecture["kwargs"]["hidden_features"] = [4096, 4096]  # 16.8e6 float64 weights
    payload["architecture"] = json.dumps(architecture)
    rewrite(huge, payload)
    assert huge.stat().st_size < 4000
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_LOAD, str(good), str(huge)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    measured = json.loads(result.stdout.splitlines()[-1])
    message = measured["message"]
    assert message.startswith(
        "The weights in the file do not match architecture 'mlp' with kwargs "
        "{'activation': 'tanh', 'dtype': 'float64', 'hidden_features': [4096, 4096], "
    )
    assert "size mismatch for layers.0.weight: copying a param with shape torch.Size([3, 2])" in (
        message
    )
    assert measured["grown_mib"] < 50, measured


class Payload:
    """Unpickling this would create a file: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": "dolfinx_mno.model", "hook": Payload(marker)}, path)
    with pytest.raises(io.ModelFileError, match=r"objects other than tensors.*weights_only"):
        io.load_model(path)
    torch.save({"format": "dolfinx_mno.model", "hook": print}, path)
    with pytest.raises(io.ModelFileError, match="would run code from the file"):
        io.read_model_file(path)
    assert not marker.exists()


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    io.save_model(path, normalized_mlp())
    good = path.read_bytes()
    save = torch.save

    def interrupted(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        f.truncate(100)  # half-written when the job is killed
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_model(path, MLP(3, 1, [4], seed=0))
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_save_model_refuses_an_architecture_the_weights_do_not_fit(tmp_path):
    """save_model(..., architecture=...) used to write a file that could never be loaded."""
    path = tmp_path / "model.pt"
    wide = {"in_features": 3, "out_features": 2, "hidden_features": [8]}
    with pytest.raises(io.ModelFileError) as info:
        io.save_model(path, MLP(3, 2, [4], seed=0), architecture=("mlp", wide))
    assert str(info.value) == (
        "The model's weights do not fit the architecture 'mlp' with kwargs "
        "{'in_features': 3, 'out_features': 2, 'hidden_features': [8]}, so the file could "
        "never be loaded: Error(s) in loading state_dict for MLP: size mismatch for "
        "layers.0.weight: copying a param with shape torch.Size([4, 3]) from checkpoint, "
        "the shape in current model is torch.Size([8, 3]). size mismatch for layers.0.bias: "
        "copying a param with shape torch.Size([4]) from checkpoint, the shape in current "
        "model is torch.Size([8]). size mismatch for layers.2.weight: copying a param with "
        "shape torch.Size([2, 4]) from checkpoint, the shape in current model is "
        "torch.Size([2, 8]). Give the (name, kwargs) the model was built with, or leave "
        "architecture out for a registered model."
    )
    assert list(tmp_path.iterdir()) == []
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4, dtype=torch.float64))
    with pytest.raises(io.ModelFileError, match=r'Unexpected key\(s\) in state_dict: "0.weight"'):
        io.save_model(path, plain, architecture=("mlp", {**wide, "hidden_features": [4]}))
    # The right kwargs (defaults left out, no seed): saved and loaded back exactly.
    model = MLP(3, 2, [4], seed=0)
    io.save_model(path, model, architecture=("mlp", {**wide, "hidden_features": [4]}))
    loaded, saved = tensors(io.load_model(path)), tensors(model)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved) and list(loaded) == list(saved)
    x = torch.linspace(-2.0, 2.0, 12, dtype=torch.float64).reshape(4, 3)
    assert torch.equal(io.load_model(path)(x), model(x))


def test_save_model_refuses_an_architecture_of_another_activation(tmp_path):
    """A tanh MLP saved as a gelu one fits every shape: the file was written and loaded
    into another function (outputs 0.14 apart on [-1, 1]²)."""
    path = tmp_path / "model.pt"
    kwargs = {"in_features": 2, "out_features": 1, "hidden_features": [8]}
    model = MLP(2, 1, [8], seed=0)  # tanh
    with pytest.raises(io.ModelFileError) as info:
        io.save_model(path, model, architecture=("mlp", {**kwargs, "activation": "gelu"}))
    assert str(info.value) == (
        "The architecture 'mlp' with kwargs {'in_features': 2, 'out_features': 1, "
        "'hidden_features': [8], 'activation': 'gelu'} builds another model than the one "
        "given (activation='gelu' there, 'tanh' in the model): the file would load into a "
        "different function. Give the (name, kwargs) the model was built with, or leave "
        "architecture out for a registered model."
    )
    # Nested: the bound of a Bounded around it, and the inner activation.
    inner = {"name": "mlp", "kwargs": kwargs}
    with pytest.raises(io.ModelFileError, match=r"\(bound=2.0 there, 3.0 in the model\)"):
        io.save_model(path, mno.Bounded(model, 3.0),
                      architecture=("bounded", {"model": inner, "bound": 2.0}))  # fmt: skip
    gelu = {"name": "mlp", "kwargs": {**kwargs, "activation": "gelu"}}
    with pytest.raises(io.ModelFileError, match=r"\(model=\{.*'gelu'.* there, .*'tanh'"):
        io.save_model(path, mno.Bounded(model, 3.0),
                      architecture=("bounded", {"model": gelu, "bound": 3.0}))  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    io.save_model(path, mno.Bounded(model, 3.0), architecture=("bounded", {"model": inner,
                  "bound": 3.0}))  # fmt: skip
    x = torch.linspace(-1.0, 1.0, 10, dtype=torch.float64).reshape(5, 2)
    assert torch.equal(io.load_model(path)(x), mno.Bounded(model, 3.0)(x))


@pytest.mark.parametrize(("umask", "new_mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_get_the_usual_permissions(tmp_path, umask, new_mode):
    """Files used to be created 0o600 (the temporary file's mode), and an existing file
    replaced by a save became 0o600 too."""
    import stat

    previous = os.umask(umask)
    try:
        new = tmp_path / "new.pt"
        io.save_model(new, MLP(2, 1, [4], seed=0))
        assert stat.S_IMODE(new.stat().st_mode) == new_mode
        plain = tmp_path / "plain.txt"
        plain.write_text("")  # what open() gives
        assert stat.S_IMODE(plain.stat().st_mode) == new_mode
        existing = tmp_path / "existing.pt"
        existing.write_bytes(b"")
        existing.chmod(0o640)
        io.save_model(existing, MLP(2, 1, [4], seed=0))
        assert stat.S_IMODE(existing.stat().st_mode) == 0o640
        assert io.read_model_file(existing).architecture["name"] == "mlp"
    finally:
        os.umask(previous)


@pytest.mark.mpi
def test_mpi_rank_0_writes_all_ranks_load(shared_dir):
    comm = MPI.COMM_WORLD
    path = shared_dir / "model.pt"
    model = normalized_mlp()
    digest = io.save_model(path, model, metadata=OPERANDS, comm=comm)
    assert comm.allgather(digest) == [digest] * comm.size
    assert_same_state(model, io.load_model(path))
    assert sorted(p.name for p in shared_dir.iterdir()) == ["model.pt"]
    if comm.size > 1:
        different = normalized_mlp()
        with torch.no_grad():
            different.model.layers[0].bias[0] += comm.rank
        with pytest.raises(io.ModelFileError, match="ranks hold different models"):
            io.save_model(path, different, comm=comm)
    bad = MLP(3, 1, [8, 8], seed=3) if comm.rank == comm.size - 1 else normalized_mlp()
    bad = bad if comm.rank != comm.size - 1 else torch.nn.Sequential(bad)
    last = comm.size - 1
    reason = None
    if comm.rank == last:
        with pytest.raises(io.ModelFileError) as info:
            io.architecture_config(bad)
        reason = str(info.value)
    reason = comm.bcast(reason, root=last)
    assert reason.startswith("No registered architecture")
    with pytest.raises(io.ModelFileError) as info:
        io.save_model(path, bad, comm=comm)
    if comm.size == 1:  # one process: its own error, unchanged
        assert str(info.value) == reason
    else:
        assert str(info.value) == (
            f"save_model failed on rank(s) [{last}] (1 of {comm.size} ranks); on rank {last}: "
            f"{reason.rstrip('. ')}."
        )
    assert io.read_model_file(path).sha256 == digest  # the good file is still there
    # Rank 0's failed write: its error, the same type and text on every rank.
    with pytest.raises(FileNotFoundError) as info:
        io.save_model(shared_dir / "missing" / "model.pt", model, comm=comm)
    text = str(info.value)
    assert text.startswith(f"[Errno 2] No such file or directory: '{shared_dir / 'missing'}/.")
    assert comm.allgather(text) == [text] * comm.size
    assert io.read_model_file(path).sha256 == digest  # the ranks are in step


@pytest.mark.mpi
def test_closure_from_file_equals_closure_from_model(shared_dir):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 5, 5)
    V = fem.functionspace(msh, ("Lagrange", 2))
    u = fem.Function(V)
    u.interpolate(lambda x: np.sin(x[0]) + x[1] ** 2)
    model = normalized_mlp()
    path = shared_dir / "closure.pt"
    io.save_model(path, model, metadata=OPERANDS, comm=MPI.COMM_WORLD)
    operands = [u, ufl.grad(u)]
    from_model = mno.Closure(model, operands, quadrature_degree=2, tangent=True)
    from_file = mno.Closure(path, operands, quadrature_degree=2, tangent=True)
    from_str = mno.Closure(str(path), operands, quadrature_degree=2)
    # A file without a spec (hand-written metadata, as every file before specs) loads
    # unchecked, with the default value shape and degree.
    assert io.read_model_file(path).spec is None
    from_defaults = mno.Closure(path, operands)
    assert from_defaults.value_shape == () and from_defaults.quadrature_degree == 2
    for closure in (from_model, from_file, from_str, from_defaults):
        closure.update()
    np.testing.assert_array_equal(from_defaults.x.array, from_model.x.array)
    assert from_model.x.array.size > 0
    assert np.abs(from_model.x.array).max() > 0.1
    np.testing.assert_array_equal(from_file.x.array, from_model.x.array)
    np.testing.assert_array_equal(from_str.x.array, from_model.x.array)
    np.testing.assert_array_equal(from_file.tangent.x.array, from_model.tangent.x.array)
    with pytest.raises(io.ModelFileError, match="truncated"):
        if MPI.COMM_WORLD.rank == 0:
            path.write_bytes(path.read_bytes()[:50])
        MPI.COMM_WORLD.Barrier()
        mno.Closure(path, operands, quadrature_degree=2)


# -- closure specs -------------------------------------------------------------------------


class PointwiseConv(torch.nn.Module):
    """A grid model: the same linear map of the channels at every grid point."""

    def __init__(self, in_channels=1, out_channels=1, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(out_channels, in_channels, generator=generator, dtype=torch.float64)
        self.weight = torch.nn.Parameter(weight)
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "seed": seed}

    def forward(self, x):
        return torch.einsum("oi,bi...->bo...", self.weight, x)


def exactly(message):
    return f"^{re.escape(message)}$"


@pytest.mark.mpi
def test_nonlocal_closure_from_a_file_keeps_the_trained_grid_spacing(shared_dir, registry):
    """The spec's grid extent is checked too: its shape alone let a mesh of another extent
    run the model on another spacing, silently (a trained d/dx was off by 100 %)."""
    io.register_architecture("pointwise_conv", PointwiseConv)
    comm = MPI.COMM_WORLD

    def closure_of(lower, upper, **options):
        msh = mesh.create_rectangle(comm, [lower, upper], [4, 4])
        u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)), name="u")
        u.interpolate(lambda x: 1 + x[0] * x[1])
        return NonlocalClosure(path, [u], **options)

    path = shared_dir / "grid.pt"
    spec = ClosureSpec(("u",), (1,), (), 1, grid=mno.Grid((0.0, 0.0), (1.0, 1.0), (5, 9)),
                       mask_channel=False)  # fmt: skip
    io.save_model(path, PointwiseConv(1, 1, seed=2), spec=spec, comm=comm)
    # Moved anywhere, the trained grid is fine; a box of the trained extent too.
    assert closure_of([2, -1], [3, 0]).grid == mno.Grid((2.0, -1.0), (3.0, 0.0), (5, 9))
    box = ((0.0, 0.0), (1.0, 1.0))
    closure = closure_of([0, 0], [0.5, 1], bounding_box=box)
    closure.update()
    assert closure.grid == spec.grid
    trained = (
        f"The model in {os.fspath(path)!r} was trained on a (5, 9) grid of spacing "
        "(0.25, 0.125) over the extent (1.0, 1.0); "
    )
    load_model = (
        " To run the model on another grid all the same, pass the model itself, "
        "dolfinx_mno.load_model(path), which is not checked against the file's spec."
    )
    cases = [
        (
            ([0, 0], [2, 1], {}),
            "on this mesh's bounding box [(0.0, 0.0), (2.0, 1.0)] it would run with spacing "
            "(0.5, 0.125) over the extent (2.0, 1.0), which it was not trained for. No grid "
            "of the trained extent contains this mesh: it is wider along axis 0.",
        ),
        (
            ([0, 0], [0.5, 1], {}),
            "on this mesh's bounding box [(0.0, 0.0), (0.5, 1.0)] it would run with spacing "
            "(0.125, 0.125) over the extent (0.5, 1.0), which it was not trained for. Pass "
            "bounding_box=((0.0, 0.0), (1.0, 1.0)), the trained grid's box, which contains the "
            "mesh.",
        ),
        (
            ([0, 0], [1, 1], {"bounding_box": ([0, 0], [4, 4])}),
            "on the bounding_box given [(0.0, 0.0), (4.0, 4.0)] it would run with spacing "
            "(1.0, 0.5) over the extent (4.0, 4.0), which it was not trained for. Pass "
            "bounding_box=((0.0, 0.0), (1.0, 1.0)), the trained grid's box, which contains the "
            "mesh.",
        ),
    ]
    for (lower, upper, options), message in cases:
        with pytest.raises(ValueError) as caught:
            closure_of(lower, upper, **options)
        assert str(caught.value) == trained + message + load_model
    # The model itself is not checked: it runs on the grid asked for.
    msh = mesh.create_rectangle(comm, [[0, 0], [2, 1]], [4, 4])
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)), name="u")
    unchecked = NonlocalClosure(io.load_model(path), [u], grid_shape=(5, 9), mask_channel=False)
    assert unchecked.grid == mno.Grid((0.0, 0.0), (2.0, 1.0), (5, 9))


@pytest.mark.mpi
def test_spec_round_trip_through_a_model_file(shared_dir):
    comm = MPI.COMM_WORLD
    local = ClosureSpec(("u", "grad(u)"), (1, 2), (), 3)
    grid = mno.Grid((0.0, -1.0), (1.0, 1.0), (6, 11))
    nonlocal_ = ClosureSpec(("u",), (1,), (2,), 1, grid=grid, mask_channel=False)
    for spec in (local, nonlocal_):
        path = shared_dir / "spec.pt"
        model = normalized_mlp()
        digest = io.save_model(path, model, spec=spec, metadata={"units": "m"}, comm=comm)
        contents = io.read_model_file(path)
        assert contents.spec == spec
        assert contents.sha256 == digest
        assert contents.metadata == {"units": "m", SPEC_KEY: spec.to_dict()}
        assert_same_state(model, contents.build())
    # The ranks must agree on the spec as on the weights.
    if comm.size > 1:
        spec = local if comm.rank == 0 else nonlocal_
        with pytest.raises(io.ModelFileError, match="ranks hold different models"):
            io.save_model(path, normalized_mlp(), spec=spec, comm=comm)


def test_save_model_refuses_a_spec_given_twice_or_malformed(tmp_path):
    path = tmp_path / "model.pt"
    spec = ClosureSpec(("u",), (1,), (), 2)
    message = "Give the closure spec once: as spec= or as metadata['closure_spec'], not both."
    with pytest.raises(io.ModelFileError, match=exactly(message)):
        io.save_model(path, MLP(1, 1), spec=spec, metadata={SPEC_KEY: spec.to_dict()})
    with pytest.raises(
        io.ModelFileError, match=exactly("spec must be a dolfinx_mno.ClosureSpec, got dict.")
    ):
        io.save_model(path, MLP(1, 1), spec=spec.to_dict())
    with pytest.raises(io.ModelFileError, match=r"^Malformed closure spec .*got 0\.$"):
        io.save_model(
            path, MLP(1, 1), metadata={SPEC_KEY: {**spec.to_dict(), "operand_widths": [0]}}
        )
    assert not path.exists()
    # A file whose spec was edited (and its digest recomputed) is refused when read.
    io.save_model(path, MLP(1, 1), spec=spec)
    payload = raw(path)
    metadata = json.loads(payload["metadata"])
    metadata[SPEC_KEY]["version"] = 7
    payload["metadata"] = json.dumps(metadata, sort_keys=True)
    rewrite(path, payload)
    expected = (
        f"{os.fspath(path)!r} holds a malformed closure spec: Closure spec version 7: this "
        "dolfinx_mno reads version 1."
    )
    with pytest.raises(io.ModelFileError, match=exactly(expected)):
        io.read_model_file(path)


@pytest.mark.mpi
def test_closure_takes_value_shape_and_degree_from_the_file(shared_dir):
    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, 4, 4)
    V = fem.functionspace(msh, ("Lagrange", 2))
    u = fem.Function(V, name="u")
    u.interpolate(lambda x: np.sin(2 * x[0]) + x[1] ** 2)
    model = MLP(3, 2, [8], activation="tanh", dtype="float64", seed=4)
    explicit = mno.Closure(model, [u, ufl.grad(u)], (2,), 3, tangent=True)
    path = shared_dir / "flux.pt"
    io.save_model(path, model, spec=explicit.spec, comm=comm)
    from_file = mno.Closure(path, [u, ufl.grad(u)], tangent=True)
    assert from_file.value_shape == (2,)
    assert from_file.quadrature_degree == 3
    assert from_file.spec == explicit.spec == ClosureSpec(("u", "grad(u)"), (1, 2), (2,), 3)
    # Operands built on another function, under the trained names, are accepted too.
    v = fem.Function(V, name="v")
    v.x.array[:] = u.x.array
    renamed = mno.Closure(path, mno.Operands([v, ufl.grad(v)], names=["u", "grad(u)"]))
    for closure in (explicit, from_file, renamed):
        closure.update()
    assert comm.allreduce(float(np.abs(explicit.x.array).max(initial=0.0)), op=MPI.MAX) > 0.1
    np.testing.assert_array_equal(from_file.x.array, explicit.x.array)
    np.testing.assert_array_equal(renamed.x.array, explicit.x.array)
    np.testing.assert_array_equal(from_file.tangent.x.array, explicit.tangent.x.array)


@pytest.mark.mpi
def test_mismatched_operands_are_refused_on_every_rank(tiny_square, shared_dir):
    """Every rank raises the same error before any collective, a rank without cells too."""
    comm = tiny_square.comm
    V = fem.functionspace(tiny_square, ("Lagrange", 1))
    u = fem.Function(V, name="u")
    u.interpolate(lambda x: 1 + x[0] - x[1])
    v = fem.Function(V, name="v")
    path = shared_dir / "closure.pt"
    model = MLP(3, 1, [4], dtype="float64", seed=0)
    io.save_model(path, model, spec=ClosureSpec(("u", "grad(u)"), (1, 2), (), 2), comm=comm)
    source = repr(os.fspath(path))
    fix = (
        "Pass the operands it was trained on, in that order and under those names "
        "(e.g. dolfinx_mno.Operands({'u': ..., 'grad(u)': ...}))."
    )
    trained = "['u' (1 component), 'grad(u)' (2 components)]"
    cases = [
        (
            [v, ufl.grad(v)],
            {},
            f"The model in {source} was trained with the operands {trained}, not ['v' (1 "
            f"component), 'grad(v)' (2 components)]. {fix}",
        ),
        (
            {"u": u},
            {},
            f"The model in {source} was trained with the operands {trained}, not ['u' (1 "
            f"component)]. {fix}",
        ),
        (
            [u, ufl.grad(u)],
            {"value_shape": (1,), "quadrature_degree": 1},
            f"The model in {source} was trained with value_shape=(), not (1,); "
            "quadrature_degree=2, not 1. Leave out value_shape, quadrature_degree to take "
            "them from the file.",
        ),
    ]
    for operands, kwargs, message in cases:
        with pytest.raises(ValueError, match=exactly(message)):
            mno.Closure(path, operands, **kwargs)
    message = (
        f"The model in {source} is a local (pointwise) model: build a dolfinx_mno.Closure "
        "from it, not a NonlocalClosure."
    )
    with pytest.raises(ValueError, match=exactly(message)):
        NonlocalClosure(path, [u, ufl.grad(u)])
    # The ranks are still in step: a matching closure builds and updates (collective).
    closure = mno.Closure(path, [u, ufl.grad(u)], quadrature_degree=2)
    closure.update()
    reference = mno.Closure(model, [u, ufl.grad(u)])
    reference.update()
    np.testing.assert_array_equal(closure.x.array, reference.x.array)
    assert comm.allreduce(closure.x.array.size) > 0


@pytest.mark.mpi
def test_nonlocal_closure_takes_grid_and_mask_from_the_file(shared_dir, registry):
    io.register_architecture("pointwise_conv", PointwiseConv)
    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, 6, 6)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)), name="u")
    u.interpolate(lambda x: 1 + x[0] * x[1])
    model = PointwiseConv(2, 1, seed=2)
    explicit = NonlocalClosure(model, [u, u**2], (), 1, grid_shape=(7, 9), mask_channel=False)
    path = shared_dir / "grid.pt"
    io.save_model(path, model, spec=explicit.spec, comm=comm)
    assert io.read_model_file(path).spec == ClosureSpec(
        ("u", "u ** 2"), (1, 1), (), 1, grid=explicit.grid, mask_channel=False
    )
    from_file = NonlocalClosure(path, [u, u**2])
    assert from_file.grid.shape == (7, 9)
    assert from_file.mask_channel is False
    assert from_file.quadrature_degree == 1
    assert from_file.spec == explicit.spec
    explicit.update()
    from_file.update()
    assert comm.allreduce(float(np.abs(explicit.x.array).max(initial=0.0)), op=MPI.MAX) > 0.1
    np.testing.assert_array_equal(from_file.x.array, explicit.x.array)
    source = repr(os.fspath(path))
    message = (
        f"The model in {source} was trained with grid_shape=(7, 9), not (9, 9); "
        "mask_channel=False, not True. Leave out grid_shape, mask_channel to take them from "
        "the file."
    )
    with pytest.raises(ValueError, match=exactly(message)):
        NonlocalClosure(path, [u, u**2], grid_shape=(9, 9), mask_channel=True)
    message = (
        f"The model in {source} is a non-local (grid) model, trained on a (7, 9) grid: build "
        "a dolfinx_mno.NonlocalClosure from it, not a Closure."
    )
    with pytest.raises(ValueError, match=exactly(message)):
        mno.Closure(path, [u, u**2])

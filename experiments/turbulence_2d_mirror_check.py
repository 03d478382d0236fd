"""2D turbulence: does an MNO fitted without the mirror treat mirrored samples as new flows?

``turbulence_2d_in_sample.py --mirror`` adds the mirror image ``y → L − y`` of every
training sample (:func:`turbulence_2d_data.mirror`). This script reads what an earlier
``--train-seeds 18`` run left (its MNO, fitted without mirrors, and the cached gridded data
of the seeds) and measures, on points inside the box:

* the fraction of ``τ``'s variance the MNO explains on its training samples and on their
  mirror images;
* the same on the mirror images with each of the 32 choices of channel signs of the
  inputs ``(ω̄, ū_x, ū_y)`` and targets ``(τ_x, τ_y)``: if the MNO had learnt the flow, the
  physical signs (:data:`turbulence_2d_data.MIRROR_SIGNS`) would explain the most;
* how many of each cell's four grid points share their ``τ`` value, in the data and
  mirrored: the mesh's diagonals at the cell scale.

    mpirun -n 2 python experiments/turbulence_2d_in_sample.py --no-in-sample --degraded \\
        --fno-modes 32 --fno-width 32 --hold --train-seeds 18
    python experiments/turbulence_2d_mirror_check.py          # serial, a minute

Prints the tables; writes nothing.
"""

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

import dolfinx_mno as mno

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY / "demos"), str(REPOSITORY / "demos" / "turbulence_2d")]
from flow import length
from turbulence_2d_data import MIRROR_SIGNS, closure_grid, mirror

OUTPUT = REPOSITORY / "experiments" / "output" / "turbulence_2d_in_sample"

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument(
    "--model", type=Path, default=OUTPUT / "mno32w32_18seeds.pt", help="the MNO to check"
)
parser.add_argument(
    "--seeds", type=int, nargs="+", default=[11, 13, 15, 17, 19], help="cached seeds to read"
)
args = parser.parse_args()
torch.set_num_threads(1)
caches = [OUTPUT / f"dns_seed{seed}_rank0of2.npz" for seed in args.seeds]
if missing := [str(path) for path in [args.model, *caches] if not path.is_file()]:
    parser.error(f"no {', '.join(missing)}: run the --train-seeds 18 experiment first (2 ranks)")
model = mno.load_model(args.model)
model.eval()
grid = closure_grid(16)
points = grid.points()
inside = np.all((points[:, :2] > 0) & (points[:, :2] < length), axis=1).reshape(grid.shape)
inputs, targets = [], []
for path in caches:
    with np.load(path) as cached:
        inputs += list(cached["x"])
        targets += list(cached["y"])


def predict(fields: list[np.ndarray]) -> np.ndarray:
    x = torch.tensor(np.asarray(fields), dtype=torch.float32)
    with torch.no_grad():
        return np.concatenate([model(x[i : i + 16]).numpy() for i in range(0, len(x), 16)])


def explained(prediction: np.ndarray, fields: list[np.ndarray]) -> float:
    """Fraction of the targets' variance explained, over the points inside the box."""
    y = np.asarray(fields)
    mask = np.broadcast_to(inside, y[:, 0].shape)
    error = sum(((prediction[:, c] - y[:, c])[mask] ** 2).sum() for c in range(2))
    variance = sum(((y[:, c][mask] - y[:, c][mask].mean()) ** 2).sum() for c in range(2))
    return float(1.0 - error / variance)


print(f"{args.model.name} on seeds {args.seeds} ({len(inputs)} samples)")
print(f"  τ explained, the samples:          {explained(predict(inputs), targets):.3f}")
scores = []
for input_signs in itertools.product((1.0, -1.0), repeat=3):
    prediction = predict(mirror(inputs, input_signs))
    for target_signs in itertools.product((1.0, -1.0), repeat=2):
        score = explained(prediction, mirror(targets, target_signs))
        scores.append((score, input_signs, target_signs))
physical = next(s for s, i, t in scores if (i, t) == MIRROR_SIGNS)
print(f"  τ explained, their mirror images:  {physical:.3f} (signs {MIRROR_SIGNS})")
print("  the best sign choices on the mirror images:")
for score, input_signs, target_signs in sorted(scores, reverse=True)[:4]:
    print(f"    {score:6.3f}  inputs {input_signs}  targets {target_signs}")

# Each coarse cell holds 2 × 2 grid points ((¼, ¼), (¼, ¾), (¾, ¼), (¾, ¾) of the cell).
box = slice(16, 48)  # the box's 32 × 32 points of the 64² grid


def equal_pairs(fields: list[np.ndarray]) -> dict[str, float]:
    cells = np.asarray(fields)[:, :, box, box].reshape(len(fields), 2, 16, 2, 16, 2)
    corners = {"¼¼": (0, 0), "¼¾": (0, 1), "¾¼": (1, 0), "¾¾": (1, 1)}
    return {
        f"{a}={b}": float(np.mean(np.isclose(cells[:, :, :, corners[a][0], :, corners[a][1]],
                                             cells[:, :, :, corners[b][0], :, corners[b][1]],
                                             rtol=1e-10, atol=0.0)))
        for a, b in itertools.combinations(corners, 2)
    }  # fmt: skip


print("fraction of cells whose τ agrees (to 1e-10) at two of their grid points (x, y in a cell):")
for label, fields in {"the samples": targets, "mirrored": mirror(targets, MIRROR_SIGNS[1])}.items():
    print(f"  {label:12} { {k: round(v, 3) for k, v in equal_pairs(fields).items()} }")

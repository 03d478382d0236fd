"""``mpirun -n N python rendezvous_job.py``: torch.distributed's rendezvous on a port in use.

Started by ``tests/test_distributed_operator.py`` (torch's default process group is
per process, so the check needs fresh ones). ``MASTER_PORT`` names a port that rank 0
itself holds open, as another job's server would: every rank must raise the same error
(before, rank 0 raised EADDRINUSE and the others waited in the rendezvous forever).
"""

import os
import socket

from mpi4py import MPI

import dolfinx_mno  # noqa: F401  (finds MPI for DOLFINx and torch's gloo alike)
from dolfinx_mno.distributed_fft import process_group

comm = MPI.COMM_WORLD
busy = None
if comm.rank == 0:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
port = comm.bcast(busy.getsockname()[1] if busy is not None else None)
os.environ["MASTER_PORT"] = str(port)
try:
    process_group(comm, "gloo")
    print(f"rank {comm.rank}: joined", flush=True)
except RuntimeError as error:
    print(f"rank {comm.rank}: {error}", flush=True)

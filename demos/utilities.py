"""Small helpers shared by the demos (as dolfinx-external-operator's ``demo/utilities.py``).

Only what several demos would otherwise copy lives here: global norms, boundary dofs,
timing across ranks, rank-0 printing and the output folder. Anything a user would reuse in
their own simulation belongs in the package instead.
"""

from __future__ import annotations

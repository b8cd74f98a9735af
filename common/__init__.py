"""HT-2 (hierarchical Tucker-2) compression of CNNs.

Subpackages, lowest layer first: :mod:`common.decompose` (HT-2 / Tucker-2 factors, factorized layers,
model surgery, cost counting), :mod:`common.data` (datasets in memory or streamed, batch loaders),
:mod:`common.train` (evaluation, exact BN recalibration, finetuning), :mod:`common.search` (rank
spaces, rules, the sensitivity-guided policy, TPE, the proxy, the searcher), :mod:`common.deploy`
(fastest exact deployment, latency, ONNX export, artifacts), :mod:`common.run` (config, the resumable
experiment pipeline, run logs, preflight checks) and :mod:`common.analysis` (run documents to tables
and plots). Top-level modules hold what every layer uses (paths, devices, processes, files, progress)
and what users call directly (models, the notebook helpers).
"""

import os

# Spinning OpenMP workers make small LAPACK calls and convs 30-1000x slower whenever the cores are shared
# (a notebook kernel beside another job): let waiting threads sleep. OpenMP reads this once, when torch
# loads it, so it is set here, before any module of the package imports torch; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

r"""Hyper-parameter sweeps: each member of a config's ``get_sweep()`` trained by its own launch.py.

  python launch.py --config configs/x.py --workdir runs/sweep --sweep [--sweep_workers 2]

A config file declares its sweep beside ``get_config(arg)``. ``get_sweep(arg)`` returns one of:
  - a grid, ``{"optim.lr": [1e-3, 3e-3], "optim.weight_decay": [1e-4, 1e-2]}``: the product of
    the lists, the last key varying fastest. A value that is not a list is the same in every
    member.
  - a seeded random search, ``{"method": "random", "count": 6, "seed": 0, "space": {...}}``. The
    space maps each key to ``("loguniform", lo, hi)``, ``("uniform", lo, hi)``,
    ``("randint", lo, hi)`` (both ends included), ``("choice", [values])`` (a bare list means the
    same), or a fixed value. Sampled floats are rounded to 3 significant digits, which keeps names
    and flags short. Members are drawn in order from one seeded stream, so raising ``count``
    keeps the earlier members as they were.
  - a list of override dicts, big_vision's way of writing sweeps, taken as it is.
  - an Optuna search that learns (TPE) and prunes, ``{"search": {"space": ..., "n_trials": 8,
    "sampler": "tpe", "pruner": "median", ...}}``, whose study several commands on several
    machines share (medjax/sweep/search.py).
Keys are dotted config paths. Member ``i`` runs in ``<workdir>/<name>``, where the name is the
index followed by the member's overrides, e.g. ``m00_lr=0.001_wd=0.0001``. Multi-word keys are
shortened to their initials, and a key falls back to its full dotted path where two would clash.
``sweep.json`` maps each name to its exact overrides. A member runs as ``launch.py --config
<the same file> --config.<key>=<value> ...``, so its ``config.json`` records exactly what ran.
Every member is parsed before anything starts: an unknown key or a value of the wrong type stops
the sweep, with a message that names it.

Members finish in any order, at most ``--sweep_workers`` at a time. On CPU the default is 1
worker. Each worker is pinned to ``cores // workers`` cores, so the workers do not oversubscribe
the machine. Its member gets one XLA host device, whose oneDNN convolutions use those cores; where
oneDNN is unavailable, as many host devices as cores (``XLA_FLAGS``), or fewer where that count
does not divide the member's batch sizes. With CUDA GPUs (found by asking JAX in a
throwaway process) the default is one worker per GPU, and each worker gets ``gpus // workers``
of them through ``CUDA_VISIBLE_DEVICES``.

A member is finished when its run is (`medjax.train.runs.is_finished`: the training loop's
``summary.json``, and for segmentation launch.py's sliding-window validation's
``validation/summary.json``, each written last) and the config in its ``config.json`` is the
member's. Re-running the sweep command skips
finished members and restarts the others, and launch.py resumes those from their last
checkpoint. SIGINT or SIGTERM stops the running members. If the sweep process itself is killed,
its members get SIGTERM from the kernel (Linux ``PR_SET_PDEATHSIG``). Each member's output goes
to ``logs/<name>.log``, and ``attempts.jsonl`` records each attempt's wall time and exit status.
After each member ends, ``leaderboard.csv`` and ``leaderboard.md`` are rewritten. They rank the
members by ``eval.best_metric`` of their best checkpoint (higher is better) and mark the best.

With ``--sweep_backend=slurm`` the members run as one SLURM job array instead, and
``--sweep_status`` prints each member's state (`medjax.sweep.slurm`, docs/cluster.md).

Exit status: 0 when every member has finished; 1 when a member failed (the other members still
ran); 2 for a bad sweep, before anything runs; 128 + the signal number when stopped.
"""

from medjax.sweep import search, slurm, spec  # noqa: F401
from medjax.sweep.leaderboard import Leaderboard  # noqa: F401
from medjax.sweep.running import run  # noqa: F401
from medjax.sweep.spec import (  # noqa: F401
    Member,
    Overrides,
    SweepError,
    check_members,
    expand,
    load_spec,
    member_names,
    override_flags,
    parse_config,
)
from medjax.sweep.workers import Worker, make_workers, visible_gpus  # noqa: F401

"""Ray as an optional engine: one map over tasks (sequential or Ray) and sharded calibration.

Ray (PyPI ``ray``, the ``ray`` extra) is imported only when a run asks for it (``--ray``, API
``cluster=``); the one-machine path never imports it. ``cluster`` is ``None`` (no Ray), ``"local"``
(start Ray on this machine: 2 CPUs, no dashboard, no log forwarding; ``_node_ip_address`` asks for
127.0.0.1, but Ray 2.60 still advertises the machine's address and its GCS server listens on every
interface, which ``ray.init`` has no option to change: firewall its ports on a reachable machine) or the address of a running
cluster (``ray://head:10001``, ``head:6379`` or ``auto``), as ``ray.init(address=...)`` takes it.

:func:`task_map` is the only place that knows about Ray: callers pass a top-level function and a
list of argument tuples and get the results in order, computed in this process (``cluster=None``)
or as Ray tasks with ``max_retries`` (a worker killed mid-task is restarted and the task re-run;
the functions are deterministic, so a retried task returns the same bytes).

:func:`sharded_statistics` cuts the calibration set at EMA batch boundaries
(:func:`calibration.partial.shard_bounds`); each task reads the model and its samples from paths
(never the data pickled into the task), runs :func:`calibration.collect.collect_partial` and returns
its :class:`calibration.partial.Partial`; the driver folds them in sample order, so the statistics
are byte-identical to :func:`calibration.collect.collect_statistics` on the same samples.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import onnx

from calibration.collect import DEFAULT_HIST_ELEMENTS, collect_partial, warn_degenerate
from calibration.dataset import CalibrationSet, spill_to_folder
from calibration.histogram import DEFAULT_BINS
from calibration.observers import DEFAULT_EMA_BATCH, DEFAULT_EMA_MOMENTUM, Statistics
from calibration.partial import Fold, Partial, shard_bounds
from deployer.errors import BackendUnavailableError, BadInputError, DeployerError

ENV_ADDRESS = "RAY_ADDRESS"
ENV_SHARED = "DEPLOYER_RAY_SHARED"
INSTALL = "pip install -c constraints.txt '.[ray]' (or bash scripts/install.sh)"
LOCAL_CPUS = 2
MAX_RETRIES = 3
R = TypeVar("R")


@dataclass(frozen=True)
class ClusterInfo:
    """A connected Ray cluster: its address and the CPUs (task slots) it offers."""

    address: str
    workers: int


def resolve(ray: bool, address: str | None) -> str | None:
    """The ``cluster`` of a command line: None without ``--ray`` and ``--ray-address``; else the
    address given, ``$RAY_ADDRESS``, or ``"local"``."""
    if not ray and not address:
        return None
    return address or os.environ.get(ENV_ADDRESS) or "local"


def add_ray_flags(p: Any) -> None:
    """``--ray`` and ``--ray-address`` on an ``argparse`` parser (deploy, deploy plan, deploy batch)."""
    p.add_argument("--ray", action="store_true",
                   help=f"run calibration shards, sensitivity passes and AdaRound layers (batch: every entry) as Ray "
                        f"tasks; a local Ray unless --ray-address or ${ENV_ADDRESS} names a cluster (needs the ray extra)")
    p.add_argument("--ray-address", metavar="ADDR", default=None,
                   help=f"address of a running Ray cluster (ray://head:10001, head:6379, auto); implies --ray")


def ray_cluster(args: Any) -> str | None:
    """The ``cluster`` of parsed ``--ray`` / ``--ray-address`` (:func:`resolve`)."""
    return resolve(bool(getattr(args, "ray", False)), getattr(args, "ray_address", None))


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BackendUnavailableError(f"--ray needs the ray package, which is not installed; install it with {INSTALL}"
                                      ) from None
    return ray


def connect(cluster: str, announce: str = "") -> ClusterInfo:
    """Start or join Ray (once per process) and return what it offers.

    Args:
        cluster: ``"local"`` or an address (see the module docstring).
        announce: when given, ``ray: <address>, <N> workers, <announce>`` is printed on stderr.

    Raises:
        BackendUnavailableError: ray is not installed (exit 3, with the install command).
        BadInputError: the address cannot be reached.
    """
    ray = _ray()
    if not ray.is_initialized():
        # workers are started from this process's environment; PYTHONPATH makes them import the same
        # deployer/, backends/ and calibration/ as the driver
        env = {k: os.environ[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS") if k in os.environ}
        try:
            if cluster == "local":
                ray.init(num_cpus=LOCAL_CPUS, include_dashboard=False, _node_ip_address="127.0.0.1",
                         log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": env})
            else:
                ray.init(address=cluster, log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": env})
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise BadInputError(f"cannot connect to the Ray cluster at {cluster!r} ({' '.join(str(e).split())[:200]}); "
                                f"check --ray-address / {ENV_ADDRESS}, or drop them to start a local Ray") from None
    ctx = ray.get_runtime_context()
    address = str(getattr(ctx, "gcs_address", "") or cluster)
    info = ClusterInfo(address, max(1, int(ray.cluster_resources().get("CPU", 1))))
    if announce:
        print(f"ray: {info.address}, {info.workers} workers, {announce}", file=sys.stderr)
    return info


def shutdown() -> None:
    """Stop this process's Ray connection (and a local Ray it started); a no-op without Ray."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def task_map(fn: Callable[..., R], args: Sequence[tuple[Any, ...]], cluster: str | None = None,
             num_cpus: float = 1, max_retries: int = MAX_RETRIES, shared: tuple[Any, ...] = (),
             progress: Callable[[int, int], None] | None = None, return_exceptions: bool = False) -> list[Any]:
    """``[fn(*shared, *a) for a in args]``, in this process or as Ray tasks; results in the order of ``args``.

    Args:
        fn: a top-level (importable) function; deterministic for a retry to be harmless.
        args: one tuple of positional arguments per task (paths and small values: they are pickled).
        shared: leading arguments common to every task (a model, a few samples): on Ray each is put
            in the object store once and read by the tasks from there, not pickled per task.
        progress: called with (tasks done, tasks) as tasks finish.
        return_exceptions: a failed task's exception is returned in its place (the other tasks'
            results are kept) instead of raised; on Ray, after its retries.
        cluster: None runs sequentially here; otherwise see :func:`connect`.
        num_cpus: CPUs Ray reserves per task.
        max_retries: times Ray re-runs a task whose worker died (a crash, the OOM killer).

    Raises:
        DeployerError: the first failing task's error, as the task raised it (a Ray task's
            :class:`DeployerError` is unwrapped so its exit code and one-line message survive).
    """
    if cluster is None:
        out: list[Any] = []
        for a in args:
            try:
                out.append(fn(*shared, *a))
            except Exception as e:
                if not return_exceptions:
                    raise
                out.append(e)
            if progress:
                progress(len(out), len(args))
        return out
    ray = _ray()
    connect(cluster)
    remote = ray.remote(fn).options(num_cpus=num_cpus, max_retries=max_retries)
    put = [ray.put(x) for x in shared]
    refs = [remote.remote(*put, *a) for a in args]
    try:
        pending = list(refs)
        while pending:
            _ready, pending = ray.wait(pending, num_returns=1)
            if progress:
                progress(len(refs) - len(pending), len(refs))
        if not return_exceptions:
            return list(ray.get(refs))
        res: list[Any] = []
        for r in refs:
            try:
                res.append(ray.get(r))
            except ray.exceptions.RayError as e:
                res.append(getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), Exception) else e)
        return res
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, DeployerError):
            raise cause from None
        raise


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (``getrusage``; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def calibrate_shard(model_path: str, shard: CalibrationSet, start: int, skip: list[str] | None, ema_batch: int,
                    bins: int, hist_elements: int, threads: int) -> Partial:
    """One calibration task: read the model from ``model_path``, stream ``shard`` (a lazy set reading
    its own files) and return its partial statistics with this process's peak RSS."""
    model = onnx.load(model_path)
    part = collect_partial(model, shard, set(skip) if skip else None, ema_batch, None, threads, bins, hist_elements,
                           first_index=start)
    part.peak_rss_mb = peak_rss_mb()
    return part


def shareable(calibration: CalibrationSet, scratch: Path) -> CalibrationSet:
    """``calibration`` as a set whose pickle holds file paths only: a folder set as it is; any other
    set is written once, one ``.npz`` per sample, under ``scratch`` (a folder every worker sees)."""
    if calibration.reads_files:
        return calibration
    return spill_to_folder(calibration, scratch / "calibration")


def scratch_dir() -> Path:
    """``$DEPLOYER_RAY_SHARED`` (a folder every node of the cluster mounts) or a new temporary folder
    (enough for a local Ray; a multi-node cluster needs the shared one)."""
    env = os.environ.get(ENV_SHARED)
    base = Path(env) if env else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="deployer-ray-", dir=base))


def sharded_statistics(model: onnx.ModelProto, samples: CalibrationSet, cluster: str | None,
                       shards: int | None = None, skip: set[str] | None = None,
                       ema_momentum: float = DEFAULT_EMA_MOMENTUM, ema_batch: int = DEFAULT_EMA_BATCH,
                       progress: Callable[[int, int], None] | None = None, bins: int = DEFAULT_BINS,
                       hist_elements: int = DEFAULT_HIST_ELEMENTS, threads: int = 1,
                       partials: list[Partial] | None = None) -> Statistics:
    """Calibration statistics computed in ``shards`` Ray tasks (default: one per worker CPU), equal
    byte for byte to :func:`calibration.collect.collect_statistics` on the same samples.

    Args:
        model: the FP32 reference (written once to the scratch folder; tasks read it by path).
        samples: the calibration set (folder sets are read by path; others spilled once to ``.npz``).
        cluster: see :func:`connect`; None runs the shards one after another in this process.
        partials: if given, the shards' :class:`Partial` s are appended (the benchmark reads their
            peak RSS).
        Others: as :func:`calibration.collect.collect_statistics` (``threads``: ONNX Runtime threads
            per task).

    Raises:
        As :func:`calibration.collect.collect_statistics`, and :func:`connect`.
    """
    workers = connect(cluster).workers if cluster is not None else 1
    bounds = shard_bounds(len(samples), shards or workers, ema_batch)
    if cluster is not None:
        connect(cluster, announce=f"{len(bounds)} shards")
    scratch = scratch_dir()
    try:
        model_path = scratch / "reference.onnx"
        onnx.save(model, str(model_path))
        data = shareable(samples, scratch)
        args = [(str(model_path), data[a:b], a, sorted(skip) if skip else None, ema_batch, bins, hist_elements,
                 threads) for a, b in bounds]
        parts = task_map(calibrate_shard, args, cluster)
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    fold = Fold(ema_momentum, ema_batch)
    done = 0
    for p in parts:
        fold.add_partial(p)
        done += p.samples
        if progress:
            progress(done, len(samples))
    if partials is not None:
        partials.extend(parts)
    stats = fold.result()
    warn_degenerate(stats, parts[0].input_names if parts else [])
    return stats


def collector(cluster: str | None) -> Callable[..., Statistics] | None:
    """The statistics collector for :func:`calibration.cache.cached_statistics`: None (one process)
    without a cluster, else :func:`sharded_statistics` on it."""
    if cluster is None:
        return None
    import functools

    return functools.partial(sharded_statistics, cluster=cluster)


def _score(evaluate: Callable[[Any], tuple[float, float]], plan: Any) -> tuple[float, float]:
    return evaluate(plan)


def score_plans(evaluate: Any, plans: Sequence[Any], cluster: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[tuple[float, float]]:
    """``[evaluate(p) for p in plans]`` (a :class:`deployer.mixed.PlanScorer`) through :func:`task_map`:
    on ``cluster`` the scorer (its model and samples, its FP32 reference computed first) is shipped
    once; its ``evaluations`` count grows by ``len(plans)`` either way."""
    if cluster is not None and hasattr(evaluate, "reference"):
        evaluate.reference()  # computed here once, not in every task
    before = evaluate.evaluations
    out = task_map(_score, [(p,) for p in plans], cluster, shared=(evaluate,), progress=progress)
    evaluate.evaluations = before + len(plans)  # the tasks' copies counted on Ray, this one here
    return out

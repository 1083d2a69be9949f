"""Launch compressed training on a Ray cluster: ``gradcomp-launch``.

Starts an embedded local Ray (the default) or connects to an existing cluster (``--address``),
runs :func:`gradcomp.app.train.train` in ``--workers`` Ray Train workers (``TorchTrainer``: gloo on
CPU, NCCL on GPU; the hook is registered inside the train function, and not at all with one
worker) or, with ``--transport horovod``, in Horovod workers (``horovod.ray.RayExecutor``);
``--strategy fsdp`` (an alias of ``--transport``) shards the model with FSDP2 in the Ray Train
workers and compresses its reduce-scatter (:mod:`gradcomp.comm.fsdp`). It prints a results table
and writes ``OUTPUT/results.json``.

Fault tolerance: checkpoints every ``--checkpoint-every`` steps and at each epoch end (model,
optimizer and every rank's compression state) go through Ray Train checkpoints;
``--max-failures`` restarts the worker group from the last one, and the results record the
restart (``restarts``, ``resumed_from_step``).

Arguments are checked before Ray starts: the launcher builds the same :class:`TrainConfig`, codec,
data set and model the workers would, checks that ``--output`` can be written and that one batch
per worker fits, and parses ``--address``; anything wrong exits 2 with one line of usage error.
An ``--address`` where nothing answers fails within ``--startup-timeout`` (a socket probe of the
GCS port first, then a bound on ``ray.init``), and a worker group the cluster cannot place fails
after ``(1 + --max-failures) x --startup-timeout`` (Ray Train would otherwise retry forever);
both exit 1 with what to check. ``--placement STRICT_SPREAD`` with more than one worker is
refused up front on the embedded (single-node) Ray.

Security: an embedded Ray runs with node IP 127.0.0.1, so everything it listens on (GCS, raylet,
workers' gRPC servers, dashboard agent, metrics endpoints, runtime-env agent) binds loopback only;
the dashboard binds 127.0.0.1 unless ``--dashboard-host`` says otherwise (``--no-dashboard`` turns it
off); torch's rendezvous store listens on 127.0.0.1 and gloo uses the loopback interface. With
``--address`` the cluster's own settings apply. Ray's token authentication settings from the
environment (``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``...) are passed through untouched; checkpoints
load with ``weights_only=True``; the embedded Ray's processes and its temporary directory are
removed at exit.

Interrupts: Ctrl-C (SIGINT) at any point exits 130 with a message after shutting Ray down; the
embedded Ray's processes start with SIGINT blocked, so a terminal's Ctrl-C reaches only the
launcher, which stops them in order (none is left behind and nothing recreates the temporary
directory). A later ``--resume`` continues from ``OUTPUT/checkpoints/latest`` under a fresh Ray run
name (the interrupted run's Ray record can name checkpoints it never finished writing). After SIGKILL of
the launcher (measured, Ray 2.60): within about 5 s the GCS, raylet, workers and most agents
exit on their own, but the dashboard agent and the runtime-env agent were still running 15 s
later, and the temporary directory (``$TMPDIR/gcray-PID-*``) stays; the next launch stops the
processes that name a dead launcher's directory and removes it.

The launcher's parts: :mod:`gradcomp.app.launch_cli` (flags, their checks, the preflight),
:mod:`gradcomp.app.cluster` (``--address``: parsing and probing), :mod:`gradcomp.app.ray_worker`
(what runs in each worker); this module is the driver (start or connect Ray, route its output,
run the job, clean up, the results table, :func:`main`).

Example:
    gradcomp-launch --workers 2 --codec prune-fp --act-bits 2 --dataset mnist1d --epochs 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from gradcomp.app.cluster import ClusterUnreachable, parse_address, probe_address
from gradcomp.app.launch_cli import UsageError, build_parser, config_from_args, preflight, previous_run_artifacts
from gradcomp.app.ray_worker import PROGRESS_MARK, RESULT_KEY, horovod_worker, train_worker

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
TEMP_PREFIX = "gcray-"  # embedded Ray's temp root: $TMPDIR/gcray-<launcher pid>-<random> (short: socket paths)
RAY_LOG = "ray.log"  # in --output: everything Ray's processes and Ray's driver-side loggers print


class TrainingFailed(RuntimeError):
    """The workers failed (after ``--max-failures`` restarts); the message holds their errors."""


class _sigint_blocked:
    """Block SIGINT in this thread, and in every process and thread started meanwhile.

    The signal mask is inherited through fork and exec: the embedded Ray's GCS, raylet and
    agents (and the workers the raylet starts) never see a terminal's Ctrl-C, which goes to the
    whole foreground process group. Only the launcher gets it, and stops them in order. A
    Ctrl-C while blocked is delivered when the block ends (``ray.init`` returned: Ray's node is
    registered, so ``ray.shutdown`` stops all of it).
    """

    def __enter__(self):
        self.old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        return self

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self.old)
        return False


class _set_env:
    """Set environment variables for a ``with`` block (children started meanwhile keep them)."""

    def __init__(self, **env: str):
        self.env = env

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return False


def _loopback_interface() -> str | None:
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:  # pragma: no cover
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _embedded_env() -> dict:
    """What the embedded Ray's processes (and so the workers) get: gloo and NCCL on loopback."""
    lo = _loopback_interface()
    if lo is None:
        return {}
    return {k: lo for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k not in os.environ}


class _node_ip_loopback:
    """Make ``ray.init(_node_ip_address="127.0.0.1")`` mean it.

    On Linux Ray replaces a loopback node IP with the machine's address (it assumes a node
    will be joined by others); only where clusters are off (its macOS/Windows default,
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) does it keep 127.0.0.1, and with that node IP
    every Ray server binds loopback. The embedded Ray is one node that nothing joins: turn
    clusters off for this ``ray.init`` (Ray reads the flag at call time; its processes get the
    variable).
    """

    def __enter__(self):
        import ray._private.ray_constants as rc

        self.rc, self.old = rc, getattr(rc, "ENABLE_RAY_CLUSTER", None)
        rc.ENABLE_RAY_CLUSTER = False
        self.env = _set_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        self.env.__enter__()
        return self

    def __exit__(self, *exc):
        self.env.__exit__(*exc)
        if self.old is not None:
            setattr(self.rc, "ENABLE_RAY_CLUSTER", self.old)  # noqa: B010 (a private constant of Ray's)
        return False


class _RayOutput:
    """Route what Ray prints during a run: the workers' progress-bar lines
    (:class:`gradcomp.app.ray_worker._ProgressRelay`) to ``terminal`` as one redrawn bar;
    everything else -- the stdout/stderr of every Ray worker and actor (Ray Train's "Reporting
    training result ... TrainingReport(...)", the controller's messages, tracebacks) and the
    driver's own ``ray`` loggers -- to ``log_path`` (appended).

    Worker output reaches the driver through ``ray.init(log_to_driver=True)``, whose handler
    prints every line with a ``(pid=...)`` prefix; :meth:`attach` (after ``ray.init``) replaces
    that handler with :meth:`handle`. Ray offers no public hook for this: if its private
    dispatcher is missing, worker output stays on the terminal (nothing is lost).
    """

    def __init__(self, log_path: Path, terminal=None):
        self.log_path = log_path
        self.terminal = terminal if terminal is not None else sys.stderr
        self._lock = threading.Lock()
        self._bar_open = False
        self._file: TextIO | None = None
        self._saved: tuple | None = None
        self._dispatcher: Any = None
        self._autoscaler_events: Any = None

    def __enter__(self) -> _RayOutput:
        import logging

        import ray  # noqa: F401  (importing ray configures the "ray" logger: replace its handlers after)

        self._file = open(self.log_path, "a", buffering=1, encoding="utf-8", errors="replace")
        handler = logging.StreamHandler(self._file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ray_logger = logging.getLogger("ray")
        self._saved = (ray_logger, list(ray_logger.handlers), ray_logger.propagate, handler)
        for h in list(ray_logger.handlers):
            ray_logger.removeHandler(h)
        ray_logger.addHandler(handler)
        ray_logger.propagate = False
        return self

    def attach(self) -> bool:
        """Take over the printing of worker output from ``ray.init``'s handler; whether it could."""
        try:
            from ray._private import worker as ray_worker

            dispatcher = ray_worker.global_worker_stdstream_dispatcher
            self._autoscaler_events = getattr(ray_worker, "filter_autoscaler_events", None)
            dispatcher.remove_handler("ray_print_logs")
            dispatcher.add_handler("gradcomp_ray_output", self.handle)
        except (ImportError, AttributeError):  # pragma: no cover - Ray moved it
            return False
        self._dispatcher = dispatcher
        # ray.init configures Ray's logger again (handlers on "ray"): keep only ours
        self._keep_only_our_handler()
        return True

    def _keep_only_our_handler(self) -> None:
        if self._saved is None:
            return
        ray_logger, _, _, ours = self._saved
        for h in list(ray_logger.handlers):
            if h is not ours:
                ray_logger.removeHandler(h)
        if ours not in ray_logger.handlers:
            ray_logger.addHandler(ours)

    def handle(self, data: dict) -> None:
        """One batch of lines of one Ray process (the dispatcher's format: ``lines``, ``pid``,
        ``ip``, ``actor_name`` or ``task_name``)."""
        name = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({name + ' ' if name else ''}pid={data.get('pid')}, ip={data.get('ip')}) "
        lines = data.get("lines", ())
        if data.get("pid") == "autoscaler" and self._autoscaler_events is not None:
            lines = list(self._autoscaler_events(lines))  # as Ray prints: its events, not a status every 5 s
        with self._lock:
            for line in lines:
                if line.startswith(PROGRESS_MARK):
                    self._draw(line[len(PROGRESS_MARK):])
                elif self._file is not None:
                    self._file.write(prefix + line + "\n")

    def _draw(self, payload: str) -> None:
        try:
            text = json.loads(payload)
        except ValueError:
            return
        if text is None:
            if self._bar_open:
                self.terminal.write("\n")
                self._bar_open = False
        else:
            self.terminal.write("\r" + str(text) + ("\x1b[K" if self._isatty() else ""))
            self._bar_open = True
        self.terminal.flush()

    def _isatty(self) -> bool:
        try:
            return bool(self.terminal.isatty())
        except (AttributeError, ValueError):
            return False

    def __exit__(self, *exc) -> None:
        with self._lock:
            if self._bar_open:
                self.terminal.write("\n")
                self.terminal.flush()
                self._bar_open = False
            if self._dispatcher is not None:
                self._dispatcher.remove_handler("gradcomp_ray_output")
                self._dispatcher = None
            if self._saved is not None:
                ray_logger, handlers, propagate, ours = self._saved
                ray_logger.removeHandler(ours)
                for h in handlers:
                    ray_logger.addHandler(h)
                ray_logger.propagate = propagate
                self._saved = None
            if self._file is not None:
                self._file.close()
                self._file = None


def _connect(ray, address: str, timeout: float) -> None:
    """``ray.init(address=...)`` bounded by ``timeout`` seconds.

    Something listens there (:func:`probe_address` said so), but if it is not a Ray GCS (or it
    does not answer), ``ray.init`` retries for minutes and cannot be interrupted from Python.
    Nothing of ours runs yet in connect mode, so past the bound the launcher says so and exits.
    """
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout):
            sys.stderr.write(
                f"gradcomp-launch: --address {address}: something accepts connections there but Ray did "
                f"not finish connecting within --startup-timeout {timeout:g} s; check that it is the head's "
                "GCS port (6379 unless `ray start --head --port` said otherwise), that the cluster runs "
                f"Ray {ray.__version__}, and `ray status --address {address}` on the head\n")
            sys.stderr.flush()
            os._exit(EXIT_FAILED)

    threading.Thread(target=watchdog, daemon=True, name="gradcomp-connect-watchdog").start()
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as e:
        raise ClusterUnreachable(f"--address {address}: {e}") from None
    finally:
        done.set()


def _start_ray(args, temp_root: str | None):
    import ray

    if args.address:
        _connect(ray, args.address, args.startup_timeout)
        return ray
    # Node IP 127.0.0.1: Ray's gRPC servers (GCS, raylet, core workers), the dashboard agent,
    # the runtime-env agent and the metrics endpoints all bind loopback then, not 0.0.0.0.
    kw = {"include_dashboard": bool(args.dashboard), "dashboard_host": args.dashboard_host, "_temp_dir": temp_root,
          "_node_ip_address": "127.0.0.1"}
    need = args.workers * args.cpus_per_worker
    with _sigint_blocked(), _set_env(**_embedded_env()), _node_ip_loopback():
        ray.init(num_cpus=max(need + 1, os.cpu_count() or 1), num_gpus=args.workers * args.gpus_per_worker or None,
                 log_to_driver=True, **kw)
    return ray


def _descendants() -> list:
    try:
        import psutil

        return psutil.Process().children(recursive=True)
    except Exception:  # psutil comes with ray; without it there is nothing to sweep
        return []


def _stop_leftovers(procs: list, temp_root: str | None) -> None:
    """Terminate (then kill) what is left of the embedded Ray: ``procs`` and any process whose
    command line names ``temp_root`` (a child reparented when its parent died)."""
    try:
        import psutil
    except ImportError:
        return
    found = {p.pid: p for p in procs}
    if temp_root:
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != os.getpid() and temp_root in " ".join(p.info["cmdline"] or ()):
                    found.setdefault(p.pid, p)
            except psutil.Error:
                pass
    alive = []
    for p in found.values():
        try:
            if p.is_running():
                p.terminate()
                alive.append(p)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _sweep_stale_temp_roots() -> None:
    """Remove embedded-Ray temp roots of launchers that are gone (SIGKILLed: nothing cleaned up),
    after stopping the Ray processes still running from them."""
    for d in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        pid = d.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or someone else's): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            if d.is_dir() and not d.is_symlink() and d.stat().st_uid == os.getuid():
                _stop_leftovers([], str(d))  # Ray agents that outlived their raylet
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _ray_run_name(output: Path, resume: bool) -> str:
    """Ray Train's run name: ``train``, and a fresh ``train-resume-N`` for each ``--resume``.

    A resumed run continues from our own ``checkpoints/latest`` (published only when complete).
    Reusing the interrupted run's Ray record made Ray fail: it can name checkpoints the
    interrupted run never finished writing, and the resumed run re-reports step directories
    of the same names, which Ray then deletes twice ("Path not found: .../ray/train/step-...").
    """
    if not resume:
        return "train"
    n = 1
    while (output / "ray" / f"train-resume-{n}").exists():
        n += 1
    return f"train-resume-{n}"


def _placement_failure(e: BaseException) -> bool:
    seen = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if "WorkerGroupStartup" in type(x).__name__:
            return True
        stack += [x.__cause__, x.__context__, getattr(x, "controller_failure", None)]
    return "WorkerGroupStartupTimeoutError" in str(e)


def _fit(args, trainer):
    """``trainer.fit()`` with our Ctrl-C handling and a bounded wait for placement."""
    # Ray Train's fit() installs its own SIGINT handler (abort the controller, then sys.exit),
    # which made Ctrl-C exit 1 without a word and kept it from us: leave SIGINT to Python's
    # KeyboardInterrupt, which unwinds to run()'s cleanup and main()'s exit 130.
    if hasattr(trainer, "_register_sigint_handler"):
        trainer._register_sigint_handler = lambda controller: None
    # Read by the controller when it places each worker group (Ray Train propagates it).
    with _set_env(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=str(args.startup_timeout)):
        try:
            return trainer.fit()
        except Exception as e:  # Ray wraps worker tracebacks; they are in the message
            if _placement_failure(e):
                raise TrainingFailed(_placement_message(args)) from e
            raise TrainingFailed(str(e)) from e


def _placement_message(args) -> str:
    attempts = args.max_failures + 1
    res = f"{args.cpus_per_worker} CPU" + (f" + {args.gpus_per_worker} GPU" if args.gpus_per_worker else "")
    return (f"the cluster could not place {args.workers} workers ({res} each, --placement {args.placement}) "
            f"within --startup-timeout {args.startup_timeout:g} s, {attempts} attempt(s) (1 + --max-failures): "
            f"check `ray status` for free resources and alive nodes ({args.placement} "
            + ("needs one node per worker" if args.placement == "STRICT_SPREAD" else
               "needs all workers on one node" if args.placement == "STRICT_PACK" else "needs the total free")
            + "), or raise --startup-timeout if nodes are still joining")


def run(args: argparse.Namespace, output: Path) -> dict:
    """Run the job described by ``args``; return the results (also written to ``output/results.json``).

    ``KeyboardInterrupt`` (Ctrl-C) propagates after Ray is shut down and the embedded Ray's
    processes and temporary directory are gone.
    """
    from gradcomp.app.env import environment

    config = config_from_args(args, output)
    output.mkdir(parents=True, exist_ok=True)
    temp_root = None
    before = set()
    if not args.address:
        _sweep_stale_temp_roots()
        # short: Ray's socket paths; the pid lets a later launch remove it if we get SIGKILLed
        temp_root = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-")
        before = {p.pid for p in _descendants()}  # not ours to stop (a test's own cluster...)
    if not args.address:
        # Build (or load) the native kernels here, where the one-time build message reaches the
        # terminal; the workers on this machine then load the cached build.
        from gradcomp.numerics import kernels

        kernels.warmup()
    t0 = time.perf_counter()
    ray = None
    log_path = output / RAY_LOG
    print(f"gradcomp-launch: Ray's own output goes to {log_path}", file=sys.stderr, flush=True)
    with _RayOutput(log_path) as ray_output:
        try:
            ray = _start_ray(args, temp_root)
            ray_output.attach()
            payload = {"config": config.to_dict(), "inject_fault": args.inject_fault, "scratch_dir": temp_root}
            if args.transport == "horovod":
                from gradcomp.comm.horovod import run_on_ray

                results = run_on_ray(horovod_worker, num_workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                                     use_gpu=bool(args.gpus_per_worker), args=(payload,))
                result = results[0]
                ray_info = {"transport": "horovod.ray.RayExecutor", "ray_temp_dir": temp_root}
            else:
                from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
                from ray.train.torch import TorchConfig, TorchTrainer

                scaling = ScalingConfig(
                    num_workers=args.workers, use_gpu=bool(args.gpus_per_worker), placement_strategy=args.placement,
                    resources_per_worker={"CPU": args.cpus_per_worker,
                                          **({"GPU": args.gpus_per_worker} if args.gpus_per_worker else {})})
                try:  # Ray Train v2: a worker group that cannot be placed counts against max_failures too
                    failure = FailureConfig(max_failures=args.max_failures,  # type: ignore[call-arg]  # v1 stubs
                                            controller_failure_limit=args.max_failures)
                except TypeError:  # pragma: no cover - Ray Train v1
                    failure = FailureConfig(max_failures=args.max_failures)
                run_config = RunConfig(
                    name=_ray_run_name(output, args.resume), storage_path=str((output / "ray").resolve()),
                    failure_config=failure,
                    checkpoint_config=CheckpointConfig(num_to_keep=2))
                timeout_s = max(1, math.ceil(args.timeout))  # the process group's timeout (Ray takes whole seconds)
                if args.address:
                    torch_config = TorchConfig(timeout_s=timeout_s)
                else:
                    from gradcomp.app._ray_loopback import LoopbackTorchConfig

                    torch_config = LoopbackTorchConfig(timeout_s=timeout_s)
                trainer = TorchTrainer(train_worker, train_loop_config=payload, scaling_config=scaling,
                                       run_config=run_config, torch_config=torch_config)
                fit = _fit(args, trainer)
                if fit.error is not None:
                    raise TrainingFailed(str(fit.error))
                if not fit.metrics or RESULT_KEY not in fit.metrics:
                    raise RuntimeError(f"training ended without a result (last metrics: {fit.metrics})")
                result = json.loads(fit.metrics[RESULT_KEY])
                ray_info = {"transport": "ray.train.torch.TorchTrainer", "ray_storage": str(output / "ray"),
                            "ray_temp_dir": temp_root,
                            "last_ray_checkpoint": fit.checkpoint.path if fit.checkpoint is not None else None}
        finally:
            _cleanup(ray, temp_root, before)
    result = dict(result)
    result.update({"config": config.to_dict(),
                   "launcher": {"workers": args.workers, "address": args.address or "embedded",
                                "job_wall_seconds": time.perf_counter() - t0, **ray_info},
                   "environment": environment()})
    tmp = output / ".results.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, output / "results.json")
    return result


def _cleanup(ray, temp_root: str | None, before: set) -> None:
    """Shut Ray down; for an embedded Ray also stop whatever of it survived and delete its temp root.

    Runs with SIGINT ignored (main thread): a second Ctrl-C must not cut the cleanup short.
    """
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        ours = [p for p in _descendants() if p.pid not in before] if temp_root is not None else []
        if ray is not None:
            try:
                ray.shutdown()
            except Exception as e:  # pragma: no cover - report, keep cleaning
                print(f"gradcomp-launch: ray.shutdown failed: {e}", file=sys.stderr)
        if temp_root is not None:
            _stop_leftovers(ours, temp_root)
            shutil.rmtree(temp_root, ignore_errors=True)
    finally:
        if main:
            signal.signal(signal.SIGINT, old)


def format_table(result: dict) -> str:
    """Return the end-of-run table (Markdown)."""
    cfg = result["config"]
    bpe = result.get("bits_per_element")
    rows = [
        ("codec", f"{cfg['codec']}" + (f" ({result.get('collective')})" if result.get("collective") else "")),
        ("model", f"{cfg['model']}" + (f", ST {cfg['act_bits']}-bit activations" if cfg.get("act_bits") else "")),
        ("workers", str(result["world_size"])),
        ("final accuracy", f"{100 * result['final_accuracy']:.2f} %"),
        ("steps", str(result["steps"])),
        ("bytes sent per step (per rank)", f"{result['bytes_sent_per_step']:,.0f} ({result.get('bytes_source')})"),
        ("bits per element", "-" if bpe is None else f"{bpe:.3f}"),
        ("step time p50 / p90",
         f"{1e3 * (result['step_time_p50'] or 0):.1f} / {1e3 * (result['step_time_p90'] or 0):.1f} ms"),
        ("training wall time", f"{result['wall_seconds']:.1f} s"),
        ("restarts", f"{result['restarts']}" + (f" (resumed from step {result['resumed_from_step']})"
                                                  if result.get("resumed_from_step") is not None else "")),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(w)} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {k.ljust(w)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gradcomp-launch``: exit 0 on success, 2 on bad arguments (before Ray
    starts), 1 on failure (an unreachable cluster, failed training), 130 on Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a message on bad arguments
    if args.output is None:
        args.output = str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.codec}")
    # Absolute: Ray workers run in their own working directory, where a relative path would
    # put checkpoints and metrics.jsonl in Ray's temp dir (deleted after the run).
    output = Path(args.output).absolute()
    try:
        if args.address is not None:
            parse_address(args.address)
        preflight(args, output)
    except UsageError as e:
        parser.error(str(e))
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output and --overwrite deletes it: pass one")
    if args.resume and not (output / "checkpoints" / "latest").is_file():
        parser.error(f"--resume: no checkpoint under {output / 'checkpoints'}")
    previous = previous_run_artifacts(output)
    if previous and not (args.resume or args.overwrite):
        # Starting fresh on top of an old run would mix its checkpoints and Ray state with the
        # new one (Ray would even restore the old run's last checkpoint): never silently.
        parser.error(f"--output {output} holds a previous run ({', '.join(p.name for p in previous)}); "
                     "pass --resume to continue it or --overwrite to start over")
    if args.gpus_per_worker:
        import torch

        if not torch.cuda.is_available() and not args.address:
            parser.error("--gpus-per-worker needs CUDA, and torch sees no GPU here")
    if args.transport == "horovod":
        try:
            from gradcomp.comm.horovod import _import_hvd

            _import_hvd()
        except ImportError as e:
            parser.error(f"--transport horovod: {e}")
    if args.inject_fault is not None and args.inject_fault[0] >= args.workers:
        parser.error(f"--inject-fault rank {args.inject_fault[0]} >= --workers {args.workers}")
    try:
        if args.address is not None:
            probe_address(args.address, args.startup_timeout)
        if args.overwrite:
            for path in previous:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        result = run(args, output)
    except KeyboardInterrupt:
        resumable = (output / "checkpoints" / "latest").is_file()
        print("gradcomp-launch: interrupted; Ray is shut down"
              + (f"; continue with --resume --output {output}" if resumable else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except ClusterUnreachable as e:
        print(f"gradcomp-launch: {e}", file=sys.stderr)
        return EXIT_FAILED
    except TrainingFailed as e:
        print(f"gradcomp-launch: training failed:\n{e}\n(Ray's output: {output / RAY_LOG})", file=sys.stderr)
        return EXIT_FAILED
    print()
    print(format_table(result))
    print(f"\nresults: {output / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

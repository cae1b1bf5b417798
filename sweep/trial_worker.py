"""Processes that compile and time trials, so a compiler crash, a CUDA fault or a hung kernel costs one
trial and never the sweep.

- `IsolatedWorker`: one `spawn`ed child serving requests over a pipe. A reply that does not come
  within the timeout kills the child (status timeout); a child that dies mid-request (abort, CUDA
  fault, OOM kill) is reported as a crash (status runtime_error). The next request restarts it.
- Children ignore SIGINT and SIGTERM: a Ctrl-C or `timeout` reaches the whole process group, and a child
  killed by it mid-request would read as a crashed trial. The parent stops them (`shutdown`), and a child
  whose parent is gone exits by itself; requests cut off by a shutdown raise `WorkerShutDown`, never a status.
- `Evaluator`: a pool of compile workers (CuTe-DSL compilation is not thread-safe, and fork after CUDA
  init breaks, hence spawned processes), results cached per compile key, plus ONE long-lived timing
  worker per GPU that keeps its CUDA context (slow to create) until a fault forces a restart.

Nothing here imports torch at module level: compile workers and the synthetic backend never need it.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from kernels.family import family_of

from . import synthetic

BACKENDS = ("gpu", "synthetic")
START_TIMEOUT_S = 600.0  # CUDA context + copy roofline, or a cold import of the CuTe DSL
COMPILE_NICE = 10  # compile processes yield the CPU to the timing process (see CompileService)


class WorkerShutDown(RuntimeError):
    """The worker was shut down (the sweep or bench is stopping): the request was not answered."""


@dataclass(frozen=True)
class Reply:
    kind: str  # ok | error | crash | timeout
    value: Any = None
    message: str = ""


def _watch_parent(ppid: int) -> None:
    """Exit when the parent goes away (kill -9 included), even while the main thread is stuck."""
    while True:
        if os.getppid() != ppid:
            os._exit(1)
        time.sleep(0.5)


def _child_main(conn, factory, args: tuple, env: dict, ppid: int) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # the parent ends this process (module docstring)
        signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(ppid,), daemon=True).start()
    os.environ.update(env)
    try:
        service = factory(*args)
    except BaseException as e:  # report why the service could not start, then exit
        conn.send(("init_error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    conn.send(("ready", service.info))
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            return
        if req is None:
            return
        try:
            conn.send(("ok", service.handle(req)))
        except Exception as e:  # the request failed; tell the parent and, if state may be poisoned, exit
            conn.send(("error", f"{type(e).__name__}: {e}"))
            if service.restart_on_error:
                return


def _signal_name(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class IsolatedWorker:
    """A spawned child process running `factory(*args)` (a service with .info, .handle, .restart_on_error)."""

    def __init__(self, factory, args: tuple = (), env: dict | None = None, name: str = "worker",
                 start_timeout: float = START_TIMEOUT_S):
        self.factory, self.args, self.env, self.name = factory, args, dict(env or {}), name
        self.start_timeout = start_timeout
        self.proc = None
        self.conn = None
        self.info = None
        self.restarts = 0
        self.shut = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def start(self) -> Any:
        """Start the child and wait for its service to be ready; returns the service's info."""
        if self.shut:
            raise WorkerShutDown(f"{self.name} was shut down")
        self.close()
        if self.info is not None:
            self.restarts += 1
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(child, self.factory, self.args, self.env, os.getpid()),
                                name=self.name, daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        if not parent.poll(self.start_timeout):
            self.close()
            raise RuntimeError(f"{self.name}: did not start within {self.start_timeout:.0f} s")
        try:
            kind, value = parent.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            self.close()
            raise RuntimeError(f"{self.name}: died while starting ({_signal_name(code)})")
        if kind != "ready":
            self.close()
            raise RuntimeError(f"{self.name}: could not start: {value}")
        self.info = value
        return value

    def call(self, request, timeout: float) -> Reply:
        """Send one request; never raises for a child that crashes or hangs (WorkerShutDown once `shutdown`)."""
        try:
            return self._call(request, timeout)
        except (EOFError, OSError, ValueError, AttributeError):  # the connection was closed under it
            if self.shut:
                raise WorkerShutDown(f"{self.name} was shut down during the request") from None
            raise

    def _call(self, request, timeout: float) -> Reply:
        if not self.alive():
            self.start()
        try:
            self.conn.send(request)
        except (BrokenPipeError, OSError):
            self.close()
            return Reply("crash", message=f"{self.name} process was gone before the request")
        if self.conn.poll(timeout):
            try:
                kind, value = self.conn.recv()
            except (EOFError, OSError):
                if self.shut:
                    raise
                self.proc.join(5)
                code = self.proc.exitcode
                self.close()
                return Reply("crash", message=f"{self.name} process died ({_signal_name(code)})")
            if kind == "ok":
                return Reply("ok", value)
            if not self.proc.is_alive() or kind == "error":
                self.proc.join(0.1)
            return Reply("error", message=str(value))
        if self.shut:
            raise WorkerShutDown(f"{self.name} was shut down during the request")
        self.close()
        return Reply("timeout", message=f"{self.name}: no answer within {timeout:.0f} s; process killed")

    def shutdown(self) -> None:
        """Stop the child for good: a request in flight or made later raises WorkerShutDown."""
        self.shut = True
        self.close()

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(10)
        if self.conn is not None:
            self.conn.close()
        self.proc, self.conn = None, None


# ---------------------------------------------------------------------------------------------------
# Services (run inside the children)


class CompileService:
    """Compiles one (problem, config) for an arch into the on-disk cache (kernels.compile_cache)."""

    restart_on_error = False

    def __init__(self, backend: str):
        # One compile process per core keeps every core busy, while the timing process is single-threaded
        # Python too: capturing a decode shape's graph issues one launch per rotation set (tens of
        # thousands). Lower priority lets timing run first whenever both want a core.
        try:
            os.nice(COMPILE_NICE)
        except OSError:
            pass  # not permitted here: compile at normal priority
        self.backend = backend
        self.info = {"pid": os.getpid()}

    def handle(self, req) -> dict:
        problem, cfg, arch = req
        if self.backend == "synthetic":
            try:
                return {"status": "ok", **synthetic.precompile(problem, cfg)}
            except RuntimeError as e:
                return {"status": "compile_error", "error": str(e)}
        try:
            info = family_of(problem).precompile(problem, cfg, arch)
        except Exception as e:  # KernelCompileError and whatever the DSL raises: the config does not compile
            return {"status": "compile_error", "error": f"{type(e).__name__}: {e}"[:4000]}
        return {"status": "ok", "compile_s": info.compile_s, "registers": info.registers,
                "smem_bytes": info.smem_bytes}


class TimingService:
    """Checks then times trials (and peers) on one device, measuring the copy roofline once at start."""

    def __init__(self, backend: str):
        self.backend = backend
        if backend == "synthetic":
            self.restart_on_error = False
            self.info = {"provenance": synthetic.device_info(), "arch": "sm_90a",
                         "copy_gbps": synthetic.copy_gbps(), "pid": os.getpid()}
            return
        import torch

        from kernels.runner import arch_of

        from .provenance import gpu_provenance
        from .timer import copy_roofline

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible to the timing process")
        torch.cuda.set_device(0)
        self.restart_on_error = True  # after an exception the CUDA context may be unusable
        self.arch = arch_of(torch.device("cuda", 0))
        copy = copy_roofline()
        self.info = {"provenance": gpu_provenance(0), "arch": self.arch, "copy_gbps": copy.gbps,
                     "copy_median_us": copy.timing.median_us, "pid": os.getpid()}

    def handle(self, req) -> dict:
        kind = req[0]
        if kind == "kernel":
            _, problem, cfg = req
            if self.backend == "synthetic":
                return synthetic.measure(problem, cfg)
            return measure_kernel(problem, cfg, self.arch)
        if kind == "peer":
            _, problem, impl = req
            if self.backend == "synthetic":
                raise ValueError("peers run only on the gpu backend")
            from .peers import measure_peer

            return measure_peer(problem, impl)
        if kind == "op":
            _, problem = req
            if self.backend == "synthetic":
                raise ValueError("the public op runs only on the gpu backend")
            from .public_op import measure_op

            return measure_op(problem)
        raise ValueError(f"unknown request kind {kind!r}")


class PreparedProblem:
    """The rotation sets of one problem and its reference outputs (GPU, timing child).

    Every trial of a study times the same problem; building hundreds of random rotation sets and a
    fp32 reference per trial would cost more than timing a small kernel, so they are built once and
    kept (`PREPARED`). Outputs are poisoned (in-place inputs restored) before every check, so trials
    sharing buffers cannot see each other's results. The family's runner builds the cases."""

    def __init__(self, problem):
        from .timer import l2_bytes, rotation_sets

        self.problem = problem
        run = family_of(problem).runner
        first = run.make_case(problem, device="cuda", seed=0)
        sets = rotation_sets(first.nbytes, l2_bytes())
        self.cases = [first] + run.make_cases(problem, sets - 1, device="cuda", seed=1)  # sets >= 2
        self.expected = run.expected_outputs(problem, first)
        # arguments plus the pristine input copies (at most as large again) plus the reference
        self.nbytes = 2 * sum(c.nbytes for c in self.cases) + sum(
            t.numel() * t.element_size() for t in self.expected.values())


class PreparedCache:
    """Most recently used PreparedProblems, kept while their GPU memory stays under a fraction of the
    device's (the newest is always kept)."""

    def __init__(self, max_fraction: float = 0.4):
        self.max_fraction = max_fraction  # of the GPU's memory; concurrent studies each keep a problem
        self.max_bytes: int | None = None
        self._items: dict = {}

    def get(self, problem) -> PreparedProblem:
        if self.max_bytes is None:
            import torch

            self.max_bytes = int(self.max_fraction * torch.cuda.get_device_properties(0).total_memory)
        item = self._items.pop(problem, None)
        if item is None:
            item = PreparedProblem(problem)
        self._items[problem] = item  # most recent last
        while len(self._items) > 1 and sum(i.nbytes for i in self._items.values()) > self.max_bytes:
            self._items.pop(next(iter(self._items)))
        return item


PREPARED = PreparedCache()


def check_then_time(problem, make_launch, warm_all: bool = True) -> dict:
    """Check one implementation against the reference, then time it over rotated buffers (GPU, in the
    timing child). `make_launch(case)` returns (timed, checked): zero-argument callables, where
    `checked()` must leave the outputs in `case` and `timed()` is what the graph replays. `warm_all`
    as in `time_launchers`."""
    import torch

    from .timer import time_launchers

    run = family_of(problem).runner
    prep = PREPARED.get(problem)
    case0 = prep.cases[0]
    timed0, checked0 = make_launch(case0)
    run.poison(case0)
    checked0()
    torch.cuda.synchronize()
    chk = run.check(problem, case0, prep.expected)
    common = {"rel_err": _finite(chk.rel_err), "max_ulp": _finite(chk.max_ulp)}
    if not chk.ok:
        return {"status": "wrong_result", "error": chk.message[:4000], **common}
    launchers = [timed0] + [make_launch(c)[0] for c in prep.cases[1:]]
    t = time_launchers(launchers, set_bytes=case0.nbytes, warm_all=warm_all)
    return {"status": "ok", "median_us": t.median_us, "p20_us": t.p20_us, "p80_us": t.p80_us,
            "samples_us": list(t.samples_us), **common}


def measure_kernel(problem, cfg, arch: str) -> dict:
    """Check then time one kernel config."""
    from . import gpu_faults

    run = family_of(problem).runner

    fault = gpu_faults.wants_fault(problem, cfg)  # test-only: a real illegal-address fault

    def make_launch(case):
        if fault:
            launch = gpu_faults.out_of_bounds_launcher(case.args["x"])
        else:
            launch = run.launcher(problem, cfg, case, arch)
        return launch, launch

    return check_then_time(problem, make_launch, warm_all=False)  # one compiled kernel, loaded by the check


def _finite(x):
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


# ---------------------------------------------------------------------------------------------------
# The parent side


def compile_key(problem, cfg, arch: str) -> tuple:
    """What a compiled kernel depends on: the family's compile key (everything but the runtime sizes)."""
    fam = family_of(problem)
    return (fam.name, *fam.compile_key(problem), cfg, arch)


class Evaluator:
    """Compile pool + one timing process for one device; thread-safe (study threads share it)."""

    def __init__(self, backend: str, compile_workers: int | None = None, trial_timeout: float = 120.0,
                 compile_timeout: float = 900.0, env: dict | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        n = compile_workers or os.cpu_count() or 1
        if n < 1:
            raise ValueError(f"compile_workers must be >= 1, got {n}")
        if trial_timeout <= 0 or compile_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.backend, self.trial_timeout, self.compile_timeout = backend, trial_timeout, compile_timeout
        self.timing = IsolatedWorker(TimingService, (backend,), env, name="timing")
        self._idle: queue.Queue[IsolatedWorker] = queue.Queue()
        for i in range(n):
            self._idle.put(IsolatedWorker(CompileService, (backend,), env, name=f"compile-{i}"))
        self._all_compile = list(self._idle.queue)
        self.n_compile = n
        self._timing_lock = threading.Lock()
        self._compiled: dict[tuple, Future] = {}
        self._compiled_lock = threading.Lock()
        self.info: dict | None = None
        # Mean wall seconds of one kernel timing per problem, leaving out each problem's first: that one also
        # builds the problem's rotation sets and reference (and the process's first also loads CUDA modules),
        # which a re-bench does not repeat; on the H200 a first timing of 11 s made a 110 s sweep stop at once.
        self.timing_s: dict = {}
        self._timings: dict = {}

    def start(self) -> dict:
        """Start the timing process; returns its info (provenance, arch, copy_gbps)."""
        self.info = self.timing.start()
        return self.info

    @property
    def arch(self) -> str:
        return self.info["arch"]

    def compile(self, problem, cfg) -> dict:
        key = compile_key(problem, cfg, self.arch)
        with self._compiled_lock:
            fut = self._compiled.get(key)
            owner = fut is None
            if owner:
                fut = self._compiled[key] = Future()
        if not owner:
            return fut.result()
        worker = self._idle.get()
        try:
            r = worker.call((problem, cfg, self.arch), self.compile_timeout)
        except BaseException as e:  # WorkerShutDown: threads waiting on this compile must not wait forever
            with self._compiled_lock:
                self._compiled.pop(key, None)
            fut.set_exception(e)
            raise
        finally:
            self._idle.put(worker)
        if r.kind == "ok":
            res = r.value
        elif r.kind == "timeout":
            res = {"status": "timeout", "error": f"compile: {r.message}"}
        else:
            res = {"status": "compile_error", "error": f"compile: {r.message}"}
        if res["status"] == "timeout":
            with self._compiled_lock:  # a later request may retry a compile that only ran out of time
                self._compiled.pop(key, None)
        fut.set_result(res)
        return res

    def _timed(self, request, wanted=None) -> dict | None:
        with self._timing_lock:
            if wanted is not None and not wanted():
                return None
            restarts = self.timing.restarts
            t0 = time.monotonic()
            r = self.timing.call(request, self.trial_timeout)
            if request[0] == "kernel":  # what a re-bench will cost for this problem (StudyRun's budget)
                p, n = request[1], self._timings.get(request[1], 0)
                if n:  # the n-th timing after the first
                    self.timing_s[p] = (self.timing_s.get(p, 0.0) * (n - 1) + time.monotonic() - t0) / n
                self._timings[p] = n + 1
            if self.timing.restarts != restarts and self.timing.info is not None:
                self.info = self.timing.info  # a restarted child re-measured the copy roofline
        if r.kind == "ok":
            return r.value
        if r.kind == "timeout":
            return {"status": "timeout", "error": r.message}
        return {"status": "runtime_error", "error": r.message[:4000]}

    def time(self, problem, cfg, wanted=None) -> dict | None:
        """Check and time a compiled kernel; None, untimed, when `wanted()` says no once the GPU is free."""
        return self._timed(("kernel", problem, cfg), wanted)

    def evaluate(self, problem, cfg, wanted=None) -> dict | None:
        """Compile (cached) then check and time: a dict with status and, when ok, the timings (None as in
        `time`)."""
        c = self.compile(problem, cfg)
        if c["status"] != "ok":
            return {"status": c["status"], "error": c.get("error")}
        r = self.time(problem, cfg, wanted)
        if r is None:
            return None
        res = dict(r)
        res["compile_s"] = c.get("compile_s")
        return res

    def measure_peer(self, problem, impl: str) -> dict:
        return self._timed(("peer", problem, impl))

    def measure_op(self, problem) -> dict:
        """Check and time the public op (`kernels.ops`), dispatching as a user's call does."""
        return self._timed(("op", problem))

    def close(self) -> None:
        """Stop every worker; calls in flight on other threads raise WorkerShutDown instead of reporting a
        crashed trial."""
        self.timing.shutdown()
        for w in self._all_compile:
            w.shutdown()

"""What runs inside a job: one stage command per task, checkpointable, with every attempt recorded.

`StageJob` is the callable submitit pickles. In the job it reads the task's place from
`submitit.JobEnvironment()`, exports the torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) that `pretrain.distributed.detect_env` reads first, and runs
`python -m STAGE ARGS` as a child process (or, for `--cluster debug`, the stage's `main()` here).

Resuming is the stages' own business: pretrain restarts from the newest checkpoint in output_dir,
ingest skips committed inputs. So every path back into the queue re-runs the same command:
- preemption / time limit: SLURM sends USR2 (`--signal USR2@delay`); submitit's handler on rank 0
  calls `checkpoint()` (stops the child, returns this same job) and requeues it, up to
  `--max-requeues` times, with SIGTERM ignored meanwhile so that SLURM's stopping of the step
  cannot kill `scontrol requeue` half-way and turn a requeue into a failed job;
- `scontrol requeue` (or a node drain): SLURM sends SIGTERM, which submitit only logs; the child
  dies of it, this process notes the signal and waits for SLURM to finish the attempt instead of
  reporting a failure; the requeued job starts the command again.
A child that fails on its own (no signal reached this process) fails the job with its stderr tail.
Every attempt appends start/end lines to OUT/launch/attempts.jsonl and keeps each rank's stdout and
stderr in OUT/launch/<job name>/attempt-NN-job-ID/.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from launch.attempts import end_attempt, start_attempt, stderr_tail

logger = logging.getLogger(__name__)

# After SIGTERM/USR2 SLURM kills the attempt within KillWait (30 s by default) or requeues it; a
# process still alive this long after its child was stopped was not stopped by SLURM after all.
STOP_WAIT_S = float(os.environ.get("MEDSSL_LAUNCH_STOP_WAIT_S", "300"))
# A child killed by a signal that this process did not (yet) receive: how long to wait for it.
SIGNAL_RACE_S = 5.0
CHILD_GRACE_S = 30.0  # time a stopped child gets to exit before SIGKILL


class StageFailed(RuntimeError):
    """The stage command exited non-zero; the message carries its stderr tail."""


class StageStopped(RuntimeError):
    """The job was signalled to stop (preemption, requeue, cancel) and was not ended by SLURM."""


@dataclass(frozen=True)
class TaskPlace:
    """This task's place in its job (from submitit's job environment)."""

    job_id: str
    rank: int
    local_rank: int
    world_size: int
    num_nodes: int
    master_addr: str
    restart_count: int
    cluster: str

    @classmethod
    def current(cls) -> TaskPlace:
        try:
            env = submitit.JobEnvironment()
        except RuntimeError:  # called outside any submitit job: one process
            return cls(f"pid{os.getpid()}", 0, 0, 1, 1, "127.0.0.1", 0, "none")
        hosts = list(env.hostnames) or [socket.gethostname()]
        return cls(
            job_id=str(env.job_id),
            rank=env.global_rank,
            local_rank=env.local_rank,
            world_size=env.num_tasks,
            num_nodes=env.num_nodes,
            master_addr=hosts[0],
            restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            cluster=env.cluster,
        )

    def master_port(self) -> int:
        """Same on every task of an attempt without talking; a new one after each requeue."""
        return random.Random(f"{self.job_id}:{self.restart_count}").randint(20000, 60000)

    def dist_env(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(max(1, self.world_size // max(1, self.num_nodes))),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port()),
        }


# ---------------------------------------------------------------------------------- the job
def _tee(src: BinaryIO, sinks: Sequence[BinaryIO | None]) -> None:
    """Copy a child's pipe to its log file and to this task's own stream (submitit's log)."""
    for chunk in iter(lambda: src.read1(65536), b""):
        for sink in filter(None, sinks):
            with contextlib.suppress(OSError, ValueError):
                sink.write(chunk)
                sink.flush()


def _child_preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
    # The preemption signal (USR2) is the parent's to handle; the child is stopped with SIGTERM.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@contextlib.contextmanager
def _signal_ignored(sig: int) -> Iterator[None]:
    """Ignore `sig` here and in every process started meanwhile, then restore its handler."""
    previous = signal.getsignal(sig)
    signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


class StageJob(Checkpointable):
    """`python -m MODULE ARGV` as one task of a (possibly multi-task) submitit job.

    `distributed`: export RANK/WORLD_SIZE/... for torch.distributed (pretrain). `in_process`: call
    `MODULE.__main__.main(argv)` in this process instead (the debug cluster). The result is a dict
    describing the finished attempt; a failure raises `StageFailed` with the stderr tail.
    """

    def __init__(
        self,
        name: str,
        module: str,
        argv: Sequence[str],
        out_dir: str | Path,
        *,
        distributed: bool = False,
        in_process: bool = False,
        max_requeues: int | None = None,
        env: dict[str, str] | None = None,
    ):
        self.name, self.module, self.argv = name, module, [str(a) for a in argv]
        self.out_dir = Path(out_dir).resolve()
        self.distributed, self.in_process = distributed, in_process
        self.max_requeues = max_requeues
        self.env = dict(env or {})
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._stop_signal: str | None = None
        self._attempt: dict[str, Any] | None = None  # the start record of the running attempt
        self._ended = False  # its end record is written

    def __getstate__(self) -> dict[str, Any]:  # the running child is not part of the job
        state = dict(self.__dict__)
        state.update(_proc=None, _stop_signal=None, _attempt=None, _ended=False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.argv]

    def __repr__(self) -> str:
        return f"StageJob({self.name}: {shlex.join(['python', '-m', self.module, *self.argv])})"

    # ---- entry point in the job -----------------------------------------------------------
    def __call__(self) -> dict[str, Any]:
        self._reset_runtime()
        place = TaskPlace.current()
        if self.max_requeues is not None and place.restart_count > self.max_requeues:
            raise StageFailed(
                f"{self.name}: job {place.job_id} was requeued {place.restart_count} times, "
                f"more than --max-requeues {self.max_requeues}; not starting again"
            )
        start = self._attempt = start_attempt(
            self.out_dir, self.name, place, shlex.join(self.command)
        )
        log_dir = Path(start["log_dir"])
        logger.info(
            "%s attempt %d (job %s, rank %d/%d): %s",
            self.name,
            start["attempt"],
            place.job_id,
            place.rank,
            place.world_size,
            shlex.join(self.command),
        )
        try:
            if self.in_process:
                rc = self._run_in_process(place)
            else:
                rc = self._run_child(place, log_dir)
        except BaseException as exc:
            if not self._ended:
                status = "stopped" if self._stop_signal else "failed"
                end_attempt(
                    self.out_dir, start, status, signal=self._stop_signal, error=repr(exc)[:500]
                )
            raise
        finally:
            self._kill_child()
        if rc != 0:
            tail = stderr_tail(log_dir / f"rank{place.rank}.err") if not self.in_process else ""
            end_attempt(self.out_dir, start, "failed", returncode=rc)
            raise StageFailed(
                f"{self.name} failed with exit code {rc} (job {place.job_id}, rank {place.rank}, "
                f"attempt {start['attempt']}).\ncommand: {shlex.join(self.command)}\n"
                f"logs: {log_dir}\n--- last lines of stderr ---\n{tail}"
            )
        end_attempt(self.out_dir, start, "completed", returncode=0)
        return {
            "name": self.name,
            "module": self.module,
            "out_dir": str(self.out_dir),
            "job_id": place.job_id,
            "rank": place.rank,
            "world_size": place.world_size,
            "attempt": start["attempt"],
            "returncode": 0,
            "log_dir": str(log_dir),
        }

    def _child_env(self, place: TaskPlace) -> dict[str, str]:
        from launch.cluster import pythonpath

        env = dict(os.environ)
        env["PYTHONPATH"] = pythonpath()
        if self.distributed:
            env.update(place.dist_env())
        cpus = env.get("SLURM_CPUS_PER_TASK")
        if cpus and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = cpus
        env.update(self.env)
        return env

    def _run_in_process(self, place: TaskPlace) -> int:
        """The debug cluster: the stage's main() here, so breakpoints and tracebacks are direct."""
        main = importlib.import_module(f"{self.module}.__main__").main
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            rc = main(list(self.argv))
        except SystemExit as exc:  # argparse errors
            rc = exc.code if isinstance(exc.code, int) else 1
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return int(rc or 0)

    def _run_child(self, place: TaskPlace, log_dir: Path) -> int:
        out_path, err_path = log_dir / f"rank{place.rank}.out", log_dir / f"rank{place.rank}.err"
        with open(out_path, "ab") as out_f, open(err_path, "ab") as err_f:
            self._proc = subprocess.Popen(
                self.command,
                env=self._child_env(place),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                preexec_fn=_child_preexec,
            )
            own_out, own_err = (getattr(s, "buffer", None) for s in (sys.stdout, sys.stderr))
            tees = [
                threading.Thread(
                    target=_tee, args=(self._proc.stdout, [out_f, own_out]), daemon=True
                ),
                threading.Thread(
                    target=_tee, args=(self._proc.stderr, [err_f, own_err]), daemon=True
                ),
            ]
            for t in tees:
                t.start()
            with self._signals_watched():
                rc = self._wait_child()
                for t in tees:
                    t.join(timeout=10)
                if rc != 0:
                    self._settle_after_child_death(rc)
        return rc

    def _wait_child(self) -> int:
        assert self._proc is not None
        while True:
            try:  # short waits so that signal handlers run promptly in this (main) thread
                return self._proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue

    def _settle_after_child_death(self, rc: int) -> None:
        """A child that died while SLURM is stopping this attempt is not a failure of the stage."""
        if (
            rc < 0 and not self._stop_signal
        ):  # killed by a signal: was it SLURM's, on its way here too?
            deadline = time.monotonic() + SIGNAL_RACE_S
            while not self._stop_signal and time.monotonic() < deadline:
                time.sleep(0.05)
        if not self._stop_signal:
            return
        logger.warning(
            "%s: stopped by %s (child exit %d); waiting for SLURM to requeue or end this attempt",
            self.name,
            self._stop_signal,
            rc,
        )
        if self._attempt is not None:  # SLURM's SIGKILL may come next: write the record now
            end_attempt(
                self.out_dir, self._attempt, "stopped", signal=self._stop_signal, returncode=rc
            )
            self._ended = True
        deadline = time.monotonic() + STOP_WAIT_S
        while (
            time.monotonic() < deadline
        ):  # USR2 -> submitit requeues and exits; else SIGKILL comes
            time.sleep(0.2)
        raise StageStopped(
            f"{self.name}: stopped by {self._stop_signal} and not ended within {STOP_WAIT_S:.0f} s"
        )

    @contextlib.contextmanager
    def _signals_watched(self) -> Iterator[None]:
        """Note SIGTERM/USR2 (then stop the child); chain to submitit's USR2 requeue handler."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        usr_sig = submitit.JobEnvironment._usr_sig()
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, usr_sig)}

        def on_signal(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self._stop_signal is None:
                self._stop_signal = name
            logger.warning("%s: received %s", self.name, name)
            self._signal_child(signal.SIGTERM)
            handler = previous.get(signum)
            if signum == usr_sig and callable(handler):
                # submitit: rank 0 checkpoints, runs `scontrol requeue` and exits. SLURM's SIGTERM to
                # every process of the step (sent by the requeue itself, or by a preemption's
                # SIGTERM delivered late) can kill scontrol before it returns, and submitit then
                # reports the job failed. An ignored signal stays ignored across exec, so scontrol
                # started now finishes its call; SLURM's SIGKILL still ends everything.
                with _signal_ignored(signal.SIGTERM):
                    handler(signum, frame)

        for sig in previous:
            signal.signal(sig, on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _signal_child(self, sig: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def _kill_child(self, grace_s: float = CHILD_GRACE_S) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # ---- preemption / timeout --------------------------------------------------------------
    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit on USR2 (rank 0): stop the stage, then resubmit this same command,
        which resumes from the stage's newest checkpoint."""
        logger.warning(
            "%s: checkpoint requested (preemption or time limit); stopping the stage", self.name
        )
        self._kill_child()
        if self._attempt is not None and not self._ended:
            end_attempt(self.out_dir, self._attempt, "preempted", signal=self._stop_signal)
            self._ended = True
        return DelayedSubmission(self, *args, **kwargs)

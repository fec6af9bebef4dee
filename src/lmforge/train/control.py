"""Control channel for running training jobs: a per-user job registry and socket.

Problem: a run of many hours must be steerable while it runs (checkpoint now, stop
cleanly to change the config, begin the LR decay) without killing it, and only by
the user who started it.

Mechanism: rank 0 of each job starts a `ControlServer`. It listens on a Unix domain
socket (mode 0600) inside a per-user runtime directory (mode 0700), and writes a
registry entry `JOB_ID.json` beside it with the job id, pid, config, run directory,
start time and current step. A background thread accepts connections; each one
carries one JSON line `{"command": ..., "request_id": ...}`. The reply to `status` is sent at
once from the last `update_status()` values. Every other command is queued until
the trainer calls `poll()` at an optimizer-step boundary, broadcasts the commands to
all ranks, applies them and calls `acknowledge(request, step, message)`, which sends
the reply line back to the waiting client.

Runtime directory: `$LMFORGE_RUNTIME_DIR` when set, else `$XDG_RUNTIME_DIR/lmforge`,
else `/tmp/lmforge-UID`.

Usage (trainer side, rank 0)::

    server = ControlServer({"config": cfg.name, "run_dir": run_dir, "max_steps": 1000})
    server.start()
    for step in ...:
        server.update_status({"global_step": step, "loss": loss, ...})
        for request in server.poll():
            ...apply on every rank...
            server.acknowledge(request, step, "checkpoint written to ...")
    server.close()

Client side: `JobRegistry().find(job_ref)` and `send_request(record, "save-stop")`.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import queue
import re
import signal
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

RUNTIME_DIR_ENV = "LMFORGE_RUNTIME_DIR"
"""Environment variable that overrides the per-user runtime directory (tests use it)."""

TRAINER_COMMANDS = ("save", "save-stop", "stop", "abort", "start-annealing")
"""Commands that the trainer applies at the next optimizer-step boundary."""
COMMANDS = TRAINER_COMMANDS + ("status",)

# Linux limits AF_UNIX paths to 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_MAX_REQUEST_BYTES = 64 * 1024
_CLIENT_READ_TIMEOUT_S = 5.0
_REGISTRY_WRITE_INTERVAL_S = 1.0
# ETA samples: one per second, over the last two minutes.
_ETA_SAMPLE_INTERVAL_S = 1.0
_ETA_WINDOW = 120


def runtime_dir(create: bool = True) -> Path:
    """Return the per-user directory for control sockets and registry entries.

    With `create`, make it with mode 0700, and tighten the mode of an existing
    directory that others can read. Raise `LmforgeError` when another user owns it.
    """
    if os.environ.get(RUNTIME_DIR_ENV):
        path = Path(os.environ[RUNTIME_DIR_ENV])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "lmforge"
    else:
        path = Path(tempfile.gettempdir()) / f"lmforge-{os.getuid()}"
    if not create:
        return path

    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise LmforgeError(
            f"control runtime directory {path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()})",
            hint=f"set {RUNTIME_DIR_ENV} to a directory of your own",
        )
    if info.st_mode & 0o077:
        logger.warning("Control runtime directory %s had mode %o; setting it to 0700", path, info.st_mode & 0o777)
        path.chmod(0o700)
    return path


def _process_stat_fields(pid: int) -> list[str] | None:
    """Return the fields of /proc/PID/stat after the command name (Linux), or None where unavailable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (the command name) may contain spaces and brackets, so split after the last ')'.
    return text[text.rfind(")") + 2 :].split()


def _process_start_ticks(pid: int) -> int | None:
    """Return the start time of `pid` in clock ticks since boot (Linux), or None where unknown."""
    fields = _process_stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Return True while `pid` runs: not exited, not a zombie, and (given `start_ticks`) not a reused pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _process_stat_fields(pid)
    if fields:
        if fields[0] == "Z":
            return False
        if start_ticks is not None and _process_start_ticks(pid) not in (None, start_ticks):
            return False
    return True


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp_path, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
    os.replace(tmp_path, path)


def make_job_id(job_info: dict, pid: int) -> str:
    """Build a short id such as `4gpu_ddp-12345` from the config name (else the run name) and the pid."""
    name = job_info.get("config") or job_info.get("run_name") or "job"
    stem = Path(str(name)).stem or "job"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_.-")[:32] or "job"
    return f"{slug}-{pid}"


@dataclass(frozen=True)
class ControlRequest:
    """One request from a client, queued until the trainer applies it.

    Picklable, so the trainer can broadcast it from rank 0 to the other ranks; the
    client connection stays with the server, keyed by `request_id`.
    """

    command: str
    """One of `COMMANDS`."""
    request_id: str
    """Client-chosen id that the acknowledgement echoes."""
    received_time: float = field(default_factory=time.time)
    """Unix time at which rank 0 received the request."""


class ControlServer:
    """Rank 0's control socket and registry entry for one training job.

    Constructor: `job_info` is recorded in the registry; the known keys are
    `config`, `run_dir`, `run_name`, `max_steps`, `global_step` (the step a
    resumed run starts from), and `job_id` (default `make_job_id(job_info, pid)`).
    Other keys are stored under `info`.
    `runtime_dir` defaults to `runtime_dir()`.

    Checkpoint behaviour: the server stores no training state, so it has no
    state_dict. A resumed run starts a new server with a new job id; the step
    shown by `status` comes from the trainer's `update_status()` calls.
    """

    def __init__(self, job_info: dict, *, runtime_dir: str | Path | None = None):
        self.job_info = dict(job_info)
        self.pid = os.getpid()
        self.job_id = str(self.job_info.pop("job_id", None) or make_job_id(self.job_info, self.pid))
        self._runtime_dir = Path(runtime_dir) if runtime_dir is not None else None
        self.socket_path: Path | None = None
        self.registry_path: Path | None = None
        self.start_time = time.time()

        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[ControlRequest] = queue.SimpleQueue()
        self._pending: dict[str, socket.socket] = {}
        # A resumed run has a step before its first update_status() call.
        self._status: dict[str, Any] = {}
        if isinstance(self.job_info.get("global_step"), int):
            self._status["global_step"] = self.job_info["global_step"]
        self._step_times: collections.deque[tuple[float, int]] = collections.deque(maxlen=_ETA_WINDOW)
        self._latest_step_time: tuple[float, int] | None = None
        self._last_registry_write = 0.0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> "ControlServer":
        """Create the socket (mode 0600), write the registry entry and start the accept thread."""
        directory = self._runtime_dir or runtime_dir()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.socket_path = directory / f"{self.job_id}.sock"
        self.registry_path = directory / f"{self.job_id}.json"
        if len(os.fsencode(self.socket_path)) > _MAX_SOCKET_PATH:
            raise LmforgeError(
                f"control socket path {self.socket_path} is longer than the {_MAX_SOCKET_PATH}-byte limit "
                "for Unix domain sockets",
                hint=f"set {RUNTIME_DIR_ENV} to a shorter directory",
            )
        if self.registry_path.exists():
            logger.warning("Replacing the stale registry entry %s (its pid was reused)", self.registry_path)
        self.socket_path.unlink(missing_ok=True)

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        # Set the mode before listen(), so no other user can connect in between
        # (connections to a bound socket that does not listen yet are refused).
        os.chmod(self.socket_path, 0o600)
        listener.listen(8)
        listener.settimeout(0.2)
        self._listener = listener

        self._write_registry(force=True)
        self._thread = threading.Thread(target=self._accept_loop, name=f"lmforge-control-{self.job_id}", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        logger.info("Control socket for job %s: %s (lmforge control status %s)", self.job_id, self.socket_path, self.job_id)
        return self

    def close(self) -> None:
        """Stop listening, reject requests that were never applied, remove the socket and registry entry."""
        if self._closing.is_set():
            return
        self._closing.set()
        atexit.unregister(self.close)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

        step = self._status.get("global_step")
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            self.acknowledge(request, step, f"job exited at step {step} before applying '{request.command}'", ok=False)
        for request_id in list(self._pending):
            self._send_reply(request_id, {"ok": False, "error": f"job exited at step {step} before applying the request"})

        for path in (self.socket_path, self.registry_path):
            if path is not None:
                path.unlink(missing_ok=True)
        logger.debug("Control server for job %s closed", self.job_id)

    def __enter__(self) -> "ControlServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- trainer API ----------------------------------------------------------------

    def poll(self) -> list[ControlRequest]:
        """Return the requests received since the last call, oldest first, without blocking."""
        requests = []
        while True:
            try:
                requests.append(self._queue.get_nowait())
            except queue.Empty:
                return requests

    def acknowledge(self, request: ControlRequest, step: int | None, message: str, *, ok: bool = True) -> None:
        """Send the client the step at which `request` took effect and a message (e.g. the checkpoint path).

        `ok=False` reports that the request was not applied, with `message` as the reason.
        A client that has gone away is logged and otherwise ignored.
        """
        if ok:
            reply = {"ok": True, "command": request.command, "step": step, "message": message}
        else:
            reply = {"ok": False, "command": request.command, "step": step, "error": message}
        logger.info("Control request '%s' for job %s at step %s: %s", request.command, self.job_id, step, message)
        self._send_reply(request.request_id, reply)

    def update_status(self, status: dict) -> None:
        """Record the values that `control status` shows.

        Known keys: `global_step`, `max_steps`, `tokens`, `loss`, `learning_rate`,
        `tokens_per_second`, `epoch`; others are shown as given. The registry's
        current step is rewritten at most once a second.
        """
        with self._lock:
            self._status.update(status)
            step = self._status.get("global_step")
        if isinstance(step, int):
            self._record_step_time(time.monotonic(), step)
        self._write_registry()

    # -- internals ----------------------------------------------------------------------

    def _record_step_time(self, now: float, step: int) -> None:
        """Store the newest (time, step), and keep a sample of it at most once per `_ETA_SAMPLE_INTERVAL_S`.

        The ETA spans the oldest kept sample to the newest step, about two minutes
        of training, so a short stall or burst does not swing it.
        """
        self._latest_step_time = (now, step)
        if not self._step_times or now - self._step_times[-1][0] >= _ETA_SAMPLE_INTERVAL_S:
            self._step_times.append((now, step))

    def _eta_seconds(self, step: int | None, max_steps: int | None) -> float | None:
        if step is None or not max_steps or max_steps <= 0 or not self._step_times or self._latest_step_time is None:
            return None
        first_time, first_step = self._step_times[0]
        last_time, last_step = self._latest_step_time
        if last_step <= first_step or last_time <= first_time:
            return None
        seconds_per_step = (last_time - first_time) / (last_step - first_step)
        return max(0, max_steps - step) * seconds_per_step

    def status_reply(self) -> dict:
        """Build the reply to a `status` request from the last `update_status()` values."""
        with self._lock:
            status = dict(self._status)
        step = status.get("global_step")
        max_steps = status.get("max_steps", self.job_info.get("max_steps"))
        status.setdefault("max_steps", max_steps)
        status["eta_seconds"] = self._eta_seconds(step, max_steps)
        return {
            "ok": True,
            "command": "status",
            "job_id": self.job_id,
            "pid": self.pid,
            "step": step,
            "config": self.job_info.get("config"),
            "run_dir": self.job_info.get("run_dir"),
            "start_time": self.start_time,
            "status": status,
        }

    def _registry_record(self) -> dict:
        known = ("config", "run_dir", "run_name", "max_steps", "global_step")
        with self._lock:
            step = self._status.get("global_step")
            max_steps = self._status.get("max_steps", self.job_info.get("max_steps"))
        return {
            "job_id": self.job_id,
            "pid": self.pid,
            "process_start_ticks": _process_start_ticks(self.pid),
            "config": self.job_info.get("config"),
            "run_dir": str(self.job_info["run_dir"]) if self.job_info.get("run_dir") else None,
            "run_name": self.job_info.get("run_name"),
            "start_time": self.start_time,
            "socket": str(self.socket_path),
            "global_step": step,
            "max_steps": max_steps,
            "updated_time": time.time(),
            "info": {key: value for key, value in self.job_info.items() if key not in known},
        }

    def _write_registry(self, force: bool = False) -> None:
        if self.registry_path is None or self._closing.is_set():
            return
        now = time.monotonic()
        if not force and now - self._last_registry_write < _REGISTRY_WRITE_INTERVAL_S:
            return
        self._last_registry_write = now
        try:
            _write_json_atomic(self.registry_path, self._registry_record())
        except (OSError, TypeError, ValueError) as exc:
            logger.warning("Could not write the control registry entry %s: %s", self.registry_path, exc)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if not self._closing.is_set():
                    logger.warning("Control socket accept failed for job %s: %s", self.job_id, exc)
                return
            try:
                self._handle_connection(conn)
            except Exception:  # one bad client must not stop the accept thread
                logger.exception("Control request handling failed for job %s", self.job_id)
                conn.close()

    def _handle_connection(self, conn: socket.socket) -> None:
        conn.settimeout(_CLIENT_READ_TIMEOUT_S)
        try:
            line = _read_line(conn)
            message = json.loads(line)
            command = message["command"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("Ignoring a malformed control request for job %s: %s", self.job_id, exc)
            _send_line(conn, {"ok": False, "error": f"malformed request: {exc}"})
            conn.close()
            return

        if command == "status":
            _send_line(conn, self.status_reply())
            conn.close()
            return
        if command not in TRAINER_COMMANDS:
            _send_line(conn, {"ok": False, "error": f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}"})
            conn.close()
            return

        request = ControlRequest(command=command, request_id=str(message.get("request_id") or uuid.uuid4().hex))
        conn.settimeout(None)
        with self._lock:
            self._pending[request.request_id] = conn
        logger.info("Control request '%s' received for job %s; it applies at the next step boundary", command, self.job_id)
        self._queue.put(request)

    def _send_reply(self, request_id: str, reply: dict) -> None:
        with self._lock:
            conn = self._pending.pop(request_id, None)
        if conn is None:
            return
        reply = {"job_id": self.job_id, "request_id": request_id, **reply}
        try:
            conn.settimeout(_CLIENT_READ_TIMEOUT_S)
            _send_line(conn, reply)
        except OSError as exc:
            logger.info("Client of request %s for job %s left before the reply: %s", request_id, self.job_id, exc)
        finally:
            conn.close()


def _read_line(conn: socket.socket) -> str:
    """Read one newline-terminated line (UTF-8) from `conn`; raise ValueError on EOF before the newline."""
    chunks = []
    size = 0
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            raise ValueError("connection closed before a complete line arrived")
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            break
        if size > _MAX_REQUEST_BYTES:
            raise ValueError(f"line longer than {_MAX_REQUEST_BYTES} bytes")
    data = b"".join(chunks)
    return data[: data.index(b"\n")].decode("utf-8")


def _send_line(conn: socket.socket, payload: dict) -> None:
    conn.sendall((json.dumps(payload, default=str) + "\n").encode("utf-8"))


# -- client side ----------------------------------------------------------------------


@dataclass
class JobRecord:
    """One registry entry, with `alive` computed when it was read."""

    job_id: str
    pid: int
    socket: str
    config: str | None = None
    run_dir: str | None = None
    run_name: str | None = None
    start_time: float | None = None
    global_step: int | None = None
    max_steps: int | None = None
    updated_time: float | None = None
    process_start_ticks: int | None = None
    info: dict = field(default_factory=dict)
    alive: bool = True
    registry_path: Path | None = None

    @classmethod
    def from_file(cls, path: Path) -> "JobRecord":
        data = json.loads(path.read_text())
        known = {name for name in cls.__dataclass_fields__ if name not in ("alive", "registry_path")}
        record = cls(**{key: value for key, value in data.items() if key in known})
        record.registry_path = path
        record.alive = pid_alive(record.pid, record.process_start_ticks)
        return record

    def to_dict(self) -> dict:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["registry_path"] = str(self.registry_path) if self.registry_path else None
        return data


class JobRegistry:
    """The per-user registry of training jobs: one `JOB_ID.json` per job in the runtime directory."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else runtime_dir(create=False)

    def jobs(self) -> list[JobRecord]:
        """Return every entry, live or dead, oldest first; unreadable entries are logged and skipped."""
        if not self.directory.is_dir():
            return []
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                records.append(JobRecord.from_file(path))
            except FileNotFoundError:
                continue  # the job closed while we listed
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("Skipping unreadable control registry entry %s: %s", path, exc)
        return sorted(records, key=lambda record: record.start_time or 0.0)

    def find(self, job_ref: str) -> JobRecord:
        """Return the entry whose id equals `job_ref`, or the only one whose id starts with it or whose pid it is."""
        records = self.jobs()
        for record in records:
            if record.job_id == job_ref:
                return record
        matches = [r for r in records if r.job_id.startswith(job_ref) or str(r.pid) == job_ref]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            known = ", ".join(r.job_id for r in records) or "none"
            raise LmforgeError(
                f"no training job {job_ref!r} in the control registry {self.directory} (jobs: {known})",
                hint="`lmforge control list` shows the jobs and their ids",
            )
        raise LmforgeError(
            f"job id {job_ref!r} matches several jobs: {', '.join(r.job_id for r in matches)}",
            hint="give the full job id",
        )

    def remove_dead(self) -> list[JobRecord]:
        """Delete the registry entries and sockets of jobs whose process has exited; return them."""
        removed = []
        for record in self.jobs():
            if record.alive:
                continue
            for path in (record.registry_path, Path(record.socket)):
                if path is not None:
                    path.unlink(missing_ok=True)
            removed.append(record)
        # Sockets left without a registry entry (a job killed between the two unlinks).
        live_sockets = {Path(r.socket) for r in self.jobs()}
        for sock in self.directory.glob("*.sock") if self.directory.is_dir() else ():
            if sock not in live_sockets and not (sock.with_suffix(".json")).exists():
                sock.unlink(missing_ok=True)
        return removed


class ControlTimeoutError(LmforgeError):
    """No acknowledgement arrived in time; the request stays queued in the job."""


def send_request(record: JobRecord, command: str, *, timeout: float = 300.0) -> dict:
    """Send `command` to the job and wait for its acknowledgement; return the reply dict.

    Raise `LmforgeError` when the job is not running, the socket refuses the
    connection, the job exits before applying the request or rejects it, and
    `ControlTimeoutError` when no reply arrives within `timeout` seconds.
    """
    if command not in COMMANDS:
        raise LmforgeError(f"unknown control command {command!r}; expected one of {', '.join(COMMANDS)}")
    if not record.alive:
        raise LmforgeError(
            f"job {record.job_id} (pid {record.pid}) is not running; its registry entry is stale",
            hint="`lmforge control cleanup` removes entries of jobs that have exited",
        )

    request_id = uuid.uuid4().hex
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(min(timeout, 10.0))
    try:
        try:
            conn.connect(record.socket)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise LmforgeError(
                f"could not connect to job {record.job_id} (pid {record.pid}) at {record.socket}: {exc.strerror}",
                hint="the job may be shutting down; `lmforge control list` shows whether it still runs",
            ) from None
        _send_line(conn, {"command": command, "request_id": request_id})
        conn.settimeout(timeout)
        try:
            line = _read_line(conn)
        except socket.timeout:
            raise ControlTimeoutError(
                f"timed out after {timeout:g} s waiting for job {record.job_id} to acknowledge '{command}'; "
                "the request stays queued and applies at the job's next optimizer step",
                hint="a step may take longer than the timeout: pass a larger --timeout, "
                "or check the job's log for a hang",
            ) from None
        except ValueError:
            if command == "abort" and _wait_for_exit(record, 10.0):
                return {"ok": True, "command": command, "step": None, "message": "job exited"}
            state = "has exited" if not pid_alive(record.pid, record.process_start_ticks) else "is still running"
            raise LmforgeError(
                f"job {record.job_id} closed the connection without acknowledging '{command}' (pid {record.pid} {state})",
                hint="check the job's log for the reason",
            ) from None
    finally:
        conn.close()

    reply = json.loads(line)
    if not reply.get("ok"):
        raise LmforgeError(f"job {record.job_id} did not apply '{command}': {reply.get('error', 'no reason given')}")
    return reply


def _wait_for_exit(record: JobRecord, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(record.pid, record.process_start_ticks):
            return True
        time.sleep(0.05)
    return False


def abort_job(record: JobRecord, *, grace: float = 30.0) -> dict:
    """Send `abort`; when the job does not reach a step boundary within `grace` seconds, kill it.

    A hung step (a stuck collective, a stalled data loader) never reaches the
    boundary, so after `grace` seconds rank 0's process gets SIGKILL; torchrun
    then stops the other local ranks. Its registry entry and socket are removed.
    Return the acknowledgement, or a reply whose message states that the job was killed.
    """
    try:
        return send_request(record, "abort", timeout=grace)
    except ControlTimeoutError:
        pass

    logger.warning("Job %s did not acknowledge 'abort' within %g s; sending SIGKILL to pid %d", record.job_id, grace, record.pid)
    try:
        os.kill(record.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if not _wait_for_exit(record, 10.0):
        raise LmforgeError(f"job {record.job_id} (pid {record.pid}) is still running 10 s after SIGKILL")
    for path in (record.registry_path, Path(record.socket)):
        if path is not None:
            path.unlink(missing_ok=True)
    return {
        "ok": True,
        "command": "abort",
        "step": None,
        "message": f"no step boundary within {grace:g} s; killed pid {record.pid} with SIGKILL",
    }

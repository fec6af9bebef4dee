"""ControlServer, JobRegistry and send_request against a real socket in this process."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from lmforge.errors import LmforgeError
from lmforge.train.control import ControlServer, JobRegistry, runtime_dir, send_request


def _request_in_thread(record, command, timeout=30.0):
    """Send `command` from a thread; return (thread, result dict with 'reply' or 'error')."""
    result = {}

    def run():
        try:
            result["reply"] = send_request(record, command, timeout=timeout)
        except LmforgeError as exc:
            result["error"] = str(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _poll_until_request(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        requests = server.poll()
        if requests:
            return requests
        time.sleep(0.02)
    raise AssertionError(f"no request arrived within {timeout} s")


def test_socket_and_directory_permissions(control_dir):
    control_dir.chmod(0o755)
    assert runtime_dir() == control_dir
    assert stat.S_IMODE(control_dir.stat().st_mode) == 0o700

    with ControlServer({"job_id": "perm", "config": "a.yaml", "run_dir": "/r"}) as server:
        mode = server.socket_path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        assert server.socket_path.parent == control_dir


def test_registry_entry_fields(control_dir):
    with ControlServer({"config": "open_orca.yaml", "run_dir": "/runs/a", "max_steps": 40}) as server:
        assert server.job_id == f"open_orca-{os.getpid()}"
        entry = json.loads((control_dir / f"{server.job_id}.json").read_text())
        assert entry["pid"] == os.getpid()
        assert entry["config"] == "open_orca.yaml"
        assert entry["run_dir"] == "/runs/a"
        assert entry["max_steps"] == 40
        assert entry["global_step"] is None
        assert entry["start_time"] == pytest.approx(server.start_time)

        server.update_status({"global_step": 7})
        server._write_registry(force=True)
        (record,) = JobRegistry().jobs()
        assert record.global_step == 7
        assert record.alive
    assert list(control_dir.iterdir()) == []


def test_status_answered_without_poll(control_dir):
    with ControlServer({"job_id": "st", "max_steps": 100}) as server:
        server.update_status({"global_step": 10, "loss": 2.5, "tokens": 10240, "learning_rate": 3e-4})
        server.update_status({"global_step": 20, "loss": 2.25})
        reply = send_request(JobRegistry().find("st"), "status", timeout=5)
    assert reply["step"] == 20
    assert reply["status"]["loss"] == 2.25
    assert reply["status"]["tokens"] == 10240
    assert reply["status"]["learning_rate"] == 3e-4
    assert reply["status"]["max_steps"] == 100


def test_eta_from_step_time_samples(control_dir):
    server = ControlServer({"job_id": "eta", "max_steps": 100})
    server.update_status({"global_step": 30})
    server._step_times.clear()
    server._record_step_time(100.0, 10)
    server._record_step_time(101.0, 15)
    server._record_step_time(101.5, 18)  # under 1 s after the last sample: not kept
    server._record_step_time(104.0, 30)
    assert [step for _, step in server._step_times] == [10, 15, 30]
    # From the oldest sample to the newest step: 20 steps in 4 s, 0.2 s per step; 70 steps remain.
    assert server.status_reply()["status"]["eta_seconds"] == pytest.approx(70 * 0.2)


def test_save_acknowledged_with_step(control_dir):
    with ControlServer({"job_id": "ack"}) as server:
        record = JobRegistry().find("ack")
        thread, result = _request_in_thread(record, "save")
        (request,) = _poll_until_request(server)
        assert request.command == "save"
        server.acknowledge(request, 42, "checkpoint written to /runs/a/checkpoints/checkpoint-42")
        thread.join(timeout=10)
    assert result["reply"]["step"] == 42
    assert result["reply"]["message"].endswith("checkpoint-42")
    assert result["reply"]["job_id"] == "ack"


def test_rejected_request_is_an_error(control_dir):
    with ControlServer({"job_id": "rej"}) as server:
        thread, result = _request_in_thread(JobRegistry().find("rej"), "start-annealing")
        (request,) = _poll_until_request(server)
        server.acknowledge(request, 5, "decay_start_step is 30, not -1", ok=False)
        thread.join(timeout=10)
    assert "did not apply 'start-annealing'" in result["error"]
    assert "decay_start_step is 30" in result["error"]


def test_request_pending_at_close_is_rejected(control_dir, wait_for):
    server = ControlServer({"job_id": "gone"}).start()
    server.update_status({"global_step": 3})
    thread, result = _request_in_thread(JobRegistry().find("gone"), "save")
    wait_for(lambda: server._pending)
    server.close()
    thread.join(timeout=10)
    assert "job exited at step 3" in result["error"]


def test_acknowledgement_timeout_message(control_dir):
    with ControlServer({"job_id": "slow"}) as server:
        with pytest.raises(LmforgeError, match=r"timed out after 0.3 s .* 'save'.*stays queued"):
            send_request(JobRegistry().find("slow"), "save", timeout=0.3)
        (request,) = server.poll()
        assert request.command == "save"


def test_unknown_job_and_ambiguous_prefix(control_dir):
    with ControlServer({"job_id": "alpha-1"}), ControlServer({"job_id": "alpha-2"}):
        registry = JobRegistry()
        with pytest.raises(LmforgeError, match=r"no training job 'beta'.*alpha-1, alpha-2"):
            registry.find("beta")
        with pytest.raises(LmforgeError, match="matches several jobs"):
            registry.find("alpha")
        assert registry.find("alpha-2").job_id == "alpha-2"


def test_dead_job_marked_refused_and_cleaned(control_dir):
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(child.stdout)
    entry = {"job_id": "dead", "pid": dead_pid, "socket": str(control_dir / "dead.sock"), "global_step": 12}
    (control_dir / "dead.json").write_text(json.dumps(entry))
    (control_dir / "dead.sock").write_text("")

    with ControlServer({"job_id": "live"}):
        registry = JobRegistry()
        states = {record.job_id: record.alive for record in registry.jobs()}
        assert states == {"dead": False, "live": True}
        with pytest.raises(LmforgeError, match=rf"job dead \(pid {dead_pid}\) is not running"):
            send_request(registry.find("dead"), "save")

        removed = registry.remove_dead()
        assert [record.job_id for record in removed] == ["dead"]
        assert sorted(path.name for path in control_dir.iterdir()) == ["live.json", "live.sock"]


def test_reused_pid_counts_as_dead(control_dir):
    with ControlServer({"job_id": "reuse"}) as server:
        entry = json.loads(server.registry_path.read_text())
        entry["process_start_ticks"] += 1
        server.registry_path.write_text(json.dumps(entry))
        assert not JobRegistry().find("reuse").alive


def test_unknown_command_rejected_by_server(control_dir):
    import socket

    with ControlServer({"job_id": "cmd"}) as server:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(5)
        conn.connect(str(server.socket_path))
        conn.sendall(b'{"command": "reboot"}\n')
        reply = json.loads(conn.makefile().readline())
        conn.close()
        assert reply["ok"] is False
        assert "unknown command 'reboot'" in reply["error"]
        assert server.poll() == []

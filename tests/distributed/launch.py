"""torchrun command lines for the distributed tests, on loopback with a free port."""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def free_port() -> int:
    """Return a loopback TCP port that is free right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(nproc: int, script: str | Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(script),
        *map(str, args),
    ]

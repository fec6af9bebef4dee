"""A step loop around a real ControlServer, standing in for the trainer in the control tests.

Usage: step_loop_job.py JOB_ID RUN_DIR STEP_SECONDS MAX_STEPS. Each "step" sleeps,
then updates the status and applies queued requests the way the trainer does at
an optimizer-step boundary: `save` writes RUN_DIR/checkpoint-STEP, `save-stop`
also exits 0, `stop` exits 0, `abort` exits 3 at once, `start-annealing` records
the step in RUN_DIR/annealing_step.
"""

import os
import sys
import time
from pathlib import Path

from lmforge.train.control import ControlServer

job_id, run_dir, step_seconds, max_steps = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
server = ControlServer({"job_id": job_id, "config": "loop.yaml", "run_dir": str(run_dir), "max_steps": max_steps})
server.start()

annealing = False
for step in range(1, max_steps + 1):
    time.sleep(step_seconds)
    server.update_status(
        {"global_step": step, "tokens": step * 1024, "loss": 10.0 / step, "learning_rate": 1e-4, "tokens_per_second": 2048.0}
    )
    for request in server.poll():
        if request.command in ("save", "save-stop"):
            checkpoint = run_dir / f"checkpoint-{step}"
            checkpoint.mkdir()
            server.acknowledge(request, step, f"checkpoint written to {checkpoint}")
            if request.command == "save-stop":
                server.close()
                sys.exit(0)
        elif request.command == "stop":
            server.acknowledge(request, step, "stopping without a checkpoint")
            server.close()
            sys.exit(0)
        elif request.command == "abort":
            server.acknowledge(request, step, "aborting")
            os._exit(3)
        elif request.command == "start-annealing":
            if annealing:
                server.acknowledge(request, step, "the decay has already started", ok=False)
            else:
                annealing = True
                (run_dir / "annealing_step").write_text(str(step))
                server.acknowledge(request, step, f"decay starts at step {step}")
server.close()

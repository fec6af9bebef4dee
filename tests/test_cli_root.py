"""The console script's root: help, and how errors reach the user."""


def test_help_lists_root_options(run_lmforge):
    proc = run_lmforge("--help", check=True)
    assert "--template" in proc.stdout
    assert "--project" in proc.stdout
    assert "--debug" in proc.stdout


def test_unknown_command_is_usage_error(run_lmforge):
    proc = run_lmforge("no-such-command")
    assert proc.returncode == 2
    assert "No such command" in proc.stderr
    assert "Traceback" not in proc.stderr

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


def test_exit_code_of_command_propagates(tmp_path):
    """A command ending with `raise typer.Exit(3)` (as `train` does with torchrun's status) exits 3."""
    import subprocess
    import sys

    script = tmp_path / "exit3.py"
    script.write_text(
        "import sys, typer\n"
        "from lmforge.cli import main\n"
        "@main.app.command('exit-three')\n"
        "def exit_three():\n"
        "    raise typer.Exit(3)\n"
        "sys.argv = ['lmforge', 'exit-three']\n"
        "main.run()\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr

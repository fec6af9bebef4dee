"""`logs plot`: image size, outlier clipping, smoothing, overlaid runs and bad input."""

from __future__ import annotations

import struct

import pytest

from lmforge.errors import LmforgeError
from lmforge.logs.plot import build_figure, moving_average, outlier_limits
from lmforge.logs.reader import read_trainer_log


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_outlier_limits_tukey_fences():
    # Q1 = 1.0, Q3 = 2.0, IQR = 1.0, so the fences are [-2.0, 5.0]; 40.0 is outside.
    values = [1.0, 1.0, 1.5, 2.0, 2.0, 40.0]
    assert outlier_limits(values) == pytest.approx((1.0 - 0.05, 2.0 + 0.05))
    assert outlier_limits([3.0, 3.0]) == pytest.approx((3.0 - 0.15, 3.0 + 0.15))
    assert outlier_limits([]) is None


def test_moving_average_trailing_window():
    assert moving_average([2.0, 4.0, 6.0, 8.0], 2) == [2.0, 3.0, 5.0, 7.0]
    assert moving_average([2.0, 4.0], 1) == [2.0, 4.0]


def test_grad_norm_outlier_clipped_by_default(model_dir):
    log = read_trainer_log(model_dir / "runs" / "first" / "trainer_logs.json")
    # Grad norms sorted: 1, 2, 3, 40, 1000. Q1 = 2, Q3 = 40, IQR = 38, so the upper fence is
    # 40 + 3 * 38 = 154 and the y-range covers [1, 40] plus a 5% margin (1.95).
    log.records.append({"global_step": 9, "loss": 3.0, "grad_norm": 1000.0, "learning_rate": 5e-5})
    clipped = build_figure([log], panels=["grad_norm"])
    low, high = clipped.axes[0].get_ylim()
    assert (low, high) == pytest.approx((1.0 - 1.95, 40.0 + 1.95))

    full = build_figure([log], panels=["grad_norm"], ignore_outliers=False)
    low, high = full.axes[0].get_ylim()
    assert (low, high) == pytest.approx((1.0 - 49.95, 1000.0 + 49.95))


def test_loss_panel_has_lr_axis_and_eval(model_dir):
    log = read_trainer_log(model_dir / "runs" / "first" / "trainer_logs.json")
    figure = build_figure([log], panels=["loss"], smooth=2)
    loss_axis, lr_axis = figure.axes
    labels = [line.get_label() for line in loss_axis.get_lines()]
    assert "first train loss" in labels
    assert "first eval loss" in labels
    assert [line.get_label() for line in lr_axis.get_lines()] == ["first LR"]
    smoothed = next(line for line in loss_axis.get_lines() if line.get_label() == "first train loss")
    assert list(smoothed.get_ydata()) == [5.0, 4.5, 3.5, 3.25]


def test_cli_png_of_expected_size(model_dir, run_lmforge, tmp_path):
    default = run_lmforge("logs", "plot", model_dir, check=True)
    default_path = model_dir / "runs" / "first" / "loss_curves.png"
    assert f"wrote {default_path}" in default.stdout
    assert _png_size(default_path) == (1200, 800)

    out = tmp_path / "plots" / "all.png"
    run_lmforge(
        "logs", "plot", "--loss-curves", "--grad-norm", "--lr", "--no-ignore-outliers", "--smooth", "3",
        "--size", "640x480", "-o", out, model_dir / "runs" / "first" / "trainer_logs.json", check=True,
    )
    assert _png_size(out) == (640, 480)
    assert not list(out.parent.glob(".*tmp*"))


def test_cli_overlays_two_runs(model_dir, resumed_log_text, tmp_path, run_lmforge):
    other = tmp_path / "other" / "runs" / "first"
    other.mkdir(parents=True)
    (other / "trainer_logs.json").write_text(resumed_log_text)
    log_a = read_trainer_log(model_dir / "runs" / "first" / "trainer_logs.json")
    log_b = read_trainer_log(other / "trainer_logs.json")
    figure = build_figure([log_a, log_b], panels=["grad_norm"])
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["model/first", "other/first"]

    out = tmp_path / "both.png"
    run_lmforge("logs", "plot", "--grad-norm", "-o", out, model_dir, other.parent.parent, check=True)
    assert _png_size(out) == (1200, 800)


def test_cli_rejects_missing_and_empty_logs(tmp_path, run_lmforge):
    missing = run_lmforge("logs", "plot", tmp_path / "runs" / "nothing")
    assert missing.returncode == 2
    assert "error: log path not found" in missing.stderr

    log = tmp_path / "trainer_logs.json"
    log.write_text("")
    empty = run_lmforge("logs", "plot", log)
    assert empty.returncode == 2
    assert "is empty" in empty.stderr

    log.write_text('[\n{"event": "start", "time": 1.0, "global_step": 0}')
    start_only = run_lmforge("logs", "plot", log)
    assert start_only.returncode == 2
    assert "contains no training records (1 records in all); nothing to plot" in start_only.stderr
    assert not list(tmp_path.glob("*.png"))


def test_bad_plot_options(model_dir, tmp_path, run_lmforge):
    log = read_trainer_log(model_dir / "runs" / "first" / "trainer_logs.json")
    with pytest.raises(LmforgeError, match="invalid smoothing window 0"):
        build_figure([log], smooth=0)
    result = run_lmforge("logs", "plot", "-o", tmp_path / "x.jpg", model_dir)
    assert "unsupported plot file type '.jpg'" in result.stderr
    result = run_lmforge("logs", "plot", "--size", "12", model_dir)
    assert "invalid --size '12'" in result.stderr

"""Analysis report: files are written and the numbers equal those recomputed from the stats."""

import torch

from camera_pl import collect_stats
from camera_pl.stats.analysis import energy_shares, routing_frequency, write_report
from camera_pl.testing import tiny_moe

from conftest import make_batch


def test_report_files_and_numbers(tmp_path):
    stats = collect_stats(tiny_moe("qwen2_moe"), [make_batch(seed=s) for s in range(3)])
    path = write_report(stats, tmp_path, fractions=(0.1, 0.5))
    assert (tmp_path / "scores.png").stat().st_size > 1000 and (tmp_path / "routing.png").stat().st_size > 1000
    shares = energy_shares(stats, (0.1, 0.5))
    for index, s in stats.scores("camera").items():
        flat = torch.cat([s.routed.flatten(), s.shared]).double().sort(descending=True).values
        want = float(flat[: round(0.1 * flat.numel())].sum() / flat.sum())
        assert abs(shares[index][0.1] - want) < 1e-9
        assert shares[index][0.1] < shares[index][0.5] <= 1.0
    text = path.read_text()
    for index in stats.layers:
        assert f"| {index} | {100 * shares[index][0.1]:.1f}% | {100 * shares[index][0.5]:.1f}% |" in text
    freq = routing_frequency(stats)
    assert all(abs(float(f.sum()) - 1) < 1e-6 for f in freq.values())


def test_without_matplotlib_the_report_and_run_skip_figures(tmp_path, monkeypatch):
    """matplotlib is an extra: without it the Markdown report and a run's metrics are still written."""
    import camera_pl.plots
    from camera_pl.workflows.runner import RunContext, _plot_metrics

    monkeypatch.setattr(camera_pl.plots, "pyplot", lambda: None)
    stats = collect_stats(tiny_moe("qwen2_moe"), [make_batch()])
    text = write_report(stats, tmp_path).read_text()
    assert "camera_pl[plots]" in text and not (tmp_path / "scores.png").exists()
    logs = []
    ctx = RunContext.__new__(RunContext)
    ctx.metrics, ctx.run_dir, ctx.log = [{"label": "dense", "perplexity": 12.0}], tmp_path, logs.append
    _plot_metrics(ctx)
    assert not (tmp_path / "metrics.png").exists() and "metrics.png skipped" in logs[0]

"""python -m dgxtrain.tools.report draws the plots from a real run's metrics.jsonl."""

import pytest

from dgxtrain.loop.train import train
from dgxtrain.tools import report
from tests.conftest import compose_cfg

image = pytest.importorskip("matplotlib.image", reason="the plots extra (matplotlib)")


def test_report_renders_non_trivial_pngs(tmp_path):
    run_dir = tmp_path / "run"
    train(compose_cfg(["device=cpu", "logger=none", "trainer.max_steps=60",
                       "trainer.log_every=5", "trainer.eval_every=20"]), run_dir)
    assert report.main([str(run_dir)]) == 0
    names = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert names == ["loss.png", "lr.png", "step_time.png", "throughput.png"]
    for name in names:
        pixels = image.imread(run_dir / "plots" / name)
        assert pixels.shape[:2] == (450, 800)
        # Not blank: many distinct colours (axes, text, lines, filled areas).
        assert len({tuple(px) for px in pixels.reshape(-1, pixels.shape[-1])[::7]}) > 20


def test_report_without_metrics_says_what_to_give(tmp_path, caplog):
    assert report.main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in caplog.text

"""What people read after a run: the Markdown summary and the loss-curve picture."""

from __future__ import annotations

from pathlib import Path

from lora_ops.training.gate import decide_gate
from lora_ops.training.report import gate_markdown, plot_loss_curve


def test_report_has_figures_and_replies(tmp_path: Path) -> None:
    gate = decide_gate(3.5, 0.5, None)
    text = gate_markdown(
        "acme",
        gate,
        [{"prompt": "a|b", "base": "x", "candidate": "y"}],
        run_url="http://mlflow/run",
        version="3",
    )
    assert "# acme: gate passed" in text
    assert "| candidate | 0.5000 |" in text
    assert "a\\|b" in text
    assert "Registered version: 3" in text
    png = plot_loss_curve([3.0, 2.0, 1.0], tmp_path / "curve.png", base_eval_loss=3.2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

import numpy as np

import castore
from castore.tools.cli import main


def test_cli_lists_steps_stats_and_leaves(tmp_path, capsys):
    with castore.Store(tmp_path / "s") as s:
        s.save(3, {"agent": {"w": np.zeros((100, 10), np.float32), "n": 1}})
        s.save(9, {"agent": {"w": np.ones((100, 10), np.float32), "n": 2}})
    assert main(["steps", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.split() == ["3", "9"]
    assert main(["stats", str(tmp_path / "s")]) == 0
    assert "steps 2" in capsys.readouterr().out
    assert main(["show", str(tmp_path / "s"), "3"]) == 0
    out = capsys.readouterr().out
    assert "agent/w: array <f4 [100, 10] (4000 bytes)" in out and "agent/n: value" in out


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["steps", str(tmp_path / "missing")]) == 1
    assert "no castore store" in capsys.readouterr().err

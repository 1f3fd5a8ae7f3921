"""tools/benchmark_rerank.py runs both sides on a small problem and finds them identical."""
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["rerank-market", "chunked-distractors"])
def test_benchmark_rerank_quick(case, tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, osp.join(REPO, "tools", "benchmark_rerank.py"), "--case", case,
                           "--quick", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "identical: yes" in text and "| ratio" in text and "TPR@FPR" in text

"""tools/benchmark_rerank.py runs both sides on a small problem and finds them identical."""
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["rerank-market", "chunked-distractors", "rerank-msmt", "knn-msmt"])
def test_benchmark_rerank_quick(case, tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, osp.join(REPO, "tools", "benchmark_rerank.py"), "--case", case,
                           "--quick", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "TPR@FPR" in text and f"| {case} (" in text
    if case == "rerank-msmt":  # ours only: torchreid's dense arrays do not fit at this size
        assert "| ours |" in text and "| ratio" not in text
    elif case == "knn-msmt":  # faiss and torch find the same neighbours
        assert "| faiss |" in text and "| ratio torch/faiss" in text and "lists identical for 100.00%" in text
    else:
        assert "identical: yes" in text and "| ratio" in text

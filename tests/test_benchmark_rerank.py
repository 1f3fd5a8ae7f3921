"""tools/benchmark_rerank.py runs both sides on a small problem and finds them identical."""
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["rerank-market", "chunked-distractors", "rerank-msmt", "knn-msmt"])
def test_benchmark_rerank_quick(case, tmp_path):
    out, scratch = tmp_path / "table.md", tmp_path / "scratch"
    scratch.mkdir()
    proc = subprocess.run([sys.executable, osp.join(REPO, "tools", "benchmark_rerank.py"), "--case", case,
                           "--quick", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The children's distance matrices are not left behind (torch may keep its own compile cache there).
    assert [p.name for p in scratch.iterdir() if p.name.startswith("bench_rerank_")] == []
    text = out.read_text()
    assert "TPR@FPR" in text and f"| {case} (" in text
    if case == "rerank-msmt":  # ours only: torchreid's dense arrays do not fit at this size
        assert "| ours |" in text and "| ratio" not in text
    elif case == "knn-msmt":  # faiss and torch find the same neighbours
        assert "| faiss |" in text and "| ratio torch/faiss" in text and "lists identical for 100.00%" in text
    else:
        assert "identical: yes" in text and "| ratio" in text

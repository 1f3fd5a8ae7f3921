"""Helpers of the benchmark scripts in ``tools/``, kept in the package so that they are importable and tested:
:mod:`.measure` (FLOPs, parameters, memory, interleaved timing, the machine), :mod:`.report` (statistics,
Markdown tables, plots), :mod:`.spec` (the compared models) and :mod:`.pruning` (COP to a FLOP target)."""

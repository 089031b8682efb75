"""Comparing two models on the same queries: inputs (``inputs``), the paired tests
(``paired``), the written report (``report``) and ``python -m dml compare`` (``cli``)."""

"""dml: deep metric learning on PyTorch Lightning.

image -> backbone -> pooling -> head -> objective (every loss term) -> optimizer.

Entry points: ``python -m dml fit --config ...`` (``dml.cli``), the LightningModule
``dml.module.DMLModule`` built by ``dml.builder``, the objective ``dml.objective``, the
DataModules of ``dml.data``, the exact metrics ``dml.metrics.retrieval_metrics`` /
``dml.metrics.nmi``, GSP's ``dml.models.gsp``, the method callbacks of ``dml.callbacks``.
"""

__version__ = "0.1.0"

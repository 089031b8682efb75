"""dml: deep metric learning on PyTorch Lightning.

Entry points: ``python -m dml fit --config ...`` (``dml.cli``), the LightningModule
``dml.module.DMLModule``, the DataModules of ``dml.data``, the exact metrics
``dml.metrics.retrieval_metrics`` / ``dml.metrics.nmi``, GSP's ``dml.models.gsp``, the
cross-batch memory callback ``dml.callbacks.CrossBatchMemory``.
"""
__version__ = "0.1.0"

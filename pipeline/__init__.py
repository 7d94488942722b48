"""dpo-pipeline: DPO in auditable stages."""
__version__ = "0.1.0"

"""dpo-pipeline: DPO in auditable stages."""
__version__ = "0.1.0"

# The stages, in order; the Prefect flows and the command line share this.
STAGES = ("prepare", "score", "audit", "train")

"""dpo-pipeline: DPO in auditable stages."""
__version__ = "0.1.0"

# The stages, in order; the Prefect flows and the command line share this.
STAGES = ("prepare", "score", "audit", "train")

# The stages of a round of iterative DPO (`dpo rounds`), before the STAGES: sample completions from
# the policy, then judge them and pair them. Stage packages like the STAGES (tests/test_layering.py).
ROUND_STAGES = ("generate", "judge")

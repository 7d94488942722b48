"""Log-probabilities and losses: response log-probs of a causal LM (packing, the fused LM head), the
DPO-family losses, and the scoring backends (transformers, vLLM) that the score stage and the
audit both call."""

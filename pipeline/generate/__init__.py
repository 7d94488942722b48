"""The generate stage: prompts read once, then K completions per prompt sampled from a policy."""

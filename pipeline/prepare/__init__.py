"""The prepare stage: preference data read, validated and tokenized once into a dataset folder.

    stage.prepare(cfg)    # pipeline/prepare/stage.py: the stage; records.py: one row; encoder.py: tokens
"""

"""The score stage: log pi_ref(y|x) of every chosen and rejected response, once, into a sharded cache.

    stage.score(cfg)      # pipeline/score/stage.py: the stage; shards.py: one shard; runners.py: where shards run
"""

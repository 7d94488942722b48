"""The score stage: log pi_ref(y|x) of every chosen and rejected response, once, into a sharded cache.

    stage.score(cfg)      # pipeline/score/stage.py: the stage; shards.py: one shard (pipeline/workers.py: where shards run)
"""

"""The contract between the stages, one job per module. Stages never import each other: they meet
here and in the files on disk.

- paths: where each output lives and what identifies it (the identity whose fingerprint names
  its folder), file names, schema versions;
- trust: when to trust an output (its manifest, every file's sha256, a cache's values), and how
  closely two computations of the same log-probs agree;
- locate: the output for a config: where it goes, the verified one to read, the run's folder;
- shards: how a reference cache is cut into shards (``ShardPlan``);
- refvalues: the proof of a reference cache's values; metrics: a run's metrics log.

One verb scheme, x the kind of output (dataset, refscores, run; each has the verbs it needs):

    paths.<x>_dir(storage, name)        the folder of the output named ``name`` (its fingerprint;
                                        a run's: train.run_name or dpo-<fingerprint>)
    paths.<x>_identity(cfg, ...)        what determines its bytes; fingerprint() of it is the name
    locate.<x>_dir_for(cfg, ...)        the folder of the config's output, computed: nothing is read
                                        (a run's: a RunFolder, the one route to it)
    locate.find_<x>(cfg, ...)           the config's output, verified, or CacheError saying what to run
    trust.verified_<x>(directory)       its manifest once every file matches it, or CacheError
                                        (refscores, values=True: every value proven too; a run: its
                                        run.json summary, or None while unfinished)

An audit's folder is paths.audit_dir(storage, cache_fp), its reports paths.audit_report_path.
"""

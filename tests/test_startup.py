"""Fixed costs of a stage process (bench/startup_bench.py measures them): the scorer's self-check
is one probe of two forward passes that still refuses what it must; the commands import no
audit code (polars) for `dpo score` / `dpo train`; a stage run as the program ends without the
interpreter's teardown, after what that teardown is for (threads, exit handlers, output)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config.load import config_from_dict
from pipeline.errors import ModelError
from pipeline.logprobs.backends.transformers_backend import TransformersScorer
from pipeline.models import loading as models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def counted_scorer(demo_assets, monkeypatch):
    """scorer(edit=None) -> (TransformersScorer on the demo model, forward passes its __init__ ran);
    ``edit(model)`` may change the model before the scorer sees it."""
    real_load = models.load_causal_lm

    def make(edit=None, **score):
        passes = []

        def load(model_cfg, device="cpu"):
            model = real_load(model_cfg, device)
            model.get_decoder().register_forward_pre_hook(lambda *_: passes.append(1))
            if edit is not None:
                edit(model)
            return model

        monkeypatch.setattr(models, "load_causal_lm", load)
        cfg = config_from_dict({"data": {"path": "unused.jsonl"}, "model": {"path": str(demo_assets["model"])},
                                "score": {"device": "cpu", **score}})
        return TransformersScorer(cfg), len(passes)

    return make


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_the_self_check_is_two_forward_passes(counted_scorer, prefix_sharing):
    scorer, passes = counted_scorer(prefix_sharing=prefix_sharing)
    assert scorer.prefix_sharing is prefix_sharing
    assert passes == 2  # the model's own forward, and ours (shared when sharing)


def test_the_self_check_refuses_logits_it_does_not_reproduce(counted_scorer):
    def post_processed(model):  # an architecture that rescales its logits where we cannot see it
        forward = model.forward

        def scaled(*args, **kwargs):
            out = forward(*args, **kwargs)
            out.logits = out.logits * 1.5
            return out

        model.forward = scaled

    with pytest.raises(ModelError, match="post-processes its logits"):
        counted_scorer(post_processed)


def test_the_self_check_switches_off_sharing_that_disagrees(counted_scorer, monkeypatch, caplog):
    real_shared = TransformersScorer.score_shared

    def off_by_a_bit(self, *args, **kwargs):
        chosen, rejected = real_shared(self, *args, **kwargs)
        return [c + 0.01 for c in chosen], [r + 0.01 for r in rejected]

    monkeypatch.setattr(TransformersScorer, "score_shared", off_by_a_bit)
    with caplog.at_level(logging.WARNING, logger="dpo.score"):
        scorer, passes = counted_scorer(prefix_sharing=True)
    assert scorer.prefix_sharing is False
    assert "prefix sharing disagrees" in caplog.text
    assert passes == 3  # only a disagreement costs the third pass (no sharing) that tells which


def test_the_self_check_keeps_sharing_within_tolerance(counted_scorer, monkeypatch):
    """Shared vs the model beyond tolerance, but shared vs separate and separate vs the model each
    within it: sharing stays on, as when the two were checked apart."""
    from pipeline.logprobs.backends import transformers_backend

    real_own, real_shared = transformers_backend.own_logps, TransformersScorer.score_shared
    shift = np.float32(6e-4)  # tolerance 1e-3 in float32: 2 x 6e-4 is over it, 6e-4 is not
    monkeypatch.setattr(transformers_backend, "own_logps", lambda *a: [v + shift for v in real_own(*a)])

    def lower(self, *args, **kwargs):
        chosen, rejected = real_shared(self, *args, **kwargs)
        return [c - shift for c in chosen], [r - shift for r in rejected]

    monkeypatch.setattr(TransformersScorer, "score_shared", lower)
    scorer, passes = counted_scorer(prefix_sharing=True)
    assert scorer.prefix_sharing is True
    assert passes == 3


def test_commands_import_no_audit_code():
    code = "import sys, flows.cli.commands; print(sorted(m for m in ('polars', 'pipeline.audit.checks', 'pipeline.audit.report') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_exit_now_does_what_the_teardown_is_for(tmp_path):
    script = textwrap.dedent("""
        import atexit, sys, threading, time
        from pathlib import Path
        from flows.cli.main import exit_now

        out = Path(sys.argv[1])
        def late():
            time.sleep(0.3)
            (out / "thread").write_text("done")
        threading.Thread(target=late).start()
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        sys.stdout.write("last line")  # no newline: still in the buffer
        exit_now(3)
        print("not reached")
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "last line"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_the_hash_cache_serves_an_unchanged_file_and_rehashes_a_changed_one(tmp_path, monkeypatch, caplog):
    """Weights are hashed once (`dpo train` reuses what `dpo score` hashed), but any write to the
    file means a re-hash, even one that keeps its size and puts its mtime back."""
    import hashlib
    import os

    from pipeline import store

    monkeypatch.setenv("DPO_HASH_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    with caplog.at_level(logging.DEBUG, logger="dpo.store"):
        assert store.sha256_file(weights) == hashlib.sha256(b"a" * 4096).hexdigest()
        assert store.sha256_file(weights) == hashlib.sha256(b"a" * 4096).hexdigest()
    assert caplog.text.count("sha256 of model.safetensors") == 1  # the second answer came from the cache
    stamp = weights.stat()
    time.sleep(0.05)  # file times tick with the kernel's coarse clock (a few ms)
    with open(weights, "r+b") as fh:  # same size, same mtime afterwards
        fh.write(b"b")
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert weights.stat().st_mtime_ns == stamp.st_mtime_ns and weights.stat().st_size == stamp.st_size
    assert store.sha256_file(weights) == hashlib.sha256(b"b" + b"a" * 4095).hexdigest()

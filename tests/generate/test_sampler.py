"""The transformers sampler on the tiny demo model (float32, CPU): seeded per sequence, so the
tokens depend neither on the run nor on the batch; greedy equals a plain loop without cache; left
padding changes nothing; finish reasons; top_p."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config.schema import ModelConfig
from pipeline.generate.sampler import Sampling, TransformersSampler, next_tokens, sequence_seed, stop_ids
from pipeline.models.loading import load_causal_lm

TEXTS = ["Tell me about the black cat.", "Hi", "What colour is the sky today, my friend? Tell me, please.",
         "Describe the red frog.", "Why?"]


@pytest.fixture(scope="module")
def lm(demo_assets):
    torch.manual_seed(0)
    return load_causal_lm(ModelConfig(path=str(demo_assets["model"])))


@pytest.fixture(scope="module")
def prompts(demo_tokenizer) -> list[list[int]]:
    rendered = [demo_tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                   add_generation_prompt=True) for t in TEXTS]
    ids = demo_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert len({len(p) for p in ids}) > 2  # lengths differ: batches are padded
    return ids


def _sampler(lm, batch_size=8, stop=(2,)):
    return TransformersSampler(lm, stop=stop, pad_id=0, batch_size=batch_size)


def _seeds(n: int, samples: int = 2, seed: int = 0) -> list[int]:
    return [sequence_seed(seed, f"p{i}", s) for i in range(n) for s in range(samples)]


def _greedy_without_cache(lm, prompt: list[int], steps: int, stop=(2,)) -> list[int]:
    """The independent check: a full forward per step, no KV cache, argmax."""
    ids, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(steps):
            token = lm(torch.tensor([ids])).logits[0, -1].argmax().item()
            if token in stop:
                break
            out.append(token)
            ids.append(token)
    return out


def test_same_seeds_same_tokens_and_other_seeds_other_tokens(lm, prompts):
    work = [p for p in prompts for _ in range(2)]
    sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=12)
    first = _sampler(lm).sample(work, _seeds(len(prompts)), sampling)
    again = _sampler(lm).sample(work, _seeds(len(prompts)), sampling)
    other = _sampler(lm).sample(work, _seeds(len(prompts), seed=1), sampling)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    assert first[0].token_ids != first[1].token_ids  # two samples of one prompt differ


def test_the_batch_size_does_not_change_the_tokens(lm, prompts):
    """Exact in float32 on a CPU for this model (the rows' numbers do not depend on the batch)."""
    work = [p for p in prompts for _ in range(2)]
    sampling = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=12)
    runs = [_sampler(lm, batch_size=b).sample(work, _seeds(len(prompts)), sampling) for b in (1, 3, 16)]
    tokens = [[c.token_ids for c in run] for run in runs]
    assert tokens[0] == tokens[1] == tokens[2]


def test_greedy_equals_a_plain_loop_without_cache(lm, prompts):
    completions = _sampler(lm, batch_size=4).sample(prompts, _seeds(len(prompts), 1), Sampling(0.0, 1.0, 10))
    for prompt, completion in zip(prompts, completions):
        assert completion.token_ids == _greedy_without_cache(lm, prompt, 10)


def test_a_prompt_alone_equals_the_same_prompt_in_a_padded_batch(lm, prompts):
    sampling = Sampling(temperature=0.8, top_p=1.0, max_new_tokens=8)
    seeds = _seeds(len(prompts), 1)
    batch = _sampler(lm).sample_batch(prompts, seeds, sampling)
    for i, prompt in enumerate(prompts):
        alone = _sampler(lm).sample_batch([prompt], [seeds[i]], sampling)[0]
        assert alone.token_ids == batch[i].token_ids and alone.finish_reason == batch[i].finish_reason


def test_finish_reasons_stop_and_length(lm, prompts):
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=8)
    free = _sampler(lm, stop=()).sample([prompts[0]], [5], sampling)[0].token_ids
    assert len(free) == 8
    cut = next(j for j in range(1, 8) if free[j] not in free[:j])  # a token not sampled before it
    stopped = _sampler(lm, stop=(free[cut],)).sample([prompts[0]], [5], sampling)[0]
    assert stopped.token_ids == free[:cut] and stopped.finish_reason == "stop"  # the stop token is not kept
    short = _sampler(lm, stop=()).sample([prompts[0]], [5], Sampling(1.0, 1.0, cut))[0]
    assert short.token_ids == free[:cut] and short.finish_reason == "length"


def test_a_tiny_top_p_is_greedy(lm, prompts):
    greedy = _sampler(lm).sample(prompts, _seeds(len(prompts), 1), Sampling(0.0, 1.0, 8))
    nucleus = _sampler(lm).sample(prompts, _seeds(len(prompts), 1, seed=7), Sampling(1.5, 1e-6, 8))
    assert [c.token_ids for c in greedy] == [c.token_ids for c in nucleus]


def test_top_p_keeps_the_smallest_set_reaching_it():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3, 0.0001]]))
    draws = {}
    for top_p in (0.45, 0.6, 0.81):
        generators = [torch.Generator().manual_seed(s) for s in range(400)]
        tokens = next_tokens(logits.expand(400, -1), Sampling(1.0, top_p, 1), generators)
        draws[top_p] = torch.bincount(tokens, minlength=4).tolist()
    assert draws[0.45] == [0, 400, 0, 0]  # reached by the most likely token alone (p = 0.5)
    assert draws[0.6][0] == 0 and draws[0.6][3] == 0 and 200 < draws[0.6][1] < 300  # {1, 2}: 5/8 and 3/8
    assert draws[0.81][3] == 0 and min(draws[0.81][:3]) > 40


def test_sequence_seeds_and_stop_ids(tmp_path, demo_tokenizer):
    assert sequence_seed(0, "abc", 1) == sequence_seed(0, "abc", 1) < 16 ** 15
    assert len({sequence_seed(s, p, k) for s in (0, 1) for p in ("a", "b") for k in (0, 1)}) == 8
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 9]}))
    assert stop_ids(demo_tokenizer, tmp_path) == (2, 7, 9)
    assert stop_ids(demo_tokenizer, tmp_path / "missing") == (demo_tokenizer.eos_token_id,)

"""The prepare stage's tokenizer: the fast tokenizer's batch API plus the rendering rules.

    encoder = Encoder(load_tokenizer(cfg.model), cfg, chat=False)
    texts = encoder.render(prompt, chosen, rejected)          # chat: the template applied
    prompt_ids, chosen_ids, rejected_ids, retokenized = encoder.tokenize([...], [...], [...])
    encoder.truncate(prompt_ids[0], chosen_ids[0], rejected_ids[0])

The rules (prompt/response boundary, EOS, truncation) are documented in pipeline.prepare.stage's
docstring and written into every manifest under "contract". Part of the prepare stage.
"""

from __future__ import annotations

import itertools

from pipeline.config.schema import Config
from pipeline.errors import ModelError
from pipeline.prepare.records import Reject


class Encoder:
    """The fast tokenizer's batch API plus the rendering rules documented in pipeline.prepare.stage."""

    def __init__(self, tokenizer, cfg: Config, chat: bool):
        self.hf_tokenizer = tokenizer
        self.cfg = cfg.tokenize
        self.chat = chat
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ModelError(
                f"the tokenizer in {cfg.model.path} has no chat template, but the data is in "
                "chat format", hint="use a model with a chat template, or give the data as plain text "
                "(data.format=standard with string prompt/chosen/rejected)"
            )
        if not chat and self.cfg.add_eos and self.eos_id is None:
            raise ModelError(
                f"the tokenizer in {cfg.model.path} has no EOS token, so none can be appended: "
                "set tokenize.add_eos=false or add an eos_token to tokenizer_config.json"
            )

    def encode(self, texts: list[str], special: bool) -> list[list[int]]:
        if not texts:
            return []
        out = self.hf_tokenizer(
            texts,
            add_special_tokens=special,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        return out["input_ids"]

    def render(self, prompt, chosen, rejected) -> tuple[str, str, str]:
        """Text of prompt and both responses; raises Reject for templates that do not prefix."""
        if not self.chat:
            return prompt, chosen, rejected
        prompt_text = self.hf_tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True
        )
        responses = []
        for response in (chosen, rejected):
            full = self.hf_tokenizer.apply_chat_template(prompt + response, tokenize=False)
            if not full.startswith(prompt_text):
                raise Reject(
                    "chat_template_prefix_mismatch",
                    "rendered conversation does not start with the rendered prompt",
                )
            text = full[len(prompt_text) :]
            eos = self.hf_tokenizer.eos_token
            if eos and text.rstrip().endswith(eos):
                text = text.rstrip()
            responses.append(text)
        return prompt_text, responses[0], responses[1]

    def tokenize(self, prompts, chosens, rejecteds) -> tuple[list, list, list, int]:
        """Token ids of prompts and responses; last value counts chat boundary re-tokenizations."""
        prompt_ids = self.encode(prompts, special=not self.chat)
        chosen_ids = self.encode(chosens, special=False)
        rejected_ids = self.encode(rejecteds, special=False)
        if not self.chat and self.cfg.add_eos:
            for ids in itertools.chain(chosen_ids, rejected_ids):
                ids.append(self.eos_id)
        retokenized = 0
        if self.chat:
            # The check: are the prompt ids a prefix of the whole conversation's ids?
            joint = self.encode([p + c for p, c in zip(prompts, chosens)], special=False)
            for p_ids, c_ids, j_ids in zip(prompt_ids, chosen_ids, joint):
                if j_ids != p_ids + c_ids:
                    retokenized += 1
        return prompt_ids, chosen_ids, rejected_ids, retokenized

    def truncate(self, prompt_ids, chosen_ids, rejected_ids):
        """Apply the truncation rules; returns ids and flags, or raises Reject: 'too_long' (no room
        for a response) or 'identical_after_truncation' (the responses differ only past the cut:
        the pair's DPO logit is 0 whatever the policy, so it would teach nothing)."""
        cfg = self.cfg
        prompt_cut = False
        limit = cfg.max_prompt_length
        if limit is not None and len(prompt_ids) > limit:
            prompt_cut = True
            if cfg.truncation_mode == "keep_start":
                prompt_ids = prompt_ids[:limit]
            elif self.bos_id is not None and prompt_ids[0] == self.bos_id:
                prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - limit + 1 :]
            else:
                prompt_ids = prompt_ids[len(prompt_ids) - limit :]
        budget = cfg.max_length - len(prompt_ids)
        if cfg.max_completion_length is not None:
            budget = min(budget, cfg.max_completion_length)
        if budget < cfg.min_response_tokens:
            raise Reject(
                "too_long",
                f"prompt has {len(prompt_ids)} tokens; tokenize.max_length is {cfg.max_length}",
            )
        chosen_cut, rejected_cut = len(chosen_ids) > budget, len(rejected_ids) > budget
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
        if chosen_ids == rejected_ids:
            raise Reject(
                "identical_after_truncation",
                f"both responses start with the same {budget} tokens, all a response keeps "
                f"(tokenize.max_length {cfg.max_length}, prompt {len(prompt_ids)} tokens)",
            )
        return prompt_ids, chosen_ids, rejected_ids, prompt_cut, chosen_cut, rejected_cut

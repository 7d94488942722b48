"""The plan of an iterative DPO run (`dpo rounds`): each round's configs, decided from the config alone.

    rounds = plan_rounds(cfg, "smollm2-iterative")        # refused here when the config cannot run
    rounds.sample_config(2, policy)     # round 2's generate: its slice of prompts, from policy
    rounds.train_config(2, pairs, policy)   # round 2's prepare -> score -> audit -> train
    rounds.eval_config(policy)          # the held-out prompts, one greedy completion each

The prompts (generate's prompts table, sorted by prompt id: a fixed shuffle) are cut into slices:
the first rounds.eval_prompts are held out for the win rate, the same ones every round; round r
samples the r-th slice of rounds.prompts_per_round after them. Round 0 is the starting policy
(model.path), judged on the held-out prompts only; round r >= 1 samples from round r-1's policy,
judges and pairs its completions, and trains from that policy on the pairs, against the initial
reference (rounds.reference: initial) or the policy it starts from (previous). Its run is
runs/<name>-round<r>/, its final/ the next round's policy.

No Prefect here (flows/rounds_flow.py runs the plan); `dpo status` reads the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config.load import config_from_dict
from pipeline.config.schema import Config
from pipeline.errors import ConfigError
from pipeline.storage import paths

ROUNDS_JSON = "rounds.json"
ROUND_JSON = "round-{r}.json"
"""One record per finished round in the rounds folder; rounds.json lists them all."""


@dataclass
class RoundsPlan:
    name: str
    directory: Path
    """<storage>/rounds/<name>/: rounds.json, round-<r>.json, report.html."""
    cfg: Config
    """The config as given (its rounds:, generate:, judge: and pairs: sections)."""

    @property
    def iterations(self) -> int:
        return self.cfg.rounds.iterations

    def run_name(self, r: int) -> str:
        return f"{self.name}-round{r}"

    def run_dir(self, r: int) -> Path:
        return paths.run_dir(self.cfg.storage, self.run_name(r))

    def policy(self, r: int) -> str:
        """The policy after round r: model.path for round 0, else round r's final/."""
        return self.cfg.model.path if r == 0 else str(self.run_dir(r) / "final")

    def _with(self, changes: dict) -> Config:
        raw = self.cfg.to_dict()
        raw["sweep"] = None
        for dotted, value in changes.items():
            section, key = dotted.split(".")
            raw[section][key] = value
        return config_from_dict(raw)

    def sample_config(self, r: int, policy: str) -> Config:
        """Round r's generate: prompts_per_round prompts after the held-out ones, from ``policy``."""
        per_round = self.cfg.rounds.prompts_per_round
        return self._with({"generate.model": policy,
                           "generate.first_prompt": self.cfg.rounds.eval_prompts + (r - 1) * per_round,
                           "generate.num_prompts": per_round})

    def eval_config(self, policy: str) -> Config:
        """The win-rate evaluation: one completion of each held-out prompt from ``policy``."""
        rounds = self.cfg.rounds
        return self._with({"generate.model": policy, "generate.first_prompt": 0,
                           "generate.num_prompts": rounds.eval_prompts, "generate.num_samples": 1,
                           "generate.temperature": rounds.eval_temperature,
                           "generate.max_new_tokens": rounds.eval_max_new_tokens or self.cfg.generate.max_new_tokens})

    def train_config(self, r: int, pairs_file: str | Path, policy: str) -> Config:
        """Round r's dataset and run: the pairs file as data, the reference the config names,
        training from ``policy`` (round r-1's). From a policy other than the reference there is
        no step-0 check (its log-probs are not the cache's)."""
        reference = self.cfg.model.path if self.cfg.rounds.reference == "initial" else policy
        moved = Path(policy) != Path(reference)
        changes = {"data.path": str(pairs_file), "data.format": "auto", "data.prompt_column": "prompt",
                   "data.chosen_column": "chosen", "data.rejected_column": "rejected",
                   "model.path": reference, "train.run_name": self.run_name(r),
                   "train.init_from": policy if moved else None}
        if moved:
            changes["train.step0_check"] = "off"
        if self.cfg.rounds.reference == "previous" and r > 1:
            changes["model.revision"] = None  # a run's final/ folder, not a Hub revision
        return self._with(changes)


def plan_rounds(cfg: Config, default_name: str) -> RoundsPlan:
    """The rounds of ``cfg`` (its rounds: section), named rounds.name or ``default_name``;
    refused (ConfigError) when the config has no rounds: or judge: section."""
    if cfg.rounds is None:
        raise ConfigError("dpo rounds needs a rounds: section", hint="add e.g. `rounds: {iterations: 2, "
                          "prompts_per_round: 64}` to the config (docs/rounds.md)")
    if cfg.judge is None:
        raise ConfigError("dpo rounds needs a judge: section (what rewards a completion)",
                          hint="set judge.function (module:function) or judge.reward_model (docs/rounds.md)")
    name = cfg.rounds.name or default_name
    return RoundsPlan(name=name, directory=paths.rounds_dir(cfg.storage, name), cfg=cfg)


def prompts_needed(cfg: Config) -> int:
    """Prompts the rounds read: the held-out ones plus one slice per round."""
    return cfg.rounds.eval_prompts + cfg.rounds.iterations * cfg.rounds.prompts_per_round


def check_prompt_count(cfg: Config, available: int, source: str) -> None:
    """Refuse rounds that need more prompts than the source has (after repeats and rejects)."""
    needed = prompts_needed(cfg)
    if available < needed:
        r = cfg.rounds
        raise ConfigError(
            f"rounds need {needed} prompts ({r.eval_prompts} held out + {r.iterations} rounds x "
            f"{r.prompts_per_round}), and {source} has {available}",
            hint="lower rounds.prompts_per_round, rounds.iterations or rounds.eval_prompts, or give more "
                 "prompts (generate.prompts)")

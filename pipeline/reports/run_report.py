"""report.html next to a run: what a person opens in a browser to watch or judge a training run.

    write_run_report(run_dir, records, config)   # at every eval and at the end (train/metrics_log.py, final.py)

Loss, reward accuracy, reward margin and the chosen / rejected rewards over the steps, train
(each logged record) and eval (each eval) on the same axes; the step-0 check; the win rate against
the starting policy when `dpo rounds` wrote one (winrate.json); the run's config.
The plots are PNGs embedded in the page (one self-contained file, no server, no JavaScript).
Written atomically, so a browser reloading it during a long run never sees half a page.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import yaml

from pipeline.store import atomic_write_text, read_json

REPORT = "report.html"
WIN_RATE = "winrate.json"
"""Written into a run's folder by `dpo rounds` after its win-rate evaluation (shown by the report)."""
PANELS = (
    ("Loss", "loss"),
    ("Reward accuracy", "rewards/accuracies"),
    ("Reward margin (chosen - rejected)", "rewards/margins"),
    ("Rewards", ("rewards/chosen", "rewards/rejected")),
)


def png_base64(fig) -> str:
    """A matplotlib figure as base64 PNG (for <img src="data:image/png;base64,...">)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _series(records: list[dict], key: str, eval_: bool) -> tuple[list[int], list[float]]:
    name = f"eval/{key}" if eval_ else key
    points = [(r["step"], r[name]) for r in records if name in r and (eval_ or "grad_norm" in r)]
    return [p[0] for p in points], [p[1] for p in points]


def _plots(records: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    for title, keys in PANELS:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for key in (keys if isinstance(keys, tuple) else (keys,)):
            label = key.split("/")[-1] if isinstance(keys, tuple) else ""
            steps, values = _series(records, key, eval_=False)
            if steps:
                ax.plot(steps, values, label=f"train {label}".strip(), linewidth=1.2)
            steps, values = _series(records, key, eval_=True)
            if steps:
                ax.plot(steps, values, "o-", label=f"eval {label}".strip(), linewidth=1.6, markersize=4)
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        images.append((title, png_base64(fig)))
        plt.close(fig)
    return images


def write_run_report(run_dir: str | Path, records: list[dict], config: dict, final: dict | None = None) -> Path:
    """Write <run_dir>/report.html from the run's metrics records (metrics.jsonl's lines)."""
    run_dir = Path(run_dir)
    esc = html.escape
    steps = [r for r in records if "grad_norm" in r]
    evals = [r for r in records if "eval/loss" in r]
    step0 = next((r for r in records if "step0/max_mean_token_diff" in r), None)
    state = "finished" if final else f"in progress: step {steps[-1]['step'] if steps else 0}"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(run_dir.name)}: DPO training report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}"
        "img{display:block;margin:1em 0;max-width:100%}pre{background:#f8f8f8;padding:1em;overflow:auto}</style>",
        "</head><body>",
        f"<h1>{esc(run_dir.name)}</h1><p>DPO training report, {esc(state)}.</p>",
    ]
    if evals:
        columns = ("step", "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")
        parts.append("<h2>Eval</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>")
        for r in evals:
            parts.append("<tr>" + "".join(f"<td>{r[c]:.4g}</td>" if c != "step" else f"<td>{r[c]}</td>"
                                          for c in columns) + "</tr>")
        parts.append("</table>")
    win = read_json(run_dir / WIN_RATE)
    if win:
        parts.append(
            f"<h2>Win rate against the starting policy</h2><p>Round {win['round']} of iterative DPO "
            f"{esc(str(win['rounds']))}: on {win['prompts_compared']} held-out prompts, judged by "
            f"{esc(win['judge'])}.</p><table><tr><th>policy</th><th>mean reward</th><th>win rate</th>"
            "<th>wins</th><th>ties</th><th>losses</th><th>mean length</th></tr>"
            f"<tr><td>starting policy</td><td>{win['base_mean_reward']:.4g}</td><td>0.5</td><td>-</td><td>-</td>"
            f"<td>-</td><td>{win['base_mean_length']:.4g}</td></tr>"
            f"<tr><td>this run</td><td>{win['mean_reward']:.4g}</td><td>{win['win_rate']:.4g}</td>"
            f"<td>{win['wins']}</td><td>{win['ties']}</td><td>{win['losses']}</td>"
            f"<td>{win['mean_length']:.4g}</td></tr></table>")
    if step0:
        parts.append(f"<h2>Step-0 check</h2><p>The policy reproduced the cached reference log-probs within "
                     f"{step0['step0/max_mean_token_diff']:.3g} nats per token ({step0['step0/max_seq_diff']:.3g} per "
                     f"sequence); tolerance {step0['step0/tolerance']:g}.</p>")
    parts.append("<h2>Curves</h2>")
    for title, data in _plots(records):
        parts.append(f"<img alt='{esc(title)}' title='{esc(title)}' src='data:image/png;base64,{data}'>")
    if final:
        parts.append(f"<h2>Result</h2><pre>{esc(json.dumps(final, indent=1, sort_keys=True))}</pre>")
    parts.append(f"<h2>Configuration</h2><pre>{esc(yaml.safe_dump(config, sort_keys=False))}</pre>")
    parts.append("</body></html>")
    path = run_dir / REPORT
    atomic_write_text(path, "\n".join(parts))
    return path

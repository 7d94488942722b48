"""Win rates of iterative DPO and report.html of its rounds.

    result = win_rate(base, policy)   # {prompt_id: (reward, tokens)} of the starting policy and a round's
    # {"win_rate": 0.75, "wins": 20, "ties": 8, "losses": 4, "mean_reward": ..., "mean_length": ...}
    write_rounds_report("storage/rounds/demo", "demo", rounds)   # rounds: rounds.json's list

The win rate of a policy against the starting one (round 0) counts, over the held-out prompts,
the prompts where its completion's reward is higher (a win), equal (a tie) or lower (a loss):
win_rate = (wins + ties / 2) / prompts, so round 0 against itself is 0.5. One self-contained
file, written atomically; no timing is written (a rerun gives the same bytes).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from pipeline.reports.run_report import png_base64
from pipeline.store import atomic_write_text, ensure_dir

ROUNDS_REPORT = "report.html"
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}"
         "td:first-child,th:first-child{text-align:left}img{display:block;margin:1em 0;max-width:100%}")
COLUMNS = (
    ("round", "round"), ("prompts", "prompts"), ("samples", "samples"), ("pairs kept", "pairs"),
    ("pairs dropped", "dropped"), ("sample reward mean", "sample_reward_mean"),
    ("sample reward std", "sample_reward_std"), ("held-out mean reward", "mean_reward"),
    ("win rate vs round 0", "win_rate"), ("wins / ties / losses", "wtl"),
    ("eval reward accuracy", "eval_reward_accuracy"), ("mean length", "mean_length"),
    ("length drift", "length_drift"),
)


def win_rate(base: dict[str, tuple[float, int]], policy: dict[str, tuple[float, int]]) -> dict:
    """``policy``'s completions against ``base``'s on the prompts both have: mean reward, win /
    tie / loss counts and rates, win_rate (ties count half), mean length in tokens and its drift
    from base's."""
    shared = sorted(set(base) & set(policy))
    if not shared:
        raise ValueError("no held-out prompt in common: nothing to compare")
    wins = sum(policy[p][0] > base[p][0] for p in shared)
    losses = sum(policy[p][0] < base[p][0] for p in shared)
    ties = len(shared) - wins - losses
    n = len(shared)
    mean_length = sum(policy[p][1] for p in shared) / n
    return {
        "prompts_compared": n,
        "mean_reward": sum(policy[p][0] for p in shared) / n,
        "win_rate": (wins + ties / 2) / n,
        "wins": wins, "ties": ties, "losses": losses,
        "win_fraction": wins / n, "tie_fraction": ties / n, "loss_fraction": losses / n,
        "mean_length": mean_length,
        "length_drift": mean_length - sum(base[p][1] for p in shared) / n,
    }


def _cell(record: dict, key: str) -> str:
    if key == "wtl":
        value = f"{record['wins']} / {record['ties']} / {record['losses']}" if "wins" in record else None
    else:
        value = record.get(key)
    if value is None:
        return "<td>-</td>"
    if isinstance(value, float):
        value = f"{value:.4g}" if math.isfinite(value) else str(value)
    return f"<td>{html.escape(str(value))}</td>"


def _plot(rounds: list[dict]) -> str | None:
    """Held-out mean reward and win rate by round, side by side."""
    if len(rounds) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    xs = [r["round"] for r in rounds]
    for ax, key, title in ((axes[0], "mean_reward", "Held-out mean reward"),
                           (axes[1], "win_rate", "Win rate against round 0")):
        ax.plot(xs, [r[key] for r in rounds], marker="o")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    data = png_base64(fig)
    plt.close(fig)
    return data


def _dropped(rounds: list[dict]) -> list[str]:
    reasons = sorted({reason for r in rounds for reason in r.get("dropped_by_reason", {})})
    if not reasons:
        return []
    esc = html.escape
    parts = ["<h2>Pairs dropped, by reason</h2><table><tr><th>round</th>"
             + "".join(f"<th>{esc(reason)}</th>" for reason in reasons) + "</tr>"]
    for r in rounds:
        if r["round"] == 0:
            continue
        counts = r.get("dropped_by_reason", {})
        parts.append(f"<tr><td>{r['round']}</td>" + "".join(f"<td>{counts.get(x, 0)}</td>" for x in reasons) + "</tr>")
    parts.append("</table>")
    return parts


def write_rounds_report(directory: str | Path, name: str, rounds: list[dict], iterations: int) -> Path:
    """<directory>/report.html: a row per round (round 0: the starting policy), the drop reasons,
    and the held-out reward and win rate by round."""
    directory = ensure_dir(directory)
    esc = html.escape
    done = sum(1 for r in rounds if r["round"] > 0)
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>{esc(name)}: iterative DPO</title><style>{STYLE}</style></head><body>",
             f"<h1>{esc(name)}</h1><p>Iterative DPO: {done} of {iterations} rounds finished. Round 0 is the "
             "starting policy; each round samples from the policy before it, judges and pairs the samples, "
             "and trains on the pairs. The win rate compares each round's completions of the held-out "
             "prompts with round 0's, judged by the same reward (ties count half).</p>",
             "<table><tr>" + "".join(f"<th>{esc(title)}</th>" for title, _ in COLUMNS) + "</tr>"]
    for record in rounds:
        parts.append("<tr>" + "".join(_cell(record, key) for _, key in COLUMNS) + "</tr>")
    parts.append("</table>")
    parts += _dropped(rounds)
    plot = _plot(rounds)
    if plot:
        parts.append(f"<img alt='held-out reward and win rate by round' src='data:image/png;base64,{plot}'>")
    links = [f"<li>round {r['round']}: <a href='../../runs/{esc(Path(r['run_dir']).name)}/report.html'>"
             f"{esc(Path(r['run_dir']).name)}</a></li>" for r in rounds if r.get("run_dir")]
    if links:
        parts.append("<h2>Training runs</h2><ul>" + "".join(links) + "</ul>")
    parts.append("</body></html>")
    path = directory / ROUNDS_REPORT
    atomic_write_text(path, "\n".join(parts))
    return path

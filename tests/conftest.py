"""Shared fixtures: the tiny demo model (built once per session) and helpers to write inputs."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.config.load import config_from_dict
from pipeline.models.assets import build_demo_assets

from flows.prefect_settings import apply_prefect_settings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_TEST = SHARED_DATA / "hh-rlhf-harmless-base" / "test.jsonl.gz"


if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    # `make test` runs a worker per core (pytest-xdist): each computes on its share of the cores.
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session", autouse=True)
def _isolated_hash_cache(tmp_path_factory):
    # Keep the file-hash cache of the test run out of the user's home.
    os.environ["DPO_HASH_CACHE"] = str(tmp_path_factory.mktemp("hash-cache"))


# The suite imports Prefect itself (test_flows.py): with the commands' settings (telemetry off,
# the ephemeral server's start-up time), applied before any test module imports it.
apply_prefect_settings()


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> dict:
    return build_demo_assets(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def demo_tokenizer(demo_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_assets["model"]))


def _demo_config(storage: Path, demo_assets, train: dict):
    return config_from_dict({
        "storage": str(storage),
        "data": {"path": str(demo_assets["data"]), "eval_fraction": 0.1},
        "model": {"path": str(demo_assets["model"])},
        "tokenize": {"max_length": 128, "max_prompt_length": 64},
        "train": train,
    })


@pytest.fixture(scope="session")
def _scored_demo_storage(tmp_path_factory, demo_assets) -> Path:
    """A storage root holding the demo prepared and scored, once per session (copied by tests)."""
    from pipeline.prepare.stage import prepare
    from pipeline.score.stage import score

    storage = tmp_path_factory.mktemp("scored-demo") / "storage"
    cfg = _demo_config(storage, demo_assets, {})
    prepare(cfg, show_progress=False)
    score(cfg, show_progress=False)
    return storage


@pytest.fixture
def prepared_demo(tmp_path, demo_assets, _scored_demo_storage):
    """prepared_demo(train_section) -> Config on the demo data and model, prepared and scored: a
    copy of the session's scored storage in this test's folder (the stages find it up to date)."""
    from pipeline.prepare.stage import prepare
    from pipeline.score.stage import score

    def make(train: dict):
        cfg = _demo_config(tmp_path / "storage", demo_assets, train)
        if not (tmp_path / "storage").exists():
            shutil.copytree(_scored_demo_storage, tmp_path / "storage", ignore=shutil.ignore_patterns("locks"))
        assert prepare(cfg, show_progress=False).skipped and score(cfg, show_progress=False).skipped
        return cfg

    return make


def crash_training_at(monkeypatch, cfg, step: int) -> None:
    """Train ``cfg`` and stop it (as a kill would) right after step ``step`` is logged."""
    import pipeline.storage.metrics as metrics_module
    import pipeline.train.stage as train_module

    real_append = metrics_module.append

    def crashing(path, record):
        real_append(path, record)
        if record.get("step") == step and "grad_norm" in record:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(metrics_module, "append", crashing)  # train writes each record through it
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg, show_progress=False)
    monkeypatch.setattr(metrics_module, "append", real_append)


@pytest.fixture
def make_config(tmp_path, demo_assets):
    """make_config(data_path, **section overrides) -> Config on the demo tokenizer."""

    def make(data_path, model_path=None, **sections):
        raw = {
            "storage": str(tmp_path / "storage"),
            "data": {"path": str(data_path)},
            "model": {"path": str(model_path or demo_assets["model"])},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return config_from_dict(raw)

    return make


@pytest.fixture
def scored(tmp_path, demo_assets):
    """(cfg, cache, config_file): a config with its own copy of the demo model (so it can be
    damaged), prepared and scored (shards of 200 rows); config_file holds the config as JSON."""
    from pipeline.prepare.stage import prepare
    from pipeline.score.stage import score

    model = tmp_path / "model"
    shutil.copytree(demo_assets["model"], model)
    raw = {
        "storage": str(tmp_path / "storage"),
        "data": {"path": str(demo_assets["data"])},
        "model": {"path": str(model)},
        "tokenize": {"max_length": 128, "max_prompt_length": 64},
        "score": {"shard_rows": 200},
    }
    cfg = config_from_dict(raw)
    prepare(cfg, show_progress=False)
    cache = score(cfg, show_progress=False).output_dir
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(raw))
    return cfg, cache, config_file


@pytest.fixture(scope="module")
def scored_demo(tmp_path_factory, demo_assets):
    """The demo data prepared and scored once per test module that uses it; make(train) is a config
    whose train section is ``train``, reading that cache (tests/helpers.py's demo_train trains on it)."""
    from pipeline.prepare.stage import prepare
    from pipeline.score.stage import score

    storage = tmp_path_factory.mktemp("losses") / "storage"

    def make(train: dict):
        return config_from_dict({
            "storage": str(storage),
            "data": {"path": str(demo_assets["data"]), "eval_fraction": 0.02},  # 12 eval pairs: quick
            "model": {"path": str(demo_assets["model"])},
            "tokenize": {"max_length": 128, "max_prompt_length": 64},
            "train": train,
        })

    cfg = make({})
    prepare(cfg, show_progress=False)
    score(cfg, show_progress=False)
    return make


def standard_rows(n=20):
    """Standard-format rows (prompt, chosen, rejected strings), each a different sum."""
    return [
        {"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
         "rejected": f" It is {2 * i + 1}."}
        for i in range(n)
    ]


def varied_rows(n=40):
    """Standard rows of very different lengths, so batches need padding and sorting."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        prompt = " ".join(f"p{int(x)}" for x in rng.integers(0, 50, size=int(rng.integers(1, 30))))
        chosen = " ".join(f"c{int(x)}" for x in rng.integers(0, 50, size=int(rng.integers(1, 25))))
        rows.append({"prompt": f"{i}: {prompt}", "chosen": " " + chosen, "rejected": f" no {i}"})
    return rows


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    """rows: dicts (dumped as JSON) or str (written verbatim as a line)."""
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def demo_model_files(demo_assets) -> dict[str, bytes]:
    """The demo model folder's files, for a local Hub cache (hub_cache)."""
    return {f.name: f.read_bytes() for f in sorted(demo_assets["model"].iterdir()) if f.is_file()}


def demo_valid_jsonl(demo_assets) -> str:
    """The demo data's rows that parse (its deliberately broken lines left out), as JSONL text."""
    rows = []
    for line in demo_assets["data"].read_text().splitlines():
        try:
            rows.append(json.dumps(json.loads(line)))
        except ValueError:
            continue
    return "\n".join(rows) + "\n"


def requires_hh():
    return pytest.mark.skipif(not HH_TEST.is_file(), reason=f"{HH_TEST} not present")


def chromium(tmp_path: Path, *args: str) -> str:
    """Run Debian's headless Chromium with ``args`` (skip the test when it is absent) and return its
    stdout; a crash or a hang (120 s) fails the test."""
    import shutil
    import subprocess

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    done = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                           *args], check=True, capture_output=True, text=True, timeout=120)
    return done.stdout


def assert_plots_render(page: Path, tmp_path: Path, fragment: str = "", height: int = 2400,
                        keep: Path | None = None) -> Path:
    """Open an HTML report (at ``#fragment``, if given) in headless Chromium and check that
    matplotlib's default plot colours are on the screenshot: the embedded PNGs rendered. ``keep``:
    copy the screenshot there too (a CI artifact). Returns the screenshot."""
    import shutil

    assert page.is_file(), page  # Chromium would show (and screenshot) an error page
    shot = tmp_path / f"{page.stem}.png"
    chromium(tmp_path, f"--screenshot={shot}", f"--window-size=1200,{height}",
             page.as_uri() + (f"#{fragment}" if fragment else ""))
    from PIL import Image

    colors = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 22)
    palette = {(31, 119, 180), (255, 127, 14), (44, 160, 44)}  # matplotlib's first default colours
    present = {c for _, c in colors} if colors else set()
    assert any(sum(abs(a - b) for a, b in zip(p, c)) < 60 for p in palette for c in present)
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep)
    return shot


def hub_cache(hf_home: Path, repo_id: str, files: dict[str, bytes], commit: str,
              kind: str = "models") -> Path:
    """The local Hub cache layout (as `hf download` leaves it) of ``files`` (relative path ->
    bytes) as repository ``repo_id`` at ``commit``; kind: models or datasets."""
    repo = hf_home / "hub" / f"{kind}--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    for name, data in sorted(files.items()):
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def seed_formula_gradient(model_path, pairs, ref_chosen, ref_rejected, beta: float) -> dict:
    """The seed's DPO gradient, independently: grad L = -beta/B sum_i sigma(r_l - r_w)
    (grad log pi(y_w) - grad log pi(y_l)), each sequence alone in float64 (full logits) with its
    own backward pass. pairs: (prompt, chosen, rejected) token lists. {parameter name: gradient}."""
    import torch
    from transformers import AutoModelForCausalLM

    model64 = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float64)

    def logp_and_grad(prompt, response):
        model64.zero_grad()
        logps = torch.log_softmax(model64(torch.tensor([prompt + response])).logits[0], -1)
        value = sum(logps[len(prompt) + j - 1, tok] for j, tok in enumerate(response))
        value.backward()
        return value.detach(), {n: p.grad.clone() for n, p in model64.named_parameters()}

    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model64.named_parameters()}
    for (prompt, y_w, y_l), r_w, r_l in zip(pairs, ref_chosen, ref_rejected):
        logp_w, grad_w = logp_and_grad(prompt, y_w)
        logp_l, grad_l = logp_and_grad(prompt, y_l)
        weight = -beta * torch.sigmoid(beta * (logp_l - r_l) - beta * (logp_w - r_w)) / len(pairs)
        for name in expected:
            expected[name] += weight * (grad_w[name] - grad_l[name])
    return expected


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    from flows.prefect_settings import PREFECT_SETTINGS

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    with prefect_test_harness(server_startup_timeout=int(PREFECT_SETTINGS["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])):
        yield

"""bench/gpu_carry.py's offline steps (issue 31, item 1): wheels tarred and cut into parts under the
size a device call carries, joined back to the same sha256, the pure-Python wheels installed with
the command the lent machine runs; the device calls, one part each, then the install."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def carry(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_carry

    return gpu_carry


def fake_wheel(folder: Path, name: str, tag: str, payload: bytes) -> Path:
    """A minimal installable wheel: one module holding ``payload``, and its dist-info."""
    path = folder / f"{name}-1.0-{tag}.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{name}/__init__.py", f"DATA = {payload!r}\n")
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        whl.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n")
        whl.writestr(f"{info}/RECORD", "")
    return path


def test_split_join_and_the_calls(carry, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "alpha", "py3-none-any", b"a" * 5000)
    fake_wheel(wheels, "beta", "py3-none-any", bytes(range(256)) * 40)
    fake_wheel(wheels, "gamma", "cp312-cp312-manylinux_2_28_x86_64", b"c" * 3000)
    listing = carry.split(wheels, tmp_path / "out", part_bytes=4096)
    parts = listing["parts"]
    assert len(parts) == -(-listing["bundle_bytes"] // 4096) > 2 and all(p["bytes"] <= 4096 for p in parts)
    again = carry.split(wheels, tmp_path / "again", part_bytes=4096)
    assert again["bundle_sha256"] == listing["bundle_sha256"]  # the same bytes each time (no owners, no times)
    joined = carry.join(tmp_path / "out", tmp_path / "there")
    assert sorted(p.name for p in joined.iterdir()) == sorted(p.name for p in wheels.iterdir())
    for path in wheels.iterdir():
        assert hashlib.sha256((joined / path.name).read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest()
    pure = sorted(str(p) for p in joined.glob("*-none-any.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(tmp_path / "site"), *pure], check=True)
    done = subprocess.run([sys.executable, "-c", "import alpha, beta; print(len(alpha.DATA), len(beta.DATA))"],
                          env={"PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["5000", "10240"]
    calls = carry.calls(listing)
    assert len(calls) == len(parts)  # the last part's call also installs
    assert all(f'carry=[".carry/{p["file"]}"]' in c and p["sha256"] in c for p, c in zip(parts, calls, strict=True))
    assert listing["bundle_sha256"] in calls[-1] and "--target /tmp/site" in calls[-1] and "import vllm" in calls[-1]
    assert all("pip install" not in c for c in calls[:-1]) and "gpu_suite.py" not in calls[-1]  # no suite pairs: no suite


def test_the_suite_pairs_travel_in_the_bundle_and_the_last_call_runs_the_suite(carry, tmp_path):
    wheels, pairs = tmp_path / "wheels", tmp_path / "gpu_bundle"
    wheels.mkdir()
    (pairs / "model").mkdir(parents=True)
    fake_wheel(wheels, "alpha", "py3-none-any", b"a" * 3000)
    (pairs / "examples.parquet").write_bytes(b"p" * 2500)
    (pairs / "model" / "config.json").write_text('{"hidden_size": 576}')
    listing = carry.split(wheels, tmp_path / "out", part_bytes=2048, extra=pairs)
    joined = carry.join(tmp_path / "out", tmp_path / "there")
    assert (joined / "gpu_bundle" / "examples.parquet").read_bytes() == b"p" * 2500
    assert (joined / "gpu_bundle" / "model" / "config.json").read_text() == '{"hidden_size": 576}'
    calls = carry.calls(listing)
    assert len(calls) == len(listing["parts"]) and carry.SUITE in calls[-1] and "--bundle /tmp/carry/w/gpu_bundle" in calls[-1]
    assert calls[-1].index("import vllm") < calls[-1].index("gpu_suite.py --quick") and "timeout_s=600" in calls[-1]
    assert all(len(c) < 2000 for c in calls)  # a device command's limit


def test_a_damaged_part_is_refused(carry, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "alpha", "py3-none-any", b"a" * 5000)
    listing = carry.split(wheels, tmp_path / "out", part_bytes=2048)
    part = tmp_path / "out" / listing["parts"][1]["file"]
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(SystemExit, match="differ from the bundle"):
        carry.join(tmp_path / "out", tmp_path / "there")
    assert json.loads((tmp_path / "out" / "parts.json").read_text())["parts"][1]["sha256"] != \
        hashlib.sha256(part.read_bytes()).hexdigest()


def test_the_lean_check_sees_module_level_imports_only(carry, tmp_path, monkeypatch):
    """imports: a left-out wheel whose module the scoring path imports unconditionally is named; one
    imported under try, if or in a function only is not (the lean plan may leave it out)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    vllm = wheels / "vllm-1.0-py3-none-any.whl"
    with zipfile.ZipFile(vllm, "w") as whl:
        whl.writestr("vllm/__init__.py", "from .engine import core\n")
        whl.writestr("vllm/engine/__init__.py", "")
        whl.writestr("vllm/engine/core.py", "import alpha.sub\nfrom ..util import helper\n"
                     "try:\n    import beta\nexcept ImportError:\n    beta = None\n"
                     "if False:\n    import delta\n\ndef later():\n    import gamma\n")
        whl.writestr("vllm/util.py", "from epsilon import thing as helper\n")
    for name in ("alpha", "beta", "gamma", "delta", "epsilon"):
        fake_wheel(wheels, name, "py3-none-any", b"x")
    found = carry.module_imports({n: zipfile.ZipFile(vllm).read(n).decode() for n in zipfile.ZipFile(vllm).namelist()},
                                 ("vllm",))
    assert set(found) == {"alpha", "epsilon"} and found["epsilon"] == {"vllm.util"}
    monkeypatch.setattr(carry, "SCORING_PATH", ("vllm",))
    listed = [{"name": p.name.split("-")[0], "file": p.name} for p in sorted(wheels.iterdir(), key=lambda p: p.name != vllm.name)]
    keep = [vllm.name, "alpha-1.0-py3-none-any.whl", "epsilon-1.0-py3-none-any.whl"]
    assert carry.check_lean({"wheels": listed, "lean": {"files": keep}}, wheels) == []
    clashes = carry.check_lean({"wheels": listed, "lean": {"files": keep[:2]}}, wheels)
    assert clashes == ["epsilon: epsilon (imported by vllm.util)"]

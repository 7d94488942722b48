"""Carry vLLM to the lent GPU machine: its wheels, in parts under the 64 MiB a call carries.

    .venv/bin/python bench/gpu_carry.py plan [--vllm 0.26.0]    # the closure minus the image: wheels, MiB, calls
    .venv/bin/python bench/gpu_carry.py download                # the planned wheels into .carry/wheels (sha256 checked)
    .venv/bin/python bench/gpu_carry.py imports                 # the lean plan's check: what scoring imports
    .venv/bin/python bench/gpu_carry.py split [--lean] [--part-mib 60]   # .carry/bundle.tar cut into .carry/part-NNN
    .venv/bin/python bench/gpu_carry.py calls                   # the lease: one call per part, the last installs, runs the suite
    .venv/bin/python bench/gpu_carry.py join --to DIR [--install-pure]   # the dry run: reassemble, check, install

The lent machine (docs/development.md) has Python 3.12 and torch 2.11.0+cu130 with the packages its
notes list (``IMAGE``), no network, and takes at most 64 MiB of files per call; ignored files it
already holds stay there while it is warm. vLLM 0.26.0 is the last release that pins torch 2.11.0
(its wheel metadata, read 2026-12-06). ``plan`` walks its requirements, and those of ``SUITE_NEEDS``
(TRL for the suite's rows), on PyPI (the simple JSON API,
the PEP 658 metadata or, without it, the wheel's own METADATA): for each requirement whose marker
holds on linux x86_64 CPython 3.12 and whose name the image does not hold, the newest version the
specifier allows with a wheel for that platform, then its own requirements. A requirement PyPI cannot
satisfy is listed as such (the install is ``--no-deps``, so it is simply absent there). The lean plan
leaves out ``LEAN`` (kernels for other chips and models, video decoding) and what only they need;
``imports`` checks it: the modules those wheels hold against the imports that vLLM's scoring path
(``SCORING_PATH``) runs unconditionally at module level, read from the vLLM wheel. ``split``
tars the wheels, with ./.gpu_bundle (``bench/gpu_check.py --make-bundle .gpu_bundle``: the suite's
pairs) when it is there, and cuts the tar into parts; ``calls`` prints the whole lease, one device
call per part (each carries its part to /tmp/carry and checks its sha256; the last one also joins
them, checks the tar's sha256, installs every wheel with ``pip install --no-index --no-deps --target
/tmp/site``, imports vLLM and runs ``bench/gpu_suite.py --quick``: ``SUITE``). ``join`` is the same
reassembly here, and with ``--install-pure`` installs the pure-Python wheels into DIR/site on this
CPU machine. Every step writes JSON under .carry/ (git-ignored).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

from _common import ROOT, bench_parser

CARRY = ROOT / ".carry"
IMAGE = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub
humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx
onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow
pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split())
"""What the lent machines' image holds (their notes, read 2026-11-17): not carried."""
LEAN = ("nvidia-cutlass-dsl", "tokenspeed-mla", "humming-kernels", "quack-kernels", "tilelang", "pynvvideocodec",
        "torchcodec")
"""vLLM's requirements that scoring a dense model on Hopper does not import (``imports`` checks):
CuTe-DSL and FlashAttention-4 kernels (Blackwell), MLA and tilelang kernels, video decoding."""
SCORING_PATH = ("vllm", "vllm.entrypoints.llm", "vllm.v1.engine.core", "vllm.v1.worker.gpu_worker",
                "vllm.v1.worker.gpu_model_runner", "vllm.model_executor.models.llama",
                "vllm.v1.attention.backends.flash_attn", "vllm.v1.sample.sampler")
"""What ``LLM(model).generate(..., SamplingParams(prompt_logprobs=0))`` runs for a Llama on an H100."""
SUITE_NEEDS = ("trl==1.16.0", "datasets==5.2.0")
"""What bench/gpu_suite.py's TRL rows need beyond the image (its docstring), carried in the same bundle."""
SUITE = ("export PYTHONPATH=.:/tmp/site && PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py --quick "
         "--bundle /tmp/carry/w/gpu_bundle --out $OUT/gpu_suite.json")
"""The last call's suite: --quick on the pairs' lengths that travelled in the bundle."""
ENVIRONMENT = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_machine": "x86_64",
               "platform_system": "Linux", "sys_platform": "linux", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
WHEEL_TAGS = re.compile(r"-(cp312|cp3\d*|py3\d*|py2\.py3)-(cp312|abi3|none)-(manylinux[^-]*x86_64|linux_x86_64|any)\.whl$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def index(name: str) -> dict:
    """PyPI's file list of ``name`` (fetched once: the lean plan walks the same names again)."""
    request = urllib.request.Request(f"https://pypi.org/simple/{canonical(name)}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.load(answer)


def pick(name: str, spec) -> dict | None:
    """The newest wheel for the lent machine of a version ``spec`` allows, or None."""
    from packaging.version import InvalidVersion, Version

    best = None
    for f in index(name)["files"]:
        if f.get("yanked") or not WHEEL_TAGS.search(f["filename"]):
            continue
        try:
            version = Version(f["filename"].split("-")[1])
        except InvalidVersion:
            continue
        pinned = any(s.operator == "==" for s in spec)  # a pre-release only where pinned exactly
        if not spec.contains(version, prereleases=pinned) or (version.is_prerelease and not pinned):
            continue
        if best is None or version > best[0]:
            best = (version, f)
    if best is None:
        return None
    version, f = best
    return {"name": canonical(name), "version": str(version), "file": f["filename"], "url": f["url"],
            "sha256": f["hashes"]["sha256"], "bytes": f.get("size") or 0,
            "metadata": bool(f.get("core-metadata") or f.get("data-dist-info-metadata"))}


@functools.cache
def metadata(url: str, separate: bool) -> str:
    """A wheel's METADATA: PyPI's PEP 658 copy when ``separate``, else read from the wheel (fetched once)."""
    if separate:
        with urllib.request.urlopen(url + ".metadata", timeout=60) as answer:
            return answer.read().decode()
    with urllib.request.urlopen(url, timeout=300) as answer:
        archive = zipfile.ZipFile(io.BytesIO(answer.read()))
    return archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()


def requirements(wheel: dict, extras: set[str]) -> list:
    """The wheel's runtime requirements: its METADATA's Requires-Dist whose marker holds on the
    lent machine, with the ``extras`` asked for it (nvidia-cutlass-dsl[cu13])."""
    from packaging.requirements import Requirement

    text = metadata(wheel["url"], wheel["metadata"])
    found = [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return [r for r in found if r.marker is None
            or any(r.marker.evaluate({**ENVIRONMENT, "extra": extra}) for extra in {"", *extras})]


def plan(vllm: str, leave_out: tuple[str, ...] = ()) -> dict:
    """vllm==``vllm`` and SUITE_NEEDS, and what they need that the image lacks, breadth first; the
    first pick of a name wins. ``leave_out``: names not followed (nor what only they need)."""
    from packaging.requirements import Requirement

    todo, picked, missing = [Requirement(f"vllm=={vllm}"), *map(Requirement, SUITE_NEEDS)], {}, []
    while todo:
        req = todo.pop(0)
        name = canonical(req.name)
        if name in picked or name in IMAGE or name in leave_out or any(m["name"] == name for m in missing):
            continue
        wheel = pick(name, req.specifier)
        if wheel is None:
            missing.append({"name": name, "requirement": str(req)})
            continue
        picked[name] = wheel
        todo += requirements(wheel, set(req.extras))
        print(f"  {wheel['file']:<70} {wheel['bytes'] / 2**20:7.1f} MiB", flush=True)
    total = sum(w["bytes"] for w in picked.values())
    return {"vllm": vllm, "wheels": list(picked.values()), "unsatisfiable": missing, "bytes": total}


def module_imports(sources: dict[str, str], entries: tuple[str, ...]) -> dict[str, set[str]]:
    """The top-level modules outside the package that the modules reachable from ``entries``
    import unconditionally at module level (not under try, if or a function), each with the modules
    that import it. ``sources``: path in the wheel -> source text."""
    def source(name: str) -> str | None:
        path = name.replace(".", "/")
        return sources.get(f"{path}/__init__.py", sources.get(f"{path}.py"))

    def statements(body):  # module-level imports, guarded ones left out
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif isinstance(node, ast.With):
                yield from statements(node.body)

    package, found, seen, todo = entries[0].split(".")[0], {}, set(), list(entries)
    while todo:
        name = todo.pop()
        text = source(name)
        if name in seen or text is None:
            continue
        seen.add(name)
        todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]  # its parents run first
        is_package = sources.get(f"{name.replace('.', '/')}/__init__.py") is not None
        for node in statements(ast.parse(text).body):
            for target in imported_names(node, name, is_package):
                if target.split(".")[0] == package:
                    todo.append(target)
                else:
                    found.setdefault(target.split(".")[0], set()).add(name)
    return found


def imported_names(node, module: str, is_package: bool) -> list[str]:
    """The absolute names an import statement in ``module`` may load (``from a import b``: a and a.b)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def wheel_modules(path: Path) -> set[str]:
    """The top-level modules a wheel installs (its dist-info and data folders left out)."""
    with zipfile.ZipFile(path) as whl:
        names = {n.split("/")[0] for n in whl.namelist()}
    return {n.removesuffix(".py").split(".")[0] for n in names if not n.endswith((".dist-info", ".data"))}


def check_lean(planned: dict, wheels: Path) -> list[str]:
    """The lean plan's left-out wheels whose modules the scoring path imports (none: it holds)."""
    with zipfile.ZipFile(wheels / planned["wheels"][0]["file"]) as whl:  # vllm itself
        sources = {n: whl.read(n).decode() for n in whl.namelist() if n.endswith(".py")}
    imported = module_imports(sources, SCORING_PATH)
    kept = set(planned["lean"]["files"])
    clashes = []
    for wheel in planned["wheels"]:
        if wheel["file"] not in kept:
            used = wheel_modules(wheels / wheel["file"]) & set(imported)
            clashes += [f"{wheel['name']}: {m} (imported by {min(imported[m])})" for m in sorted(used)]
    return clashes


def download(planned: dict) -> None:
    folder = CARRY / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    for wheel in planned["wheels"]:
        path = folder / wheel["file"]
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != wheel["sha256"]:
            urllib.request.urlretrieve(wheel["url"], path)
        if hashlib.sha256(path.read_bytes()).hexdigest() != wheel["sha256"]:
            raise SystemExit(f"{path}: sha256 differs from PyPI's")


def split(wheels: Path, out: Path, part_bytes: int, names: list[str] | None = None, extra: Path | None = None) -> dict:
    """The wheels of ``wheels`` (``names`` of them: the plan's; None: every one), and the files of
    the folder ``extra`` under gpu_bundle/ when given (bench/gpu_check.py's bundle: the suite's pairs),
    as one tar (sorted names, no owners or times: the same bytes each time), cut into parts of at
    most ``part_bytes``; their sha256s."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("part-*"):
        stale.unlink()
    bundle = out / "bundle.tar"
    paths = sorted(wheels / n for n in names) if names is not None else sorted(wheels.glob("*.whl"))
    members = [(path, path.name) for path in paths]
    if extra is not None:
        members += [(f, f"gpu_bundle/{f.relative_to(extra).as_posix()}") for f in sorted(extra.rglob("*")) if f.is_file()]
    with tarfile.open(bundle, "w", format=tarfile.PAX_FORMAT) as tar:
        for path, arcname in members:
            info = tar.gettarinfo(str(path), arcname=arcname)
            info.uid = info.gid = info.mtime = 0
            info.uname = info.gname = ""
            with open(path, "rb") as f:
                tar.addfile(info, f)
    data = bundle.read_bytes()
    parts = []
    for number, start in enumerate(range(0, len(data), part_bytes)):
        part = out / f"part-{number:03d}"
        part.write_bytes(data[start:start + part_bytes])
        parts.append({"file": part.name, "bytes": part.stat().st_size, "sha256": hashlib.sha256(part.read_bytes()).hexdigest()})
    listing = {"bundle_sha256": hashlib.sha256(data).hexdigest(), "bundle_bytes": len(data), "parts": parts,
               "suite_bundle": extra is not None}
    (out / "parts.json").write_text(json.dumps(listing, indent=1))
    return listing


def join(parts_dir: Path, to: Path) -> Path:
    """The parts of ``parts_dir`` joined and checked against parts.json, unpacked into ``to``/wheels."""
    listing = json.loads((parts_dir / "parts.json").read_text())
    data = b"".join((parts_dir / p["file"]).read_bytes() for p in listing["parts"])
    if hashlib.sha256(data).hexdigest() != listing["bundle_sha256"]:
        raise SystemExit("the joined parts differ from the bundle that was split")
    wheels = to / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(wheels, filter="data")
    return wheels


def calls(listing: dict) -> list[str]:
    """The device calls, one per part: each carries its part to /tmp/carry and checks it; the last
    also joins them, checks the tar, installs every wheel into /tmp/site, imports vLLM and, when the
    suite's pairs travelled in the bundle, runs ``bench/gpu_suite.py --quick`` (SUITE)."""
    def carry(part: dict) -> str:
        return (f'mkdir -p /tmp/carry && cp .carry/{part["file"]} /tmp/carry/ '
                f'&& echo \'{part["sha256"]}  /tmp/carry/{part["file"]}\' | sha256sum -c')

    *first, last = listing["parts"]
    install = (f"cat /tmp/carry/part-* > /tmp/carry/bundle.tar && echo '{listing['bundle_sha256']}  "
               "/tmp/carry/bundle.tar' | sha256sum -c && mkdir -p /tmp/carry/w && tar -xf /tmp/carry/bundle.tar "
               "-C /tmp/carry/w && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "
               "/tmp/carry/w/*.whl && PYTHONPATH=/tmp/site python3 -c 'import vllm; print(vllm.__version__)'")
    suite = f" && {SUITE}" if listing.get("suite_bundle") else ""
    out = [f'run(carry=[".carry/{p["file"]}"], command="{carry(p)}")' for p in first]
    out.append(f'run(carry=[".carry/{last["file"]}"], timeout_s=600, command="{carry(last)} && {install}{suite}")')
    return out


def main() -> int:
    parser = bench_parser(__doc__, whole_doc=True)
    parser.add_argument("step", choices=["plan", "download", "imports", "split", "calls", "join"])
    parser.add_argument("--vllm", default="0.26.0")
    parser.add_argument("--part-mib", type=float, default=60.0)
    parser.add_argument("--to", type=Path, help="join: where to reassemble")
    parser.add_argument("--lean", action="store_true", help="split: the lean plan's wheels (LEAN left out)")
    parser.add_argument("--install-pure", action="store_true", help="join: pip install the pure-Python wheels into TO/site")
    args = parser.parse_args()
    CARRY.mkdir(exist_ok=True)
    part = int(args.part_mib * 2**20)
    if args.step == "plan":
        planned = plan(args.vllm)
        lean = plan(args.vllm, LEAN)
        planned["lean"] = {"files": [w["file"] for w in lean["wheels"]], "bytes": lean["bytes"], "left_out": list(LEAN)}
        (CARRY / "plan.json").write_text(json.dumps(planned, indent=1))
        for what, wheels, size in (("all", planned["wheels"], planned["bytes"]), ("lean", lean["wheels"], lean["bytes"])):
            print(f"vllm=={args.vllm} ({what}): {len(wheels)} wheels, {size / 2**20:.0f} MiB: {-(-size // part)} parts of "
                  f"{args.part_mib:g} MiB, as many device calls (the last installs)")
        print(f"not on PyPI: {', '.join(m['requirement'] for m in planned['unsatisfiable']) or 'none'}")
    elif args.step == "imports":
        clashes = check_lean(json.loads((CARRY / "plan.json").read_text()), CARRY / "wheels")
        print("\n".join(clashes) or f"the lean plan holds: no module of {', '.join(LEAN)} (nor of what only they "
              f"need) is imported at module level from {len(SCORING_PATH)} entry points of vLLM's scoring path")
        return 1 if clashes else 0
    elif args.step == "download":
        download(json.loads((CARRY / "plan.json").read_text()))
    elif args.step == "split":
        planned = json.loads((CARRY / "plan.json").read_text())
        names = planned["lean"]["files"] if args.lean else [w["file"] for w in planned["wheels"]]
        extra = ROOT / ".gpu_bundle"
        if not extra.is_dir():
            print("no .gpu_bundle here: the last call will install vLLM but not run the suite (make the bundle "
                  "first: .venv/bin/python bench/gpu_check.py --make-bundle .gpu_bundle)")
        listing = split(CARRY / "wheels", CARRY, part, names, extra if extra.is_dir() else None)
        print(f"{len(listing['parts'])} parts, {listing['bundle_bytes'] / 2**20:.0f} MiB, bundle sha256 {listing['bundle_sha256']}")
    elif args.step == "calls":
        print("\n".join(calls(json.loads((CARRY / "parts.json").read_text()))))
    else:
        wheels = join(CARRY, args.to)
        print(f"joined: the bundle's sha256 matches; {len(list(wheels.glob('*.whl')))} wheels in {wheels}")
        if args.install_pure:
            pure = sorted(str(p) for p in wheels.glob("*-none-any.whl"))
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--target", str(args.to / "site"), *pure], check=True)
            print(f"installed {len(pure)} pure-Python wheels into {args.to / 'site'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

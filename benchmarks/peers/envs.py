"""The peers' virtual environments: what each one installs from PyPI, and making them on first use.

Each peer gets its own environment under ``<workdir>/venvs/<name>`` (``.bench/`` is git-ignored),
made with ``python -m venv`` and ``pip install`` of exactly :attr:`Peer.requirements`, so that its
pins (onnx 1.21, onnxruntime 1.24-1.28, torch) never meet onnxq's. A marker file records the
requirements an environment was made from; an environment whose marker differs is made again.
Runs in the benchmark's own interpreter; the peer scripts themselves run in these environments.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARKER = "onnxq-bench-peer.json"
INSTALL_TIMEOUT = 3600.0  # s per environment; the first install downloads torch (~200 MB CPU build)

#: torch, CPU build: amd-quark imports it without declaring it, nvidia-modelopt declares it. On this
#: machine ``torch==2.13.0`` resolves to the local CPU wheel; elsewhere set PIP_EXTRA_INDEX_URL to
#: https://download.pytorch.org/whl/cpu or pip takes the CUDA build (several GB).
TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class Peer:
    """One peer quantizer: its PyPI requirements and the script (next to this file) that runs it."""

    name: str  # environment and config-key prefix
    title: str  # as the tables name it
    distribution: str  # the PyPI distribution whose version the report gives
    requirements: tuple[str, ...]
    script: str
    note: str = ""  # why the requirements differ from a plain ``pip install <distribution>``


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("modelopt", "NVIDIA Model Optimizer", "nvidia-modelopt",
         (TORCH, "nvidia-modelopt==0.47.0", "onnxruntime~=1.24.2", "onnx~=1.21.0", "onnx-graphsurgeon>=0.6.1", "onnxconverter-common~=1.16.0",
          "onnxscript", "onnxslim>=0.1.76", "polygraphy>=0.53.4", "ml_dtypes", "lief", "cppimport"),
         "modelopt_quantize.py",
         "the [onnx] extra's requirements with onnxruntime (CPU) of the same version in place of onnxruntime-gpu, "
         "and without cupy-cuda12x: the GPU build and CUDA libraries (~5 GB) are not needed for CPU calibration"),
    Peer("nncf", "NNCF", "nncf", ("nncf==3.4.0", "onnx", "onnxruntime"), "nncf_quantize.py",
         "NNCF's ONNX backend needs onnx and onnxruntime, which it does not declare"),
    Peer("quark", "AMD Quark", "amd-quark", ("amd-quark==0.13", TORCH, "onnxruntime>=1.22.2,<=1.28.0"), "quark_quantize.py",
         "quark.onnx imports torch and onnxruntime without declaring them (onnxruntime's range is its [cli] extra's)"),
)}


@dataclass
class PeerEnv:
    """A peer's environment as the benchmark found or made it."""

    peer: str
    python: Path | None  # None when it could not be made
    versions: dict[str, str] = field(default_factory=dict)
    install_seconds: float | None = None  # None: it was already there
    error: str | None = None
    log: Path | None = None

    def to_json(self) -> dict:
        return {"peer": self.peer, "distribution": PEERS[self.peer].distribution, "python": str(self.python) if self.python else None, "versions": self.versions,
                "install_seconds": self.install_seconds, "error": self.error, "log": str(self.log) if self.log else None,
                "requirements": list(PEERS[self.peer].requirements)}


def venv_python(root: Path, name: str) -> Path:
    return root / name / "bin" / "python"


def marker_for(peer: Peer) -> dict:
    """What an environment's marker file holds: the requirements and Python it was made from."""
    return {"requirements": list(peer.requirements), "python": ".".join(map(str, sys.version_info[:2]))}


def is_current(root: Path, peer: Peer) -> bool:
    """The environment exists and was made from exactly ``peer``'s requirements."""
    m = root / peer.name / MARKER
    try:
        return venv_python(root, peer.name).exists() and json.loads(m.read_text()) == marker_for(peer)
    except (OSError, ValueError):
        return False


def versions(python: Path, peer: Peer) -> dict[str, str]:
    """Installed versions of the peer and of the runtime pieces that shape its results."""
    dists = [peer.distribution, "onnx", "onnxruntime", "torch", "numpy"]
    code = ("import importlib.metadata as m, json\nout = {}\nfor d in %r:\n    try:\n        out[d] = m.version(d)\n"
            "    except m.PackageNotFoundError:\n        pass\nprint(json.dumps(out))") % dists
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def ensure(root: Path, name: str, log=lambda msg: None) -> PeerEnv:
    """The environment of peer ``name`` under ``root``, made (venv + pip install) when missing or stale.

    Never raises for a failed install: the returned :class:`PeerEnv` carries the last line of pip's
    output as ``error`` (its full output is in ``<root>/<name>.install.log``), and every row of
    that peer then reads "install failed: ..."."""
    peer = PEERS[name]
    root.mkdir(parents=True, exist_ok=True)
    logfile = root / f"{name}.install.log"
    py = venv_python(root, name)
    if is_current(root, peer):
        return PeerEnv(name, py, versions(py, peer), None, None, logfile)
    log(f"peers: making the {peer.title} environment ({root / name}): pip install {' '.join(peer.requirements)} ...")
    shutil.rmtree(root / name, ignore_errors=True)
    t = time.perf_counter()
    steps = [[sys.executable, "-m", "venv", str(root / name)],
             [str(py), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *peer.requirements]]
    with open(logfile, "w") as out:
        for argv in steps:
            out.write("$ " + " ".join(argv) + "\n")
            out.flush()
            try:
                rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=INSTALL_TIMEOUT).returncode
            except subprocess.TimeoutExpired:
                return PeerEnv(name, None, error=f"install failed: timeout ({INSTALL_TIMEOUT:.0f} s)", log=logfile)
            if rc != 0:
                lines = [ln.strip() for ln in logfile.read_text(errors="replace").splitlines() if ln.strip()]
                return PeerEnv(name, None, error="install failed: " + (lines[-1][:120] if lines else f"exit code {rc}"), log=logfile)
    (root / name / MARKER).write_text(json.dumps(marker_for(peer)))
    seconds = round(time.perf_counter() - t, 1)
    log(f"peers: {peer.title} environment made in {seconds:.0f} s")
    return PeerEnv(name, py, versions(py, peer), seconds, None, logfile)

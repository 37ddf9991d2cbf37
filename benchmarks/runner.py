"""Quantization runs: each one a child process measured by ``_measure.py`` (wall time, peak RSS, RSS cap, timeout).

onnxq runs through its CLI (``python -m onnxq optimize ... --no-cache --quiet --json``), ONNX
Runtime's quantizer through ``ort_quantize.py``, each peer through its script in ``peers/`` with its
own environment's interpreter (``peers/envs.py``); all read the same ``.npz`` calibration folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from _measure import Measurement, run_measured
from configs import ONNXQ_BATCH, Config
from peers.envs import PEERS, PeerEnv, ensure
from tasks import HERE, Task

T0 = time.perf_counter()
ORT_QUANTIZE = HERE / "ort_quantize.py"
#: what the JSON keeps of onnxq's own report (``optimize --json``) per run
ONNXQ_REPORT_KEYS = ("calibration_seconds", "refine_seconds", "total_seconds", "quantized_activations", "quantized_weights", "layers",
                     "left_in_float", "peak_rss_mb", "memory")


def log(msg: str) -> None:
    """Progress on stderr, stamped with the seconds since the benchmark started."""
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Runner:
    """Runs quantizations in capped child processes and keeps the cap and machine load of each."""

    def __init__(self, work: Path, mem_cap_gb: float, timeout: float, as_cap_gb: float = 0.0) -> None:
        self.work = work
        self.mem = int(mem_cap_gb * 2**30) if mem_cap_gb > 0 else None  # RSS cap (process group)
        self.as_mem = int(as_cap_gb * 2**30) if as_cap_gb > 0 else None  # address-space cap (RLIMIT_AS)
        self.timeout = timeout
        self.env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
        self.history: list[dict] = []  # cap and machine load of every run
        self.venvs = work / "venvs"  # the peers' environments (bench.py --peer-venvs)
        self.peer_envs: dict[str, PeerEnv] = {}  # made or found on first use

    def onnxq(self, task: Task, cfg: Config, out: Path, max_samples: int | None = None, batch_size: int | None = None, model: Path | None = None) -> Measurement:
        timeout = min(self.timeout, cfg.timeout) if cfg.timeout else None
        argv = [sys.executable, "-m", "onnxq", "optimize", str(model or task.model), "--data", str(task.calib)]
        for method in cfg.method.split("+"):  # composed methods: one -p each, in order
            argv += ["-p", method]
        for key, value in cfg.options:
            argv += ["-o", key, value]
        argv += ["--target", cfg.target, "--bits", str(cfg.bits), "--output", str(out), "--force", "--no-cache", "--quiet", "--json"]
        bs = batch_size or ONNXQ_BATCH[task.name]
        if bs:
            argv += ["--batch-size", str(bs)]
        if max_samples:
            argv += ["--max-samples", str(max_samples)]
        return self._run(argv, out, timeout)

    def ort(self, task: Task, method: str, out: Path, max_samples: int | None = None, model: Path | None = None,
            timeout: float | None = None) -> Measurement:
        argv = [sys.executable, str(ORT_QUANTIZE), str(model or task.model), str(out), str(task.calib), method]
        if max_samples:
            argv.append(str(max_samples))
        if task.name == "minilm" and method != "minmax":
            argv.append("--pad-seq")  # the histogram calibrators need one sequence length (see ort_quantize.py)
        return self._run(argv, out, min(self.timeout, timeout) if timeout else None)

    def peer_env(self, name: str) -> PeerEnv:
        """Peer ``name``'s environment, made on first use (minutes: pip install; not part of any row's time)."""
        if name not in self.peer_envs:
            self.peer_envs[name] = ensure(self.venvs, name, log)
        return self.peer_envs[name]

    def peer(self, task: Task, cfg: Config, out: Path, max_samples: int | None = None) -> Measurement:
        """Peer ``cfg.tool`` with recipe ``cfg.method``: its script in its own environment, measured like the rest.

        An environment that could not be made gives an "error" measurement carrying pip's last line."""
        env = self.peer_env(cfg.tool)
        if env.python is None:
            return Measurement(argv=[], status="error", returncode=None, wall_s=0.0, peak_rss_mb=0.0, stderr=env.error or "install failed")
        # the peer gets its own copy of the model: some write next to it or into it (ModelOpt saves its
        # shape-inferred graph over the input; the digits model is the repository's own file)
        private = out.parent / f"{out.stem}.input"
        model = private_copy(Path(task.model), private)
        argv = [str(env.python), str(HERE / "peers" / PEERS[cfg.tool].script), str(model), str(out), str(task.calib), cfg.method]
        if max_samples:
            argv.append(str(max_samples))
        if task.name == "minilm":
            argv.append("--pad-seq")  # one sequence length, for the peers that stack or concatenate batches (see peers/npz_feeds.py)
        timeout = min(self.timeout, cfg.timeout) if cfg.timeout else None
        try:
            m = self._run(argv, out, timeout, cwd=private)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        if m.ok:
            try:
                m.extra["peer_report"] = json.loads(m.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                pass
        return m

    def cap(self, limit: int | None = None) -> int | None:
        """The memory cap for the next run: ``limit`` (default: --mem-cap-gb, the RSS cap), lowered
        to what the machine can give right now (MemAvailable - 1.5 GB), so a run over it is killed
        alone instead of pushing the whole machine (and other people's processes) into swap or the
        kernel's OOM killer."""
        limit = self.mem if limit is None else limit
        if not limit:
            return None
        avail = available_memory()
        return limit if avail is None else max(2 * 2**30, min(limit, avail - int(1.5 * 2**30)))

    def _run(self, argv: list[str], out: Path, timeout: float | None = None, cwd: Path | None = None) -> Measurement:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.unlink()
        load = os.getloadavg()[0]
        m = run_measured(argv, timeout=timeout or self.timeout, rss_limit_bytes=self.cap(),
                         mem_limit_bytes=self.cap(self.as_mem) if self.as_mem else None, cwd=cwd or self.work, env=self.env)
        m.extra["loadavg_1min_before"] = round(load, 2)
        m.extra["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
        self.history.append({"cap_mb": m.rss_limit_mb, "as_cap_mb": m.mem_limit_mb,
                             "load_before": m.extra["loadavg_1min_before"], "load_after": m.extra["loadavg_1min_after"]})
        if m.ok and not out.exists():
            m.status = "error"
            m.stderr += "\n(no output model was written)"
        if m.ok and "onnxq" in argv[1:3]:
            try:
                rep = json.loads(m.stdout)["report"]
                m.extra["onnxq_report"] = {k: rep.get(k) for k in ONNXQ_REPORT_KEYS}
            except Exception:
                pass
        return m


def short_error(m: Measurement) -> str:
    """A failed run as one table cell: '> 18.0 GB (killed after N s)', 'OOM', 'timeout (N s)' or 'error: ...'."""
    if m.rss_capped:  # a lower bound: it needed more than the cap
        return f"> {m.rss_limit_mb / 1024:.1f} GB (killed after {m.wall_s:.0f} s)"
    if m.status == "oom":
        return f"OOM (address-space cap {m.mem_limit_mb / 1024:.1f} GB)" if m.mem_limit_mb else "OOM"
    if m.status == "timeout":
        return f"timeout ({m.timeout_s:.0f} s)" if m.timeout_s else "timeout"
    line = m.error_line(200)
    for prefix in ("onnxq: internal error: ", "onnxq: error: "):
        if line.startswith(prefix):
            line = line[len(prefix):]
    line = line.replace(" (run with --debug for the traceback; please report it)", "")
    return "error: " + (line if len(line) <= 70 else line[:67] + "...")


def private_copy(model: Path, folder: Path) -> Path:
    """``model`` and its external-data files copied into a fresh ``folder``; the copy's path."""
    import onnx

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy2(model, folder / model.name)
    proto = onnx.load(str(model), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and not (folder / e.value).exists():
                (folder / e.value).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(model.parent / e.value, folder / e.value)
    return folder / model.name

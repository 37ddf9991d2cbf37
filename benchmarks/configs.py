"""What the suite runs: its models, data sizes, time caps and the rows (configurations) of each model's table."""

from __future__ import annotations

from dataclasses import dataclass

MODELS = ("digits", "ppocr-rec", "ppocr-det", "minilm")
CALIB_SEED, EVAL_SEED = 1, 2
REC_FILE_BATCH = 8  # lines per .npz file (the batch ORT's calibrator sees)

#: onnxq --batch-size for the main tables: None = the CLI default (16). It is a performance
#: knob only ("results do not depend on it"); ``--batch-size-probe`` adds a table of its effect on time
#: and peak RSS. ``--onnxq-batch-size`` overrides it.
ONNXQ_BATCH: dict[str, int | None] = {"digits": None, "ppocr-rec": None, "ppocr-det": None, "minilm": None}
PROBE_BATCH_SIZES = (4, 1)
EASYQUANT_OCR_TIMEOUT = 420.0  # s per easyquant run on ppocr-rec / ppocr-det (onnxq minmax takes ~6-15 s there)
ORT_HISTOGRAM_TIMEOUT = 900.0  # s per ORT Percentile / Entropy run (Percentile on ppocr-rec takes ~140 s at ~5.5 GB)

SIZES = {
    "full": {
        "rec_calib": 128, "rec_eval": 256, "det_calib": 16, "det_eval": 24, "det_size": 640,
        "latency_repeats": {"digits": 300, "ppocr-rec": 30, "ppocr-det": 12, "minilm": 20},
        "minilm_calib": 256, "minilm_pairs": None,
        "flat": {"digits": (64, 256), "ppocr-rec": (32, 128)},
        "ort_histogram": MODELS,  # models with ORT Percentile and Entropy rows
        "s8_rounds": 6,
        "probes": True,
    },
    "quick": {
        "rec_calib": 8, "rec_eval": 16, "det_calib": 1, "det_eval": 2, "det_size": 640,
        "latency_repeats": {"digits": 100, "ppocr-rec": 6, "ppocr-det": 3, "minilm": 5},
        "minilm_calib": 32, "minilm_pairs": 64,
        "flat": {"digits": (32, 128)},
        "ort_histogram": ("digits",),
        "s8_rounds": 3,
        "probes": False,
    },
}


#: per model, the metric columns of its table: (header, metrics key, format); the first is the
#: headline metric (higher is better) that the memory/time check ranks rows by
METRIC_COLUMNS = {
    "digits": [("top-1 acc", "top1_accuracy", ".4f"), ("top-1 agree FP32", "top1_agreement_fp32", ".4f")],
    "ppocr-rec": [("char acc", "char_accuracy", ".4f"), ("char agree FP32", "char_agreement_fp32", ".4f"), ("line acc", "line_accuracy", ".4f")],
    "ppocr-det": [("box F1 vs FP32", "box_f1_fp32", ".4f"), ("prob MAE vs FP32", "prob_map_mae_fp32", ".5f"), ("box F1 vs truth", "box_f1_truth", ".4f")],
    "minilm": [("recall@1", "recall_at_1", ".4f"), ("recall d FP32", "recall_delta_fp32", "+.4f"), ("cos mean FP32", "cosine_mean_fp32", ".5f"),
               ("cos min FP32", "cosine_min_fp32", ".4f"), ("top-1 agree FP32", "top1_agreement_fp32", ".4f"), ("speed-up 1t", "speedup_1t", ".2f")],
}


@dataclass
class Config:
    """One row of a model's table: a tool and, for onnxq, its methods, target, bits and options."""

    key: str
    label: str
    tool: str  # "fp32" | "onnxq" | "ort" | a peer of PEER_TITLES (method = that peer's recipe)
    method: str | None = None
    target: str | None = None
    bits: int = 8
    timeout: float | None = None  # per-run cap below --timeout (s); None = --timeout
    options: tuple[tuple[str, str], ...] = ()  # onnxq -o KEY VALUE pairs (METHOD.KEY targets one method)

    def to_json(self) -> dict:
        return {"key": self.key, "label": self.label, "tool": self.tool, "method": self.method, "target": self.target, "bits": self.bits,
                "timeout_s": self.timeout, "options": [list(o) for o in self.options]}


def configs_for(model: str, sizes: dict) -> list[Config]:
    """Every row of ``model``'s table, FP32 first, then onnxq, ORT's quantizer and the peers."""
    if model == "minilm":
        return minilm_configs(sizes)
    rows = [Config("fp32", "FP32", "fp32")]
    for m in ("minmax", "percentile", "mse", "trt-entropy"):
        rows.append(Config(f"onnxq-{m}", f"onnxq {m}", "onnxq", m, "ort", 8))
    # EasyQuant (per-layer cosine scale search on top of trt-entropy initial ranges): its search
    # time is part of its quant wall time; the line under each table divides it by onnxq minmax's.
    # On PP-OCR each easyquant run is capped at EASYQUANT_OCR_TIMEOUT s (well past the 10x goal) so
    # that one slow search cannot eat the whole benchmark's time budget.
    eq_timeout = None if model == "digits" else EASYQUANT_OCR_TIMEOUT
    rows.append(Config("onnxq-easyquant", "onnxq easyquant", "onnxq", "easyquant", "ort", 8, eq_timeout))
    if model in ("digits", "ppocr-rec"):
        rows.append(Config("onnxq-easyquant-int7", "onnxq easyquant INT7", "onnxq", "easyquant", "ort", 7, eq_timeout))
    mse_opts = (("metric", "mse"), ("act_init", "mse"))
    if model in ("ppocr-rec", "ppocr-det"):
        # the paper's cosine objective and a KL start hurt PP-OCR's hard-swish nets; the
        # magnitude-aware objective from an mse start is onnxq's configuration for them
        rows.append(Config("onnxq-easyquant-mse", "onnxq easyquant metric=mse act_init=mse", "onnxq", "easyquant", "ort", 8, eq_timeout, mse_opts))
    if model == "ppocr-rec":
        rows.append(Config("onnxq-easyquant-mse-int7", "onnxq easyquant INT7 metric=mse act_init=mse", "onnxq", "easyquant", "ort", 7, eq_timeout, mse_opts))
        rows.append(Config("onnxq-easyquant-mse-r2", "onnxq easyquant metric=mse act_init=mse rounds=2", "onnxq", "easyquant", "ort", 8, eq_timeout,
                           mse_opts + (("rounds", "2"),)))
    if model in ("ppocr-rec", "ppocr-det"):
        rows.append(Config("onnxq-equalize-mse", "onnxq equalize+mse", "onnxq", "equalize+mse", "ort", 8))
    if model in ("digits", "ppocr-rec"):
        rows.append(Config("onnxq-trt-entropy-int7", "onnxq trt-entropy INT7", "onnxq", "trt-entropy", "ort", 7))
    if model == "digits":
        rows.append(Config("onnxq-trt-entropy-trt", "onnxq trt-entropy --target trt", "onnxq", "trt-entropy", "trt", 8))
        rows.append(Config("onnxq-trt-entropy-trt-int7", "onnxq trt-entropy INT7 --target trt", "onnxq", "trt-entropy", "trt", 7))
        rows.append(Config("onnxq-easyquant-trt-int7", "onnxq easyquant INT7 --target trt", "onnxq", "easyquant", "trt", 7))
    if model in ("digits", "ppocr-rec"):
        rows.append(Config("onnxq-minmax-s8", "onnxq minmax --target ort-s8", "onnxq", "minmax", "ort-s8", 8))
    return rows + ort_configs() + peer_configs(model)


def ort_configs() -> list[Config]:
    """ORT quantize_static with MinMax and with its two histogram calibrators (on every model;
    the driver drops the histogram rows under --quick and --skip-ort-histogram)."""
    return [Config("ort-minmax", "ORT quantize_static MinMax", "ort", "minmax"),
            Config("ort-percentile", "ORT quantize_static Percentile", "ort", "percentile", timeout=ORT_HISTOGRAM_TIMEOUT),
            Config("ort-entropy", "ORT quantize_static Entropy", "ort", "entropy", timeout=ORT_HISTOGRAM_TIMEOUT)]


ORT_HISTOGRAM_KEYS = ("ort-percentile", "ort-entropy")


def minilm_configs(sizes: dict) -> list[Config]:
    """MiniLM: the calibrators with onnxq's transformer placement, SmoothQuant on top, ORT's quantizer.

    ``method`` joins composed methods with ``+`` (one ``-p`` each)."""
    rows = [Config("fp32", "FP32", "fp32")]
    for m in ("minmax", "percentile", "mse", "trt-entropy"):
        rows.append(Config(f"onnxq-{m}", f"onnxq {m}", "onnxq", m, "ort", 8))
    rows.append(Config("onnxq-smoothquant-minmax", "onnxq smoothquant+minmax", "onnxq", "smoothquant+minmax", "ort", 8))
    rows.append(Config("onnxq-smoothquant-mse", "onnxq smoothquant+mse", "onnxq", "smoothquant+mse", "ort", 8))
    return rows + ort_configs() + peer_configs("minilm")


#: the peer quantizers (benchmarks/peers/: one script and one virtual environment each), by Config.tool
PEER_TITLES = {"modelopt": "NVIDIA Model Optimizer", "nncf": "NNCF", "quark": "AMD Quark"}
PEER_TIMEOUT = 900.0  # s per peer run (ModelOpt's entropy calibration keeps every activation like ORT's)
#: per model, the fidelity-to-FP32 metric of the "onnxq vs peers" table (higher is better)
PEER_FIDELITY = {"digits": ("top-1 agree FP32", "top1_agreement_fp32", ".4f"), "ppocr-rec": ("char agree FP32", "char_agreement_fp32", ".4f"),
                 "ppocr-det": ("box F1 vs FP32", "box_f1_fp32", ".4f"), "minilm": ("cos mean FP32", "cosine_mean_fp32", ".5f")}


def peer_configs(model: str) -> list[Config]:
    """The peers' rows, last in every table: ModelOpt's ONNX PTQ (int8, entropy and max calibration, on
    CPU), NNCF (its defaults; MiniLM also ``model_type=TRANSFORMER``) and AMD Quark's U8S8 and A8W8
    presets. ``bench.py --peers`` picks which peers run; their scripts document each recipe."""
    rows = [Config("modelopt-entropy", "ModelOpt int8 entropy", "modelopt", "entropy", timeout=PEER_TIMEOUT),
            Config("modelopt-max", "ModelOpt int8 max", "modelopt", "max", timeout=PEER_TIMEOUT),
            Config("nncf-default", "NNCF default", "nncf", "default", timeout=PEER_TIMEOUT)]
    if model == "minilm":  # NNCF's transformer patterns apply to the transformer only
        rows.append(Config("nncf-transformer", "NNCF model_type=TRANSFORMER", "nncf", "transformer", timeout=PEER_TIMEOUT))
    rows += [Config("quark-u8s8", "Quark U8S8", "quark", "u8s8", timeout=PEER_TIMEOUT),
             Config("quark-a8w8", "Quark A8W8", "quark", "a8w8", timeout=PEER_TIMEOUT)]
    return rows

"""Offline, seeded OCR data and metrics for benchmarking quantized PP-OCRv4 models.

Everything here is generated locally and deterministically from a seed: no
downloads, no data sets.  The two models come from the ``rapidocr_onnxruntime``
wheel (``ch_PP-OCRv4_rec_infer.onnx`` / ``ch_PP-OCRv4_det_infer.onnx``).

Recognition (rec)
    :func:`render_lines` -> RGB text-line crops + ground-truth strings,
    :func:`preprocess_rec` / :func:`rec_feeds` -> fixed-shape ``{input: NCHW}``
    feeds, :func:`decode_rec` (CTC greedy), :func:`char_accuracy`,
    :func:`char_agreement`.
Detection (det)
    :func:`render_pages` -> RGB pages + ground-truth line boxes,
    :func:`preprocess_det` / :func:`det_feeds`, :func:`decode_det` (probability
    map -> boxes), :func:`box_f1`, :func:`prob_map_error`.

Conventions follow rapidocr/PaddleOCR: images are fed in BGR channel order;
rec input is height 48, aspect-preserving resize, ``(x/255-0.5)/0.5``, zero
padding on the right (we pad to a fixed width so batches stack); det input is
resized to multiples of 32 and normalized with mean = std = 0.5 (the values in
rapidocr 1.4.4's ``config.yaml``; PaddleOCR itself uses ImageNet statistics, pass
``mean``/``std`` to use those).  Boxes are axis-aligned ``[x0, y0, x1, y1]``.

Run ``python benchmarks/ocr_data.py`` for an FP32 smoke test.
"""
from __future__ import annotations

import functools
import glob
import math
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

REC_HEIGHT = 48
REC_WIDTH = 320
DET_THRESH = 0.3

# Degradations applied to text-line crops (tuned so FP32 reads ~95-98% of chars).
LINE_STYLE = {
    "font_px": (14, 40),     # font size range; small fonts get upscaled to 48 px
    "max_angle": 3.0,        # rotation in degrees, uniform in [-a, a]
    "max_noise": 12.0,       # Gaussian noise sigma, uniform in [0, s]
    "max_blur": 1.3,         # Gaussian blur sigma, uniform in [0, b]
    "min_scale": 0.5,        # down/up-sampling round trip factor, uniform in [m, 1]
    "bg": (140.0, 255.0),    # background grey level
    "ink": (0.0, 100.0),     # text grey level
    "min_contrast": 70.0,    # background minus ink, at least
}

# Small built-in vocabularies (every character is in the PP-OCRv4 dictionary).
EN_WORDS = (
    "the of and to in is for on with as by at from this that are was be have not "
    "data model total price order invoice number date time name address phone email "
    "account balance amount payment receipt store market coffee water table chair "
    "window house street city north south east west river green black white orange "
    "paper print quick brown fox jumps over lazy dog open close start stop level "
    "speed power energy system network server client report summary office school "
    "station airport ticket hotel room floor page line text image value result"
).split()
ZH_WORDS = (
    "中国 北京 上海 广州 深圳 时间 价格 电话 地址 公司 学生 人民 银行 医院 发票 日期 金额 "
    "合计 数量 名称 编号 服务 有限公司 欢迎光临 今天 明天 天气 工作 学习 问题 市场 经济 发展 "
    "技术 网络 数据 系统 管理 信息 产品 质量 安全 环境 教育 文化 历史 大学 城市 交通 火车站 "
    "机场 出口 入口 停车场 超市 餐厅 早餐 午餐 晚餐 咖啡 牛奶 水果 苹果 香蕉 会议 报告 计划 "
    "开始 结束 单价 总计 姓名 年龄 请勿吸烟 注意 小心 通知 手机 电脑"
).split()

_LATIN_FONT_NAMES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf", "LiberationSans-Regular.ttf",
)
_CJK_FONT_GLOBS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc",
    "/usr/share/fonts/**/*CJK*.tt[cf]", "/usr/share/fonts/**/wqy*.tt[cf]",
)


# --------------------------------------------------------------------------- models / fonts
def model_path(kind: str) -> Path:
    """Path of rapidocr's bundled PP-OCRv4 model, ``kind`` in {"rec", "det"}."""
    import rapidocr_onnxruntime  # only needed to locate the bundled files

    root = Path(rapidocr_onnxruntime.__file__).parent / "models"
    return root / f"ch_PP-OCRv4_{kind}_infer.onnx"


def input_name(path: str | os.PathLike | None = None, kind: str = "rec") -> str:
    """Name of the (single) graph input of an ONNX model, read from the file."""
    import onnx

    model = onnx.load(str(path or model_path(kind)), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


@functools.lru_cache(maxsize=4)
def load_charset(path: str | os.PathLike | None = None) -> tuple[str, ...]:
    """CTC label list of the rec model: ``blank`` at 0, dictionary, then ``" "``.

    The dictionary is embedded in the ONNX metadata under ``character`` (one char
    per line), which is where rapidocr reads it from; rapidocr then inserts the
    blank token at index 0 and appends a space, giving 6625 classes.
    """
    import onnx

    model = onnx.load(str(path or model_path("rec")), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise KeyError(f"{path}: no 'character' metadata; pass a dictionary file instead")
    return ("<blank>", *meta["character"].splitlines(), " ")


@functools.lru_cache(maxsize=1)
def find_fonts() -> dict[str, list[str]]:
    """TrueType fonts found on this machine: ``{"latin": [...], "cjk": [...]}``.

    CJK fonts come from Debian packages (``apt-get install fonts-wqy-microhei``
    or ``fonts-noto-cjk``); without one, only Latin lines are rendered.  If even
    DejaVu is missing, Pillow's built-in scalable default font is used.
    """
    latin: list[str] = []
    for name in _LATIN_FONT_NAMES:
        latin += sorted(glob.glob(f"/usr/share/fonts/**/{name}", recursive=True))[:1]
    cjk: list[str] = []
    for pattern in _CJK_FONT_GLOBS:
        for hit in sorted(glob.glob(pattern, recursive=True)):
            if hit not in cjk:
                cjk.append(hit)
    return {"latin": latin, "cjk": cjk[:2]}


@functools.lru_cache(maxsize=512)
def _font(path: str | None, size: int) -> ImageFont.FreeTypeFont:
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(path, size=size)


def _pick_font(
    rng: np.random.Generator, text: str, cjk: bool, sizes: tuple[int, int]
) -> ImageFont.FreeTypeFont:
    """A random font able to draw ``text``; Pillow's default font if none is installed.

    CJK fonts are only used when ``cjk`` is on, so Latin-only data does not
    depend on whether a CJK font happens to be installed.
    """
    fonts = find_fonts()
    if any(map(_is_zh, text)):
        pool = fonts["cjk"]
    else:
        pool = fonts["latin"] + (fonts["cjk"][:1] if cjk else [])
    size = int(rng.integers(*sizes))
    return _font(pool[int(rng.integers(len(pool)))] if pool else None, size)


# --------------------------------------------------------------------------- rendering
def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    """One independent generator per item, so item i does not depend on n."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _token(rng: np.random.Generator, cjk: bool) -> str:
    kind = rng.choice(["en", "num", "zh"], p=[0.45, 0.25, 0.30] if cjk else [0.65, 0.35, 0.0])
    if kind == "zh":
        return str(rng.choice(ZH_WORDS))
    if kind == "num":
        form = rng.integers(6)
        if form == 0:
            return str(rng.integers(0, 100000))
        if form == 1:
            return f"{rng.uniform(0, 1000):.2f}"
        if form == 2:
            return f"{rng.integers(1990, 2031)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
        if form == 3:
            return f"${rng.uniform(0, 500):.2f}"
        if form == 4:
            return f"{rng.integers(0, 101)}%"
        return f"No.{rng.integers(1, 1000)}"
    word = str(rng.choice(EN_WORDS))
    case = rng.integers(4)
    return word.capitalize() if case == 0 else word.upper() if case == 1 else word


def _make_text(rng: np.random.Generator, cjk: bool, max_tokens: int) -> str:
    out = ""
    for _ in range(int(rng.integers(1, max_tokens + 1))):
        tok = _token(rng, cjk)
        # Chinese words follow each other without a space, as in real text.
        glue = "" if not out or (_is_zh(out[-1]) and _is_zh(tok[0])) else " "
        out += glue + tok
    return out


def _is_zh(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff"


def cjk_enabled(cjk: bool | None) -> bool:
    """Resolve the ``cjk`` option: None = "if a CJK font is installed"."""
    have = bool(find_fonts()["cjk"])
    return have if cjk is None else bool(cjk) and have


def _text_alpha(text: str, font: ImageFont.FreeTypeFont, angle: float = 0.0) -> np.ndarray:
    """Anti-aliased ink coverage (float32 in [0, 1]) of ``text``, cropped to the ink."""
    x0, y0, x1, y1 = font.getbbox(text)
    pad = 4
    mask = Image.new("L", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), 0)
    ImageDraw.Draw(mask).text((pad - x0, pad - y0), text, font=font, fill=255)
    if angle:
        mask = mask.rotate(angle, resample=Image.BICUBIC, expand=True)
    bbox = mask.getbbox() or (0, 0, 1, 1)
    return np.asarray(mask.crop(bbox), dtype=np.float32) / 255.0


def _compose(bg: np.ndarray, alpha: np.ndarray, color: np.ndarray, x: int, y: int) -> None:
    """Blend ``color`` into ``bg`` (H, W, 3 float) at (x, y) with coverage ``alpha``."""
    h, w = alpha.shape
    a = alpha[..., None]
    bg[y:y + h, x:x + w] = bg[y:y + h, x:x + w] * (1 - a) + color * a


def _finish(
    img: np.ndarray, rng: np.random.Generator, max_sigma: float, max_blur: float, min_scale: float = 1.0
) -> np.ndarray:
    """Optional low-resolution round trip, Gaussian blur + noise, then back to uint8."""
    scale = rng.uniform(min_scale, 1.0)
    if scale < 0.95:
        h, w = img.shape[:2]
        small_size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = cv2.resize(img, small_size, interpolation=cv2.INTER_AREA)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    blur = rng.uniform(0, max_blur)
    if blur > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    img = img + rng.normal(0, rng.uniform(0, max_sigma), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(background, ink) RGB colours with a comfortable but varying contrast."""
    bg_level, ink_level = rng.uniform(*LINE_STYLE["bg"]), rng.uniform(*LINE_STYLE["ink"])
    ink_level = min(ink_level, bg_level - LINE_STYLE["min_contrast"])
    bg = bg_level + rng.uniform(-12, 12, 3)
    ink = ink_level + rng.uniform(-20, 20, 3)
    if rng.random() < 0.15:  # light text on a dark background
        bg, ink = 255 - bg, 255 - ink
    return np.clip(bg, 0, 255), np.clip(ink, 0, 255)


def render_line(
    rng: np.random.Generator, cjk: bool | None = None, max_aspect: float = REC_WIDTH / REC_HEIGHT
) -> tuple[np.ndarray, str]:
    """One text-line crop (H, W, 3 uint8 RGB) and its text; width/height <= ``max_aspect``."""
    use_cjk = cjk_enabled(cjk)
    text = _make_text(rng, use_cjk, max_tokens=4)
    font = _pick_font(rng, text, use_cjk, LINE_STYLE["font_px"])
    angle = float(rng.uniform(-1, 1) * LINE_STYLE["max_angle"])
    mx, my = int(rng.integers(2, 12)), int(rng.integers(2, 9))
    while True:  # drop trailing tokens until the crop fits the fixed rec width
        alpha = _text_alpha(text, font, angle)
        h, w = alpha.shape[0] + 2 * my, alpha.shape[1] + 2 * mx
        if w / h <= max_aspect or len(text) <= 2:
            break
        text = text.rsplit(" ", 1)[0] if " " in text else text[: max(2, len(text) * 3 // 4)]
    bg, ink = _colors(rng)
    img = np.empty((h, w, 3), np.float32)
    img[:] = bg
    _compose(img, alpha, ink, mx, my)
    style = LINE_STYLE
    return _finish(img, rng, style["max_noise"], style["max_blur"], style["min_scale"]), text


def render_lines(n: int, seed: int = 0, cjk: bool | None = None) -> tuple[list[np.ndarray], list[str]]:
    """``n`` text-line images (RGB uint8, variable size) and their ground truth.

    ``cjk=None`` mixes in Chinese when a CJK font is installed; ``False`` forces
    Latin-only lines (identical data on machines with and without CJK fonts).
    """
    pairs = [render_line(r, cjk) for r in _rngs(seed, n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _line_box(text: str, font: ImageFont.FreeTypeFont) -> tuple[int, int, int, int]:
    """Ground-truth box of ``text`` drawn at the origin (anchor "la").

    Horizontally the ink extent; vertically the ink extent united with the
    font's "Hg" band (cap height to descender), so "room" and "Hotel" in one
    font get equally tall boxes, as a human annotator would draw them.
    """
    x0, y0, x1, y1 = font.getbbox(text)
    _, ry0, _, ry1 = font.getbbox("Hg")
    return x0, min(y0, ry0), x1, max(y1, ry1)


def _too_close(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when two boxes are closer than half a line vertically / 1.5 lines horizontally.

    Lines in the same row closer than that are legitimately read as one line by
    the detector, which would make the ground truth ambiguous.
    """
    h = max(a[3] - a[1], b[3] - b[1])
    gx, gy = 1.5 * h, 0.5 * h
    return not (a[2] + gx <= b[0] or b[2] + gx <= a[0] or a[3] + gy <= b[1] or b[3] + gy <= a[1])


def render_page(
    rng: np.random.Generator, size: int = 640, cjk: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One page (size x size x 3 uint8 RGB) with 5-10 lines and their (K, 4) float32 boxes."""
    use_cjk = cjk_enabled(cjk)
    bg = np.clip(rng.uniform(215, 255) + rng.uniform(-8, 8, 3), 0, 255)
    page = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(page)
    boxes: list[list[float]] = []
    want = int(rng.integers(5, 11))
    for _ in range(8 * want):  # rejection sampling of non-crowding positions
        if len(boxes) == want:
            break
        text = _make_text(rng, use_cjk, max_tokens=5)
        font = _pick_font(rng, text, use_cjk, (12, 48))
        x0, y0, x1, y1 = _line_box(text, font)
        if x1 - x0 >= size - 16 or y1 - y0 >= size - 16:
            continue
        ox = int(rng.integers(8, size - (x1 - x0) - 8)) - x0
        oy = int(rng.integers(8, size - (y1 - y0) - 8)) - y0
        box = [float(x0 + ox), float(y0 + oy), float(x1 + ox), float(y1 + oy)]
        if any(_too_close(box, other) for other in boxes):
            continue
        ink = np.clip(rng.uniform(0, 140) + rng.uniform(-20, 20, 3), 0, 255)
        draw.text((ox, oy), text, font=font, fill=tuple(int(v) for v in ink))
        boxes.append(box)
    img = _finish(np.asarray(page, np.float32), rng, max_sigma=10.0, max_blur=1.0)
    return img, np.asarray(boxes, np.float32).reshape(-1, 4)


def render_pages(
    m: int, seed: int = 0, size: int = 640, cjk: bool | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``m`` pages and, per page, ground-truth line boxes ``(K, 4)`` as x0, y0, x1, y1."""
    pairs = [render_page(r, size, cjk) for r in _rngs(seed + 1_000_003, m)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# --------------------------------------------------------------------------- preprocessing
def preprocess_rec(
    images: Sequence[np.ndarray], name: str = "x", width: int = REC_WIDTH, height: int = REC_HEIGHT
) -> dict[str, np.ndarray]:
    """Stack RGB crops into the rec input ``{name: (N, 3, height, width) float32}``.

    Each crop is resized to ``height`` keeping its aspect (width capped at
    ``width``), converted to BGR, normalized ``(x/255 - 0.5)/0.5`` and padded
    with zeros on the right, like rapidocr's ``resize_norm_img`` with a fixed
    ``max_wh_ratio = width/height``.
    """
    batch = np.zeros((len(images), 3, height, width), np.float32)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        new_w = min(width, int(math.ceil(height * w / h)))
        resized = cv2.resize(np.ascontiguousarray(img[..., ::-1]), (new_w, height))
        batch[i, :, :, :new_w] = (resized.astype(np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
    return {name: batch}


def preprocess_det(
    images: Sequence[np.ndarray],
    name: str = "x",
    size: tuple[int, int] | None = None,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> dict[str, np.ndarray]:
    """Stack RGB pages into the det input ``{name: (N, 3, H, W) float32}``.

    ``size`` is (H, W), multiples of 32; by default each dimension of the first
    image is rounded to the nearest multiple of 32.  Images are converted to BGR
    and normalized ``(x/255 - mean)/std`` (PaddleOCR's ImageNet values are
    ``mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)``).
    """
    if size is None:
        h, w = images[0].shape[:2]
        size = (max(32, int(round(h / 32)) * 32), max(32, int(round(w / 32)) * 32))
    if size[0] % 32 or size[1] % 32:
        raise ValueError(f"det size {size} must be multiples of 32")
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    batch = np.empty((len(images), 3, *size), np.float32)
    for i, img in enumerate(images):
        bgr = np.ascontiguousarray(img[..., ::-1])
        if bgr.shape[:2] != size:
            bgr = cv2.resize(bgr, (size[1], size[0]))
        batch[i] = ((bgr.astype(np.float32) / 255 - m) / s).transpose(2, 0, 1)
    return {name: batch}


def _batched(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def rec_feeds(
    images: Sequence[np.ndarray], batch_size: int = 8, name: str | None = None, width: int = REC_WIDTH
) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape rec feeds, ``batch_size`` crops each (last batch may be smaller)."""
    name = name or input_name(kind="rec")
    for chunk in _batched(images, batch_size):
        yield preprocess_rec(chunk, name, width)


def det_feeds(
    pages: Sequence[np.ndarray], batch_size: int = 1, name: str | None = None, **kw
) -> Iterator[dict[str, np.ndarray]]:
    """Det feeds of ``batch_size`` pages each (all pages must share one size)."""
    name = name or input_name(kind="det")
    for chunk in _batched(pages, batch_size):
        yield preprocess_det(chunk, name, **kw)


def save_feeds(feeds: Iterable[dict[str, np.ndarray]], folder: str | os.PathLike) -> list[Path]:
    """Write each feed dict as ``folder/feed_0000.npz`` (keys = model input names)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, feed in enumerate(feeds):
        paths.append(out / f"feed_{i:04d}.npz")
        np.savez(paths[-1], **feed)
    return paths


# --------------------------------------------------------------------------- rec decoding / metrics
def decode_rec(logits: np.ndarray, charset: Sequence[str] | None = None) -> list[str]:
    """CTC greedy decoding of ``(N, T, C)`` scores: argmax, merge repeats, drop blank (0)."""
    chars = charset or load_charset()
    idx = np.asarray(logits).argmax(axis=-1)
    if idx.ndim == 1:
        idx = idx[None]
    keep = np.ones_like(idx, dtype=bool)
    keep[:, 1:] = idx[:, 1:] != idx[:, :-1]
    keep &= idx != 0
    return ["".join(chars[j] for j in row[k]) for row, k in zip(idx, keep)]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit costs) between two strings, as the fidelity check measures CTC decodes."""
    from onnxq.evaluate.metrics import edit_distance as ids_distance

    return ids_distance(*(np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32) for t in (a, b)))


def _norm(s: str, ignore_spaces: bool) -> str:
    return s.replace(" ", "") if ignore_spaces else s


def char_agreement(pred_a: Sequence[str], pred_b: Sequence[str], ignore_spaces: bool = False) -> float:
    """Mean over lines of ``1 - edit_distance / max(len_a, len_b)`` (1.0 = identical)."""
    if len(pred_a) != len(pred_b):
        raise ValueError("prediction lists differ in length")
    scores = []
    for a, b in zip(pred_a, pred_b):
        a, b = _norm(a, ignore_spaces), _norm(b, ignore_spaces)
        scores.append(1.0 - edit_distance(a, b) / max(len(a), len(b), 1))
    return float(np.mean(scores)) if scores else 1.0


def char_accuracy(pred: Sequence[str], truth: Sequence[str], ignore_spaces: bool = True) -> float:
    """``1 - total_edits / total_truth_chars`` (i.e. 1 - CER), floored at 0.

    Spaces are ignored by default: the rec model is free to drop or insert the
    gap between words, which says nothing about reading the characters.
    """
    if len(pred) != len(truth):
        raise ValueError("prediction and truth lists differ in length")
    edits = sum(edit_distance(_norm(p, ignore_spaces), _norm(t, ignore_spaces)) for p, t in zip(pred, truth))
    total = sum(len(_norm(t, ignore_spaces)) for t in truth)
    return max(0.0, 1.0 - edits / max(total, 1))


def line_accuracy(pred: Sequence[str], truth: Sequence[str], ignore_spaces: bool = True) -> float:
    """Fraction of lines read exactly."""
    hits = [_norm(p, ignore_spaces) == _norm(t, ignore_spaces) for p, t in zip(pred, truth)]
    return float(np.mean(hits)) if hits else 1.0


# --------------------------------------------------------------------------- det decoding / metrics
def decode_det(
    prob: np.ndarray,
    out_size: tuple[int, int] | None = None,
    thresh: float = DET_THRESH,
    box_thresh: float = 0.5,
    unclip_ratio: float = 1.6,
    min_size: float = 3.0,
) -> list[np.ndarray]:
    """DB post-processing: ``(N, 1, H, W)`` probability maps -> per image ``(K, 4)`` boxes.

    Threshold at ``thresh``, dilate 2x2, take connected regions (cv2 contours),
    drop those whose mean probability < ``box_thresh``, then grow each region's
    minimum-area rectangle by ``d = area * unclip_ratio / perimeter`` on every
    side (DB's "unclip"; exact for rectangles) and return its axis-aligned
    bounds, scaled to ``out_size`` (H, W) if given.
    """
    maps = np.asarray(prob, np.float32).reshape(-1, *np.shape(prob)[-2:])
    results = []
    for pm in maps:
        h, w = pm.shape
        mask = cv2.dilate((pm > thresh).astype(np.uint8), np.ones((2, 2), np.uint8))
        contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        sy, sx = (out_size[0] / h, out_size[1] / w) if out_size else (1.0, 1.0)
        boxes = []
        for c in contours:
            (cx, cy), (rw, rh), ang = cv2.minAreaRect(c)
            if min(rw, rh) < min_size:
                continue
            x, y, bw, bh = cv2.boundingRect(c)
            region = np.zeros((bh, bw), np.uint8)
            cv2.fillPoly(region, [c - [x, y]], 1)
            if pm[y:y + bh, x:x + bw][region > 0].mean() < box_thresh:
                continue
            d = rw * rh * unclip_ratio / max(2 * (rw + rh), 1e-6)
            pts = cv2.boxPoints(((cx, cy), (rw + 2 * d, rh + 2 * d), ang))
            x0, y0 = np.clip(pts.min(0), 0, [w, h])
            x1, y1 = np.clip(pts.max(0), 0, [w, h])
            boxes.append([x0 * sx, y0 * sy, x1 * sx, y1 * sy])
        results.append(np.asarray(boxes, np.float32).reshape(-1, 4))
    return results


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(K, 4)`` and ``(L, 4)`` xyxy boxes -> ``(K, L)``."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda z: np.prod(np.clip(z[:, 2:] - z[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def _pages(boxes) -> list[np.ndarray]:
    """Accept one page's ``(K, 4)`` boxes or a sequence of pages."""
    try:
        arr = np.asarray(boxes, np.float64)
    except ValueError:  # ragged: a list of pages
        return [np.asarray(p, np.float64).reshape(-1, 4) for p in boxes]
    if arr.ndim == 3:
        return list(arr)
    return [arr.reshape(-1, 4)]


def box_f1(boxes_a, boxes_b, iou: float = 0.5) -> float:
    """F1 of greedy one-to-one matching (highest IoU first, IoU >= ``iou``).

    Takes one page's boxes or lists of per-page boxes (micro-averaged over
    pages).  Symmetric; 1.0 when both sides are empty.
    """
    pages_a, pages_b = _pages(boxes_a), _pages(boxes_b)
    if len(pages_a) != len(pages_b):
        raise ValueError("different number of pages")
    matched = total = 0
    for a, b in zip(pages_a, pages_b):
        total += len(a) + len(b)
        if not len(a) or not len(b):
            continue
        ious = box_iou(a, b)
        for flat in np.argsort(-ious, axis=None):
            i, j = np.unravel_index(flat, ious.shape)
            if ious[i, j] < iou:
                break
            if np.isfinite(ious[i, j]):
                matched += 1
                ious[i, :] = -np.inf
                ious[:, j] = -np.inf
    return 2.0 * matched / total if total else 1.0


def prob_map_error(map_a, map_b) -> float:
    """Mean absolute difference of two det probability maps (any matching shape)."""
    a, b = np.asarray(map_a, np.float32), np.asarray(map_b, np.float32)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return float(np.abs(a - b).mean())


# --------------------------------------------------------------------------- smoke run
def main(argv: Sequence[str] | None = None) -> None:
    """FP32 smoke run: render data, run both models on CPU, print metrics + timings."""
    import argparse

    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=64)
    ap.add_argument("--pages", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8, help="rec batch size")
    ap.add_argument("--latin-only", action="store_true", help="no Chinese text")
    ap.add_argument("--save", metavar="DIR", help="also write DIR/rec and DIR/det .npz feeds")
    ap.add_argument("--show", type=int, default=5, help="print this many rec errors")
    args = ap.parse_args(argv)
    cjk = False if args.latin_only else None

    fonts = find_fonts()
    print(f"fonts: latin={[Path(f).name for f in fonts['latin']]} cjk={[Path(f).name for f in fonts['cjk']]}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    rec = ort.InferenceSession(str(model_path("rec")), so, providers=["CPUExecutionProvider"])
    det = ort.InferenceSession(str(model_path("det")), so, providers=["CPUExecutionProvider"])

    t0 = time.perf_counter()
    lines, truth = render_lines(args.lines, args.seed, cjk)
    t1 = time.perf_counter()
    feeds = list(rec_feeds(lines, args.batch, rec.get_inputs()[0].name))
    preds = [p for f in feeds for p in decode_rec(rec.run(None, f)[0])]
    t2 = time.perf_counter()
    print(f"rec: {args.lines} lines ({sum(map(len, truth))} chars, "
          f"{sum(any(map(_is_zh, t)) for t in truth)} with Chinese), render {t1 - t0:.2f}s, "
          f"preprocess+infer+decode {t2 - t1:.2f}s")
    print(f"rec: FP32 char accuracy {char_accuracy(preds, truth):.4f} "
          f"(with spaces {char_accuracy(preds, truth, ignore_spaces=False):.4f}), "
          f"line accuracy {line_accuracy(preds, truth):.4f}")
    for p, t in [(p, t) for p, t in zip(preds, truth) if _norm(p, True) != _norm(t, True)][: args.show]:
        print(f"   truth {t!r:40} read {p!r}")

    t3 = time.perf_counter()
    pages, gt_boxes = render_pages(args.pages, args.seed, cjk=cjk)
    t4 = time.perf_counter()
    dfeeds = list(det_feeds(pages, 1, det.get_inputs()[0].name))
    maps = [det.run(None, f)[0] for f in dfeeds]
    found = [decode_det(m, pages[i].shape[:2])[0] for i, m in enumerate(maps)]
    t5 = time.perf_counter()
    print(f"det: {args.pages} pages ({sum(map(len, gt_boxes))} lines), render {t4 - t3:.2f}s, "
          f"preprocess+infer+decode {t5 - t4:.2f}s ({(t5 - t4) / max(args.pages, 1):.2f}s/page)")
    print(f"det: FP32 box F1 vs truth @0.5 {box_f1(found, gt_boxes, 0.5):.4f}, "
          f"@0.7 {box_f1(found, gt_boxes, 0.7):.4f}; found {sum(map(len, found))} boxes")
    print(f"self-check: agreement(pred, pred)={char_agreement(preds, preds):.1f}, "
          f"prob_map_error(map, map)={prob_map_error(maps[0], maps[0]):.1f}")
    if args.save:
        r = save_feeds(feeds, Path(args.save) / "rec")
        d = save_feeds(dfeeds, Path(args.save) / "det")
        print(f"saved {len(r)} rec + {len(d)} det feeds under {args.save}")
    print(f"total {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()

"""CTC readers are judged by what they read: the greedy decodes of FP32 and the quantized model, compared.

Most steps of a CTC output are its blank (71-79 % on PP-OCRv5's and ddddocr's text readers), and the blank steps between
characters agree whatever happens to the characters. PP-OCRv5's recognizer on ``--target trt`` kept 0.911 of its steps'
arg-max (above the 0.90 threshold: quiet) while 16 % of the characters and 69 % of the lines it read changed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.calib.readers import Batch
from onnxq.evaluate.fidelity import THRESHOLDS, check_fidelity
from onnxq.evaluate.metrics import CTC_BLANK_SHARE, OutputAccumulator, edit_distance, greedy_decode

STEPS, CLASSES, BLANK = 24, 7, 0


def _plain_distance(a: list[int], b: list[int]) -> int:
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[-1][-1]


def test_edit_distance_and_greedy_decode_agree_with_plain_definitions():
    rng = np.random.default_rng(0)
    for _ in range(300):
        a, b = (rng.integers(0, 4, rng.integers(0, 12)) for _ in range(2))
        assert edit_distance(a, b) == _plain_distance(a.tolist(), b.tolist())
    assert greedy_decode(np.array([0, 3, 3, 0, 3, 5, 5, 0, 0, 2]), blank=0).tolist() == [3, 3, 5, 2]
    assert greedy_decode(np.array([4, 4, 4]), blank=4).tolist() == []


def _reader(reads: np.ndarray) -> onnx.ModelProto:
    """x [N, T, C] (one-hot symbols per step) -> MatMul (the reader's classifier: symbol k scores class ``reads[k]``) ->
    logits [N, T, C], and the greedy decode's ArgMax per step -> ids [N, T] int64."""
    w = np.eye(CLASSES, dtype=np.float32)[reads] * 5.0
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("ArgMax", ["logits"], ["ids"], axis=2, keepdims=0)]
    graph = helper.make_graph(nodes, "ctc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", STEPS, CLASSES])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", STEPS, CLASSES]),
                               helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", STEPS])],
                              [numpy_helper.from_array(w, "w")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _lines(n: int = 64, seed: int = 0) -> tuple[list[Batch], np.ndarray]:
    """Lines of characters 1-6, one every third step, blank between (two thirds of the steps), as noisy one-hot steps."""
    rng = np.random.default_rng(seed)
    symbols = np.zeros((n, STEPS), np.int64)
    symbols[:, 1::3] = rng.integers(1, CLASSES, (n, STEPS // 3))
    x = np.eye(CLASSES, dtype=np.float32)[symbols] + rng.normal(0, 0.05, (n, STEPS, CLASSES)).astype(np.float32)
    return [Batch({"x": x[i:i + 16]}) for i in range(0, n, 16)], symbols


def test_a_reader_that_misreads_one_character_of_six_is_warned_though_its_steps_agree():
    batches, symbols = _lines()
    fp32 = _reader(np.arange(CLASSES))
    misread = np.arange(CLASSES)
    misread[3] = 4  # character 3 read as 4: a sixth of the characters, an 18th of the steps
    changed = float(np.mean(symbols[symbols != BLANK] == 3))
    fid = check_fidelity(fp32, _reader(misread), lambda: iter(batches), in_sample=False)
    logits, ids = fid.outputs
    assert np.mean(symbols == BLANK) >= CTC_BLANK_SHARE, "precondition: the blank is most steps"
    for o in (logits, ids):
        assert o.position_agreement >= THRESHOLDS.position_agreement, "precondition: the steps alone pass"
        assert o.decoded_agreement == pytest.approx(1 - changed, abs=1e-6)
        assert o.decoded_agreement < THRESHOLDS.decoded_agreement and o.decoded_exact < 0.5
    assert logits.cosine > THRESHOLDS.cosine, "precondition: the cosine passes too"
    assert fid.warned and len(fid.warnings) == 2 and all("decoded agreement" in w for w in fid.warnings), fid.warnings


def test_a_reader_that_reads_as_fp32_is_quiet():
    batches, _ = _lines(seed=1)
    fp32 = _reader(np.arange(CLASSES))
    near = onnx.ModelProto()
    near.CopyFrom(fp32)
    w = numpy_helper.to_array(near.graph.initializer[0])
    near.graph.initializer[0].CopyFrom(numpy_helper.from_array(w + np.float32(0.2) * np.random.default_rng(2).random(w.shape, np.float32), "w"))
    fid = check_fidelity(fp32, near, lambda: iter(batches), in_sample=False)
    assert not fid.warned, fid.warnings
    assert [o.decoded_agreement for o in fid.outputs] == [1.0, 1.0] and [o.decoded_exact for o in fid.outputs] == [1.0, 1.0]


def test_time_major_steps_and_token_logits_without_a_blank():
    """[T, N, C] logits (samples on axis 1, as ddddocr's reader writes them) are decoded per sample; a sequence with no
    class on most of its steps (a language model's token logits) is no CTC output and gets no decoded figure."""
    rng = np.random.default_rng(3)
    ids = np.where(rng.random((4, STEPS)) < 0.7, BLANK, rng.integers(1, CLASSES, (4, STEPS)))
    ref = np.eye(CLASSES)[ids] * 5.0
    got = ref.copy()
    got[1] = ref[2]  # the second sample reads as the third
    acc = OutputAccumulator()
    acc.update(ref.transpose(1, 0, 2), got.transpose(1, 0, 2), axis=1)
    m = acc.result()
    decodes = [greedy_decode(r, BLANK) for r in ids]
    expected = 1 - edit_distance(decodes[1], decodes[2]) / sum(len(d) for d in decodes)
    assert not np.array_equal(decodes[1], decodes[2]), "precondition: the two samples read differently"
    assert m["decoded_agreement"] == pytest.approx(expected) and m["decoded_exact"] == 0.75
    tokens = np.eye(CLASSES)[rng.integers(0, CLASSES, (4, STEPS))] * 5.0
    acc = OutputAccumulator()
    acc.update(tokens, tokens[::-1].copy(), axis=0)
    assert "position_agreement" in acc.result() and "decoded_agreement" not in acc.result()


def test_auto_reads_a_readers_agreement_from_its_decodes():
    """``-p auto --min-agreement`` on a CTC reader is the share of characters kept, as the check reads it, not the share of
    steps (which counts the blanks between them)."""
    from onnxq.pipeline.auto import HeldOut

    batches, symbols = _lines(seed=4)
    misread = np.arange(CLASSES)
    misread[3] = 4
    fp32 = _reader(np.arange(CLASSES))
    per_sample = []
    for row in symbols:
        read = greedy_decode(row, BLANK)
        per_sample.append(1 - edit_distance(read, np.where(read == 3, 4, read)) / max(len(read), 1) if len(read) else 1.0)
    scores = HeldOut(fp32, batches).score(_reader(misread))
    assert scores.agreement == pytest.approx(np.mean(per_sample), abs=1e-9)
    assert scores.agreement < THRESHOLDS.position_agreement < float(np.mean(np.where(symbols == 3, 0.0, 1.0))), "precondition"


def test_auto_counts_a_reader_below_the_decoded_threshold_as_collapsed():
    """`-p auto` gives its default mixed-precision step the time it needs when every recipe collapses; it read only the
    cosine, and a speech CTC model at cosine 0.985 with decoded agreement 0.93 (lines read right 98 % -> 72 %) was
    returned full integer, the step skipped for the budget."""
    from types import SimpleNamespace

    from onnxq.pipeline.auto import HeldOut, _collapsed
    from onnxq.pipeline.report import AutoCandidate

    batches, _ = _lines(seed=5)
    reader = SimpleNamespace(heldout=HeldOut(_reader(np.arange(CLASSES)), batches))
    assert reader.heldout.blank == BLANK, "precondition: auto reads the first output as a CTC reader's"
    candidate = AutoCandidate(name="trt-entropy", methods=["trt-entropy"], float_layers=[], stage="portfolio", score=0.985,
                              score_worst=0.985, spread=None, spread_bound=None, resample_scores=[], cosine=0.985, cosine_worst=0.9,
                              cosine_p1=0.98, agreement=0.93, agreement_worst=0.5, accuracy_drop=None, worst_output=None,
                              worst_output_cosine=None, worst_class=None, worst_class_agreement=None, meets_target=False,
                              latency_ms=None, size_bytes=None, seconds=1.0, error=None)
    assert "decoded agreement 0.9300" in _collapsed(reader, candidate)
    candidate.agreement = THRESHOLDS.decoded_agreement + 0.01
    assert _collapsed(reader, candidate) == ""
    embedding = SimpleNamespace(heldout=SimpleNamespace(blank=None))  # an arg-max agreement of another output is not judged
    candidate.agreement = 0.5
    assert _collapsed(embedding, candidate) == ""

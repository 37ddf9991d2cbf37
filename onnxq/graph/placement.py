"""Choose where Q/DQ pairs go, from the graph and the target profile.

Rules, in order:
1. Weighted ops (Conv, ConvTranspose, Gemm, MatMul): every float activation input gets a Q/DQ
   pair; a constant weight becomes integers + DequantizeLinear (per output channel). A MatMul of
   two activations (attention's Q·Kᵀ, softmax·V) is quantized only where the profile says
   ``activation_matmul`` (TensorRT's int8 MHA); ONNX Runtime keeps it float.
2. Profiles with ``quantize_outputs`` (ONNX Runtime) also quantize the outputs of quantized ops,
   folding a sole following Relu into the quantized tensor when the grid is asymmetric (ORT then
   drops the Relu and runs QLinearConv); ``extra_ops`` (Add, Concat, pooling...) get Q/DQ on float
   inputs and outputs so ORT can keep whole int8 islands.
3. ``residual_add`` (TensorRT): the non-conv input of an Add fed by a weighted op is quantized so
   Conv+Add fuses; when both inputs are conv outputs, the shortcut: the one read elsewhere too (a linear bottleneck),
   else the conv reading a tensor the other branch is computed from (a projection shortcut, ResNet's downsample).
4. Scale-preserving ops (MaxPool, Reshape, ...) between two quantized tensors share one scale; so do
   Concat inputs under ``share_concat_scales``.
Graph outputs are never replaced: a Q/DQ pair feeds the consumers, the output name stays float.

A tensor computed from constants alone (paddle2onnx writes every conv bias as
``Add(conv, Reshape(bias, shape))``) is a constant here, not an activation: it is never quantized,
an Add of it is no residual Add, and a weighted op reading one as its weight is left float (its
weight is no initializer to quantize). Quantizing such a bias with an activation grid is what
collapsed ``--target trt`` on PP-OCRv5 det (docs/methods.md).
"""

from __future__ import annotations

import fnmatch
import glob
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

import onnx

from onnxq.errors import ModelError
from onnxq.graph.edit import subgraphs
from onnxq.graph.index import GraphIndex, node_attr
from onnxq.graph.plan import Layer, QuantPlan, WeightSite
from onnxq.graph.targets import SCALE_PRESERVING_OPS, WEIGHTED_OPS, TargetProfile
from onnxq.graph.prepare import check_float16_target, tensor_shapes, tensor_types

RELU_LIKE = {"Relu", "Clip"}

#: ops that draw new values: never "computed from constants", even with constant inputs
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"})


def _computed_weight_reason(idx: GraphIndex, weight: str) -> str:
    """Why a weight computed from constants stays float: the op that keeps onnxq's constant folding from making it an
    initializer (ConstantOfShape, Expand, ...: they grow a tensor from a shape), else the advice to fold it."""
    from onnxq.graph.constfold import KEEP_OPS

    stack, seen = [weight], set()
    while stack:
        t = stack.pop()
        node = idx.producer.get(t)
        if node is None or t in seen:
            continue
        seen.add(t)
        if node.op_type == "DequantizeLinear":
            block = node_attr(node, "block_size", 0)
            kind = onnx.TensorProto.DataType.Name(idx.types.get(node.input[0], 0)).lower()
            return (f"weight '{weight}' is the model's own {kind}{' block-wise' if block else ''} weight behind DequantizeLinear "
                    f"'{node.name}', which onnxq keeps as the model has it (layers are quantized around int8 and uint8 weights only)")
        if node.op_type in KEEP_OPS:
            return (f"weight '{weight}' is computed at run time by {node.op_type} '{node.name}', which onnxq's constant "
                    "folding leaves alone (it grows a tensor from a shape); store the weight as an initializer to quantize this layer")
        stack.extend(i for i in node.input if i)
    return (f"weight '{weight}' is computed from constants at run time (no initializer to quantize); fold it into an "
            "initializer (constant folding is on unless --no-fold) to quantize this layer")


def constant_computed(idx: GraphIndex) -> set[str]:
    """Tensors of the main graph computed from constants alone, by deterministic standard ops.

    Walks the nodes in graph (topological) order: a node whose every input is an initializer, a
    ``Constant`` or such a tensor makes its outputs such tensors. Nodes with subgraphs, other
    domains, random ops and ops without inputs (other than ``Constant``) never do.
    """
    computed: set[str] = set()
    for node in idx.node_list:
        if (node.op_type in _NONDETERMINISTIC or node.domain not in ("", "ai.onnx") or subgraphs(node)
                or node.op_type == "Constant" or not any(node.input)):
            continue
        if all(not n or idx.is_constant(n) or n in computed for n in node.input):
            computed.update(o for o in node.output if o)
    return computed

def weight_axis(node: onnx.NodeProto, index: int, rank: int) -> int | None:
    """The output-channel axis of a weight input, or None if it is not a weight slot."""
    if node.op_type == "Conv" and index == 1:
        return 0
    if node.op_type == "ConvTranspose" and index == 1:
        return 1
    if node.op_type == "Gemm" and index == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul" and index == 1 and rank >= 2:
        return rank - 1
    return None


def matches_exclude(node: onnx.NodeProto, patterns: Iterable[str]) -> bool:
    """Whether ``--exclude`` ``patterns`` (node-name globs or op types) name ``node``."""
    return any(fnmatch.fnmatchcase(node.name, p) or node.op_type == p for p in patterns)


def node_pattern(name: str) -> str:
    """An exclude pattern naming the node ``name`` alone: not another node, and not an op type (scikit-learn's
    converter names its first MatMul 'MatMul', and -p auto's one float layer left every MatMul float)."""
    return f"[{name[0]}]{glob.escape(name[1:])}" if name else name


def _objective_tensor(idx: GraphIndex, output: str) -> str:
    nxt = idx.sole_consumer(output)
    if nxt is not None and nxt.op_type in RELU_LIKE | {"LeakyRelu"}:
        return nxt.output[0]
    return output


def _bias_matmul_2d(node: onnx.NodeProto, idx: GraphIndex, shapes: dict) -> bool:
    """A 2-D MatMul followed by a bias Add: ONNX Runtime fuses the pair into a float Gemm before
    its QDQ fusions run, unless the MatMul output is quantized (then it runs QLinearMatMul)."""
    if node.op_type != "MatMul":
        return False
    nxt = idx.sole_consumer(node.output[0])
    if nxt is None or nxt.op_type != "Add" or not any(idx.is_constant(i) for i in nxt.input):
        return False
    shape = shapes.get(node.input[0])
    return shape is not None and len(shape) == 2


def build_weight_only_plan(model: onnx.ModelProto, profile: TargetProfile, exclude: Iterable[str] = ()) -> QuantPlan:
    """4-bit weight-only: every MatMul with a constant 2-D float weight, blocked along K (axis 0)."""
    idx = GraphIndex(model)
    plan = QuantPlan(profile)
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        if matches_exclude(node, exclude):
            plan.skipped.append((node.name, "excluded by the user"))
            continue
        if node.op_type == "Gemm":
            plan.skipped.append((node.name, "Gemm that could not be rewritten as MatMul (alpha/beta/transA)"))
            continue
        value = idx.constant_value(node.input[1]) if len(node.input) > 1 else None
        if value is None or value.dtype.kind != "f" or value.ndim != 2:
            if value is not None:
                plan.skipped.append((node.name, "weight is not a 2-D float constant"))
            continue
        if node.input[1] in plan.weights:
            continue
        if value.shape[0] < profile.block_size:
            plan.skipped.append((node.name, f"K = {value.shape[0]} is smaller than the block size {profile.block_size}"))
            continue
        plan.weights[node.input[1]] = WeightSite(node.input[1], node.name, 1, 0)
        plan.layers.append(Layer(node.name, node.op_type, (node.input[0],), node.input[1], node.output[0], node.output[0]))
    note_control_flow(model, plan)
    note_float_compute(model, plan)  # a fused Attention's Q/K/V weights stay float at 4 bits too: listed, not hidden
    return plan


def build_plan(model: onnx.ModelProto, profile: TargetProfile, exclude: Iterable[str] = ()) -> QuantPlan:
    """Place Q/DQ sites for ``profile``. ``exclude`` holds node-name globs or op types kept in float."""
    exclude = tuple(exclude)
    if profile.weight_only:
        return build_weight_only_plan(model, profile, exclude)
    idx = GraphIndex(model)
    plan = QuantPlan(profile)
    computed = constant_computed(idx)

    def constant(name: str) -> bool:
        return idx.is_constant(name) or name in computed

    def quantizable_activation(name: str) -> bool:
        return bool(name) and not constant(name) and idx.is_float(name)

    def add_input_site(node: onnx.NodeProto, i: int, reason: str) -> None:
        name = node.input[i]
        if quantizable_activation(name):
            # one shared pair: every consumer that is itself quantized reads the DQ output
            plan.add_activation(name, [(node.name, i)], reason)

    # 1. weighted ops
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        if matches_exclude(node, exclude):
            plan.skipped.append((node.name, "excluded by the user"))
            continue
        w_index = 1 if len(node.input) > 1 else None
        weight_name = None
        if node.op_type == "Gemm" and constant(node.input[0]):
            plan.skipped.append((node.name, "Gemm with a constant A input"))
            continue
        if node.op_type == "MatMul" and len(node.input) == 2 and constant(node.input[0]) and not constant(node.input[1]):
            # W @ x: the weight's rows are the output's, which every method here reads as a [K, N] weight's columns;
            # quantizing only the activation around a float MatMul adds Q/DQ steps for no integer kernel
            plan.skipped.append((node.name, "MatMul with its constant weight as the first input (W @ x)"))
            continue
        log_reader = _logarithm_reader(idx, node.output[0], constant)
        if log_reader is not None:
            plan.skipped.append((node.name, f"its output reaches the logarithm '{log_reader}' (a log-mel or log-power feature): "
                                            "8-bit steps sized for the loudest values round the quiet ones to zero, which the "
                                            "logarithm turns into the largest errors; kept float"))
            continue
        if w_index is not None and node.input[w_index] in computed and not _dequantized_constant(idx, node.input[w_index]):
            plan.skipped.append((node.name, _computed_weight_reason(idx, node.input[w_index])))
            continue
        if (node.op_type == "MatMul" and not profile.activation_matmul and len(node.input) == 2
                and not any(constant(i) for i in node.input)):
            plan.skipped.append((node.name, f"activation x activation MatMul (attention) kept float for target {profile.name}"))
            continue
        if w_index is not None and idx.is_constant(node.input[w_index]):
            value = idx.constant_value(node.input[w_index])
            if value is None or value.dtype.kind != "f":
                plan.skipped.append((node.name, "weight is not a float constant"))
                continue
            axis = weight_axis(node, w_index, value.ndim)
            if node.op_type == "Gemm" and value.ndim != 2:
                axis = None
            weight_name = node.input[w_index]
            prior = plan.weights.get(weight_name)
            if prior is not None and prior.axis != axis:
                plan.skipped.append((node.name, f"weight '{weight_name}' is shared with '{prior.node}' on another axis"))
                continue
            if prior is None:
                plan.weights[weight_name] = WeightSite(weight_name, node.name, w_index, axis)
            else:
                # a module called twice reads one weight: every reader gets the integer weight, not only the first
                prior.shared_with.append((node.name, w_index))
        act_inputs = [i for i in range(min(len(node.input), 2)) if node.input[i] and not constant(node.input[i])]
        if not act_inputs:
            continue
        for i in act_inputs:
            add_input_site(node, i, f"input of {node.op_type} '{node.name}'")
        plan.layers.append(
            Layer(node.name, node.op_type, tuple(node.input[i] for i in act_inputs), weight_name, node.output[0], _objective_tensor(idx, node.output[0]))
        )

    quantized_nodes = {layer.node for layer in plan.layers}

    # 2. extra ops (ORT int8 islands): only where every float input already comes out of the
    # island, and never with a constant operand (bias adds, GELU/LayerNorm arithmetic and
    # hard-swish constants stay float: quantizing them costs accuracy and gains no kernel)
    def from_island(name: str, depth: int = 0) -> bool:
        p = idx.producer.get(name)
        if p is None:
            return name in idx.graph_inputs and idx.is_float(name)
        if p.name in quantized_nodes:
            return True
        if depth < 8 and (p.op_type in RELU_LIKE or p.op_type in SCALE_PRESERVING_OPS) and p.input:
            return from_island(p.input[0], depth + 1)
        return False

    if profile.extra_ops:
        for node in model.graph.node:  # topological order: producers are decided first
            if node.op_type not in profile.extra_ops or matches_exclude(node, exclude):
                continue
            if any(n and constant(n) for n in node.input):
                continue
            float_inputs = [i for i, n in enumerate(node.input) if quantizable_activation(n)]
            if not float_inputs or not all(from_island(node.input[i]) for i in float_inputs):
                continue
            for i in float_inputs:
                add_input_site(node, i, f"input of {node.op_type} '{node.name}'")
            quantized_nodes.add(node.name)

    # 2b. outputs of quantized ops (ORT): Conv/ConvTranspose/Gemm always (their integer kernels
    # write int8), others only when a consumer is quantized too (a MatMul feeding float ops runs as
    # MatMulIntegerToFloat); a sole following Relu folds into an asymmetric grid
    def feeds_island(name: str, depth: int = 0) -> bool:
        for c, _ in idx.consumers.get(name, []):
            if c.name in quantized_nodes:
                return True
            if depth < 8 and (c.op_type in SCALE_PRESERVING_OPS or c.op_type in RELU_LIKE) and feeds_island(c.output[0], depth + 1):
                return True
        return False

    shapes = tensor_shapes(model)
    if profile.quantize_outputs:
        for name in list(quantized_nodes):
            node = idx.nodes[name]
            if node.op_type in SCALE_PRESERVING_OPS:
                continue
            out = node.output[0]
            target = out
            nxt = idx.sole_consumer(out)
            if nxt is not None and not profile.activation_signed and (nxt.op_type == "Relu" or _nonnegative_clip(nxt, idx)):
                # ONNX Runtime drops a Relu, or a Clip whose range holds the grid's (ReLU6), between the conv and its
                # QuantizeLinear; quantizing the conv's own output as well put a second, coarser grid on every TF/TFLite
                # MobileNet (tf2onnx writes ReLU6 as Clip(0, 6)): 13.5 dB against ONNX Runtime's quantizer's 16.9 dB
                target = nxt.output[0]
            if target in idx.graph_outputs or not quantizable_activation(target):
                continue
            consumers = [(c.name, i) for c, i in idx.consumers.get(target, [])]
            always = node.op_type in ("Conv", "ConvTranspose", "Gemm") or _bias_matmul_2d(node, idx, shapes)
            if consumers and (always or feeds_island(target)):
                plan.add_activation(target, consumers, f"output of {node.op_type} '{node.name}'")

    # 3. residual Add (TensorRT)
    if profile.residual_add:
        for node in model.graph.node:
            if node.op_type != "Add" or len(node.input) != 2 or matches_exclude(node, exclude):
                continue
            prods = [idx.producer.get(n) for n in node.input]
            from_weighted = [p is not None and p.name in quantized_nodes and p.op_type in WEIGHTED_OPS for p in prods]
            if any(from_weighted) and not all(from_weighted):
                other = from_weighted.index(False)
                add_input_site(node, other, f"residual input of Add '{node.name}'")
            elif all(from_weighted):
                # both inputs are conv outputs. A linear bottleneck (the block input is the previous projection conv's
                # output, rapidocr's angle classifier): TensorRT fuses the Add into one conv and needs the other, the
                # shortcut, quantized; it is the input read elsewhere too (quantized for its other readers anyway). Two
                # convs read by this Add alone are a sum, not a residual (cfws's split conv): a pair on either branch
                # cost its INT7 fixture 1.6 points of top-1, so they stay as they are
                shared = [len(idx.consumers.get(n, [])) > 1 for n in node.input]
                if any(shared) and not all(shared):
                    add_input_site(node, shared.index(True), f"residual input of Add '{node.name}' (both inputs from convs)")
                elif not any(shared):
                    # a projection shortcut (ResNet's downsample conv): its conv reads a tensor the other branch is
                    # computed from, so it is the residual TensorRT adds in INT8 into the other conv
                    short = _projection_shortcut(idx, prods[0], prods[1])
                    if short is not None:
                        add_input_site(node, short, f"projection shortcut of Add '{node.name}'")

    # 4. shared scales: scale-preserving ops between quantized tensors, and Concat inputs
    sites = plan.activations
    for node in model.graph.node:
        if node.op_type in SCALE_PRESERVING_OPS and node.input and node.input[0] in sites and node.output[0] in sites:
            plan.share_groups.append([node.input[0], node.output[0]])
        if node.op_type == "Concat" and profile.share_concat_scales:
            members = [n for n in node.input if n in sites]
            if node.output[0] in sites:
                members.append(node.output[0])
            if len(members) >= 2:
                plan.share_groups.append(members)
    plan.share_groups = _merge_groups(plan.share_groups)
    note_control_flow(model, plan)
    note_float_compute(model, plan)
    # the ORT profiles: QLinear* kernels are float32-only
    check_float16_target(model, profile.name, profile.quantize_outputs, [*plan.activations, *(w.initializer for w in plan.weights.values())])
    _refuse_float64(model, [*plan.activations, *(w.initializer for w in plan.weights.values())])
    return plan


def _refuse_float64(model: onnx.ModelProto, tensors: Iterable[str]) -> None:
    """A float64 model (skl2onnx with double inputs) would get float32 Q/DQ on its double tensors, which no runtime
    loads ("MatMul bound to different types (tensor(double) and tensor(float))"): refused in one line instead."""
    types = tensor_types(model)
    double = [t for t in tensors if types.get(t) == onnx.TensorProto.DOUBLE]
    if double:
        raise ModelError(f"float64 (double) tensors cannot be quantized ('{double[0]}' and {len(double) - 1} more): QuantizeLinear "
                         "and DequantizeLinear take float32 or float16; export the model in float32 (skl2onnx: a float32 sample)")


def _projection_shortcut(idx: GraphIndex, a: onnx.NodeProto, b: onnx.NodeProto, reach: int = 64) -> int | None:
    """Which of two weighted ops summed by an Add is a projection shortcut (0 for ``a``, 1 for ``b``): the one whose
    data input the other's data input is computed from, within ``reach`` producers. None when they read the same
    tensor (a conv split in two and summed, cfws) or neither input leads to the other (two unrelated branches)."""
    if a.input[0] == b.input[0]:
        return None

    def upstream(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo and len(seen) < reach:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            p = idx.producer.get(name)
            if p is not None:
                todo.extend(n for n in p.input if n and not idx.is_constant(n))
        return seen

    a_first, b_first = a.input[0] in upstream(b.input[0]), b.input[0] in upstream(a.input[0])
    if a_first != b_first:
        return 0 if a_first else 1
    return None


def _merge_groups(groups: list[list[str]]) -> list[list[str]]:
    """Union-find merge of overlapping share groups."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for g in groups:
        for m in g[1:]:
            parent[find(m)] = find(g[0])
    merged: dict[str, list[str]] = defaultdict(list)
    for x in list(parent):
        merged[find(x)].append(x)
    return [sorted(v) for v in merged.values() if len(v) > 1]


# -- what placement leaves float as a whole: control-flow bodies, and models with nothing to quantize

#: ops whose weights make a control-flow body worth reporting (the recurrent ones are never quantized
#: by onnxq, but a user reading "nothing quantized" needs to know they are there)
BODY_WEIGHTED_OPS = WEIGHTED_OPS | {"LSTM", "GRU", "RNN", "Attention", "MatMulNBits"}


def control_flow_summary(model: onnx.ModelProto) -> list[tuple[str, str, Counter]]:
    """(node name, op type, weighted-op counts) for each main-graph node whose subgraphs (If
    branches, Loop/Scan bodies, nested ones included) hold weighted ops."""
    found = []
    for node in model.graph.node:
        bodies = subgraphs(node)
        if not bodies:
            continue
        counts: Counter = Counter()
        stack = list(bodies)
        while stack:
            g = stack.pop()
            for n in g.node:
                if n.op_type in BODY_WEIGHTED_OPS:
                    counts[n.op_type] += 1
                stack.extend(subgraphs(n))
        if counts:
            found.append((node.name, node.op_type, counts))
    return found


def _count_text(counts: Counter) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def note_control_flow(model: onnx.ModelProto, plan: QuantPlan) -> None:
    """List in ``plan.skipped`` every If/Loop/Scan whose subgraphs hold weighted ops.

    Placement and the Q/DQ rewrite work on the main graph only: calibration cannot observe a
    tensor inside a branch or loop body (ONNX Runtime exposes main-graph tensors only), so what sits
    there stays float, and the report says so with the op counts.
    """
    for name, op, counts in control_flow_summary(model):
        where = "branches" if op == "If" else "body"
        plan.skipped.append((name, f"{op} with {_count_text(counts)} inside its {where}: ops inside control-flow "
                                   "subgraphs are not quantized (onnxq places Q/DQ in the main graph only)"))


#: compute ops onnxq never quantizes: the report lists them as left float, so that a model whose weights sit mostly in
#: them (a BiLSTM classifier: 1.5 KB of 3.6 MB quantized) does not read as quantized
UNQUANTIZED_COMPUTE_OPS = ("LSTM", "GRU", "RNN", "Einsum")
#: ONNX Runtime's fused contrib ops that hold weights: a model run through onnxruntime.transformers' optimizer has its
#: Q, K and V projections inside Attention (DistilBERT: 4 of its 18 weight matrices, 786,432 parameters each)
FUSED_WEIGHTED_OPS = ("Attention",)
#: fused attention without weights (ONNX's Attention-23; ONNX Runtime's MultiHeadAttention, GroupQueryAttention): the
#: projections around them are MatMuls onnxq quantizes, Q·Kᵀ and softmax·V inside them run in float
FUSED_ATTENTION_OPS = {("", "Attention"), ("ai.onnx", "Attention"), ("com.microsoft", "MultiHeadAttention"),
                       ("com.microsoft", "GroupQueryAttention")}


def _dequantized_constant(idx: GraphIndex, name: str) -> bool:
    """``name`` is a DequantizeLinear of integer constants: a weight the model already holds quantized (a TFLite model
    with int8 weights, converted by tf2onnx). Its layer is quantized around it, the weight kept as it is: ONNX Runtime
    fuses such a DequantizeLinear into the integer kernel as it does onnxq's own."""
    p = idx.producer.get(name)
    if p is None or p.op_type != "DequantizeLinear" or not idx.is_constant(p.input[0]):
        return False
    value = idx.constant_value(p.input[0])
    return value is not None and value.dtype.kind in "iu"


#: elementwise ops a logarithm's input may pass through after the layer that computes it (with constant operands:
#: ``log(max(x, eps))``, ``log(x + eps)``, ``log10`` as ``log(x) / ln 10``, a power spectrum's square)
_TO_LOG_OPS = frozenset({"Add", "Max", "Clip", "Abs", "Relu", "Mul", "Div", "Pow", "Sqrt", "Identity", "Cast", "Reshape",
                         "Transpose", "Squeeze", "Unsqueeze"})


def _logarithm_reader(idx: GraphIndex, tensor: str, constant: Callable[[str], bool], depth: int = 0, layers: int = 1) -> str | None:
    """The name of a Log that reads ``tensor`` directly or through :data:`_TO_LOG_OPS` with constant other operands, and
    through at most ``layers`` weighted layer with a constant weight (a framed STFT as convs, then the mel MatMul).

    A learned filterbank (a mel matrix as a MatMul, or a conv over a spectrum) feeding a logarithm is a feature
    extractor: the logarithm weighs a quiet band as much as a loud one, so a linear 8-bit grid over the loud bands'
    range erases the quiet ones (a raw-waveform keyword spotter fell from 99.2 % to 49-59 % top-1 with every recipe; a
    CTC reader from 98 % to 70-74 % lines read right, its check quiet; with the mel MatMul float, 98.8 % and 98 %).
    """
    if depth > 6:
        return None
    for reader, _ in idx.consumers.get(tensor, []):
        if reader.op_type == "Log":
            return reader.name or reader.output[0]
        through_layer = reader.op_type in WEIGHTED_OPS and len(reader.input) > 1 and constant(reader.input[1])
        if not reader.output or (reader.op_type not in _TO_LOG_OPS and not (through_layer and layers > 0)):
            continue
        # other inputs that may vary: shapes and axes of a move, a layer's weight, an Add's other power (re² + im²)
        free = reader.op_type in SCALE_PRESERVING_OPS or through_layer or reader.op_type == "Add"
        if not free and not all(constant(i) for i in reader.input if i and i != tensor):
            continue
        found = _logarithm_reader(idx, reader.output[0], constant, depth + 1, layers - through_layer)
        if found is not None:
            return found
    return None


def _nonnegative_clip(node: onnx.NodeProto, idx: GraphIndex) -> bool:
    """A Clip whose lower bound is a constant at least 0 (ReLU6 as tf2onnx and PyTorch write it)."""
    if node.op_type != "Clip":
        return False
    if len(node.input) > 1 and node.input[1]:
        low = idx.constant_value(node.input[1])
        return low is not None and low.size == 1 and float(low.reshape(())) >= 0.0
    low = node_attr(node, "min", None)  # opset < 11: the bounds are attributes
    return low is not None and float(low) >= 0.0


def note_float_compute(model: onnx.ModelProto, plan: QuantPlan) -> None:
    """List in ``plan.skipped`` every main-graph recurrent layer, Einsum and fused attention: they run in float."""
    for node in model.graph.node:
        if node.op_type in UNQUANTIZED_COMPUTE_OPS:
            plan.skipped.append((node.name, f"{node.op_type}: not quantized by onnxq (it quantizes Conv, ConvTranspose, Gemm "
                                            "and MatMul); it runs in float"))
        elif node.op_type in FUSED_WEIGHTED_OPS and node.domain == "com.microsoft":
            plan.skipped.append((node.name, f"{node.domain}.{node.op_type} (fused by ONNX Runtime's transformer optimizer): its "
                                            "weights stay float; quantize the model before fusing it, where they are MatMuls"))
        elif (node.domain, node.op_type) in FUSED_ATTENTION_OPS:
            plan.skipped.append((node.name, f"{node.domain or 'ai.onnx'}.{node.op_type}: Q·Kᵀ and softmax·V run inside it in "
                                            "float (the projections around it are quantized); written as MatMul, Softmax, "
                                            "MatMul they can be quantized for --target trt"))


#: the pseudo node name of a whole-model entry in ``plan.skipped`` (the report's left_in_float)
WHOLE_MODEL = "(model)"


def _has_weighted_layers(model: onnx.ModelProto) -> bool:
    """Whether the main graph has a Conv/ConvTranspose/Gemm/MatMul whose weight is an initializer."""
    weights = {t.name for t in model.graph.initializer}
    return any(n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in weights for n in model.graph.node)


def left_float_warnings(model: onnx.ModelProto, plan: QuantPlan, quantizes_anything: bool) -> list[str]:
    """One-line warnings for what a run leaves float as a whole; called once per run with the final plan.

    Each control-flow node with weighted ops inside gets a line; a run that quantizes nothing
    (``quantizes_anything`` false: no Q/DQ command at all) gets a line saying why, which is also
    added to ``plan.skipped`` so the report carries it.
    """
    lines = []
    control = control_flow_summary(model)
    for name, op, counts in control:
        lines.append(f"{op} '{name}' holds {_count_text(counts)} in its subgraphs; they stay float "
                     "(onnxq quantizes the main graph only)")
    if quantizes_anything:
        return lines
    skipped = [n for n, _ in plan.skipped if n != WHOLE_MODEL]
    if control and len(skipped) == len(control):
        why = "its weighted ops are all inside control flow (If/Loop/Scan)"
    elif skipped:
        why = f"all {len(skipped)} candidate ops were left in float (see the report's left_in_float)"
    elif plan.profile.weight_only:
        why = "4-bit weight-only quantizes MatMul with a constant 2-D float weight, and the model has none"
    elif _has_weighted_layers(model):
        # a method that stands in for the calibrator and quantizes no layer (emb4bit alone) cleared the plan
        why = "the selected methods quantize none of its layers (add a calibrator, e.g. -p minmax, to quantize them)"
    else:
        why = "the model has no Conv, ConvTranspose, Gemm or MatMul with a float weight"
    message = f"nothing was quantized: {why}; the output is the float model"
    plan.skipped.append((WHOLE_MODEL, message))
    lines.append(message)
    return lines

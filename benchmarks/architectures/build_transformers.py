"""Transformer-family models built by ``transformers`` from configs, with random weights, exported to ONNX with data.

    python benchmarks/architectures/build_transformers.py bert distilbert roberta gpt2 t5enc clip vit convnextv2 swin whisper wav2vec2
    python benchmarks/architectures/build_transformers.py bert_dyn gpt2_dyn vit_dyn      # the dynamo exporter (opset 18; onnxscript)

No hub is reachable here, so no pretrained weights: small configs (0.14-6 M parameters, 48 tokens,
64 x 64 images, 1 s of 16 kHz audio, 200 mel frames) initialized with ``initializer_range`` 0.05
(the default 0.02 leaves outputs nearly constant), seed 0. ``bertout`` is BERT with the outlier
channels of a trained one (three LayerNorm gains x40, the classifier x20). Text data are random ids
with realistic right padding (about half the sequences padded, ``attention_mask`` 0 there), images
mean/std-normalized, audio tones over noise. The legacy exporter at opset 17 unless ``_dyn``. Each
export is checked against PyTorch on four evaluation samples. Written to ``.bench/arch/NAME.onnx``
with ``NAME.calib.npz`` (64 samples) and ``NAME.eval.npz`` (32 others).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.modules["torchvision"] = None  # the PyPI torchvision (a CUDA build) breaks transformers' imports beside the CPU torch
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / ".bench" / "arch"
NC, NE = 64, 32


def tokens(n, L, vocab, pad_id, rng, half_pad_frac=0.5, tt=False, bos=None, eos=None):
    ids = rng.integers(5, vocab, size=(n, L)).astype(np.int64)
    mask = np.ones((n, L), np.int64)
    for i in range(n):
        r = rng.random()
        if r < half_pad_frac * 0.5: ln = L // 2
        elif r < half_pad_frac: ln = int(rng.integers(L // 4, L))
        else: ln = L
        if bos is not None: ids[i, 0] = bos
        if eos is not None: ids[i, ln - 1] = eos
        ids[i, ln:] = pad_id; mask[i, ln:] = 0
    d = {"input_ids": ids, "attention_mask": mask}
    if tt:
        t = np.zeros((n, L), np.int64)
        for i in range(n):
            ln = mask[i].sum(); t[i, ln // 2:ln] = 1
        d["token_type_ids"] = t
    return d

class Wrap(torch.nn.Module):
    def __init__(self, m, keys, outkey):
        super().__init__(); self.m, self.keys, self.outkey = m, keys, outkey
    def forward(self, *a):
        o = self.m(**dict(zip(self.keys, a)))
        return o[self.outkey] if isinstance(self.outkey, str) else tuple(o[k] for k in self.outkey)

INIT = 0.05  # config.initializer_range (HF default 0.02) -> larger activations/less uniform outputs
def C(c):
    if hasattr(c, 'initializer_range'): c.initializer_range = INIT
    return c

def build(name):
    """Build model ``name`` (``_dyn``: the dynamo exporter), check it against PyTorch and write its data."""
    torch.manual_seed(0)  # the same weights whatever was built before
    dyn = name.endswith("_dyn"); base = name[:-4] if dyn else name
    rng = np.random.default_rng(1)
    L = 48
    if base == "bertout":  # BERT with trained-BERT-like outlier channels: LayerNorm gamma x40 on 3 channels, + GELU-scale MLP
        c = T.BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, max_position_embeddings=128, num_labels=3)
        m = T.BertForSequenceClassification(C(c)); keys = ["input_ids", "attention_mask", "token_type_ids"]; outk = "logits"
        with torch.no_grad():
            for n_, mod in m.named_modules():
                if isinstance(mod, torch.nn.LayerNorm):
                    mod.weight[[7, 77, 177]] *= 40.0; mod.bias[[7, 77, 177]] += 5.0
            m.classifier.weight.mul_(20.0)
        mk = lambda n: tokens(n, L, c.vocab_size, 0, rng, tt=True, bos=101, eos=102)
    elif base == "bert":
        c = T.BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, max_position_embeddings=128, num_labels=3)
        m = T.BertForSequenceClassification(C(c)); keys = ["input_ids", "attention_mask", "token_type_ids"]; outk = "logits"
        mk = lambda n: tokens(n, L, c.vocab_size, 0, rng, tt=True, bos=101, eos=102)
    elif base == "distilbert":
        c = T.DistilBertConfig(vocab_size=8000, dim=256, n_layers=4, n_heads=4, hidden_dim=1024, max_position_embeddings=128)
        m = T.DistilBertForMaskedLM(C(c)); keys = ["input_ids", "attention_mask"]; outk = "logits"
        mk = lambda n: tokens(n, L, c.vocab_size, 0, rng, bos=101, eos=102)
    elif base == "roberta":
        c = T.RobertaConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, max_position_embeddings=130, pad_token_id=1, type_vocab_size=1)
        m = T.RobertaModel(C(c), add_pooling_layer=False); keys = ["input_ids", "attention_mask"]; outk = "last_hidden_state"
        mk = lambda n: tokens(n, L, c.vocab_size, 1, rng, bos=0, eos=2)
    elif base == "gpt2":
        c = T.GPT2Config(vocab_size=8000, n_embd=256, n_layer=4, n_head=4, n_positions=128, use_cache=False)
        m = T.GPT2LMHeadModel(C(c)); keys = ["input_ids", "attention_mask"]; outk = "logits"
        mk = lambda n: tokens(n, L, c.vocab_size, 7999, rng, half_pad_frac=0.3)  # right padding with eos-as-pad (7999); mask passed (without it transformers 5 exports aten::diff, unsupported)
    elif base == "t5enc":
        c = T.T5Config(vocab_size=8000, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4, feed_forward_proj="gated-gelu")
        m = T.T5EncoderModel(C(c)); keys = ["input_ids", "attention_mask"]; outk = "last_hidden_state"
        mk = lambda n: tokens(n, L, c.vocab_size, 0, rng, eos=1)
    elif base == "clip":
        c = T.CLIPTextConfig(vocab_size=8000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=64, eos_token_id=2, pad_token_id=1, bos_token_id=0)
        m = T.CLIPTextModelWithProjection(C(c)); keys = ["input_ids", "attention_mask"]; outk = ("text_embeds", "last_hidden_state")
        mk = lambda n: tokens(n, L, c.vocab_size, 1, rng, bos=0, eos=2)
    elif base == "vit":
        c = T.ViTConfig(image_size=64, patch_size=8, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, num_labels=10)
        m = T.ViTForImageClassification(C(c)); keys = ["pixel_values"]; outk = "logits"
        mean = np.array([0.5, 0.5, 0.5]).reshape(1, 3, 1, 1); std = mean
        mk = lambda n: {"pixel_values": ((rng.random((n, 3, 64, 64)) - mean) / std).astype(np.float32)}
    elif base == "convnextv2":
        c = T.ConvNextV2Config(image_size=64, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], num_labels=10)
        m = T.ConvNextV2ForImageClassification(C(c)); keys = ["pixel_values"]; outk = "logits"
        mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1); std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
        mk = lambda n: {"pixel_values": ((rng.random((n, 3, 64, 64)) - mean) / std).astype(np.float32)}
    elif base == "swin":
        c = T.SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=10)
        m = T.SwinForImageClassification(C(c)); keys = ["pixel_values"]; outk = "logits"
        mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1); std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
        mk = lambda n: {"pixel_values": ((rng.random((n, 3, 64, 64)) - mean) / std).astype(np.float32)}
    elif base == "whisper":
        c = T.WhisperConfig(vocab_size=8000, num_mel_bins=80, d_model=256, encoder_layers=4, encoder_attention_heads=4, decoder_layers=1, decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, max_source_positions=100, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0)
        m = T.WhisperForConditionalGeneration(C(c)).get_encoder(); keys = ["input_features"]; outk = "last_hidden_state"
        # log-mel-like: values in [-1, 1.5] roughly like whisper's normalized log-mel, 200 frames
        def mk(n):
            x = rng.normal(-0.3, 0.4, size=(n, 80, 200)).astype(np.float32)
            x += np.linspace(0.5, -0.5, 80, dtype=np.float32)[None, :, None]
            return {"input_features": np.clip(x, -1.0, 1.5)}
    elif base == "wav2vec2":
        c = T.Wav2Vec2Config(vocab_size=32, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, conv_dim=(128,) * 7, feat_extract_norm="group", do_stable_layer_norm=False, num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=8)
        m = T.Wav2Vec2ForCTC(C(c)); keys = ["input_values"]; outk = "logits"
        def mk(n):
            t = np.arange(16000) / 16000.0
            f = rng.uniform(100, 1000, size=(n, 1))
            x = 0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.normal(size=(n, 16000))
            x = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-7)
            return {"input_values": x.astype(np.float32)}
    else:
        raise SystemExit("unknown " + base)
    m.eval()
    if hasattr(m, "set_attn_implementation"):
        try: m.set_attn_implementation("eager")
        except Exception as e: print("attn impl", e)
    print(name, "params", sum(p.numel() for p in m.parameters()) / 1e6, "M")
    calib, ev = mk(NC), mk(NE)
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(OUT / f"{name}.calib.npz", **calib); np.savez(OUT / f"{name}.eval.npz", **ev)
    w = Wrap(m, keys, outk)
    ex = tuple(torch.from_numpy(calib[k][:2]) for k in keys)
    outn = [outk] if isinstance(outk, str) else list(outk)
    dyn_axes = {k: {0: "batch"} for k in keys + outn}
    path = str(OUT / f"{name}.onnx")
    with torch.no_grad():
        if dyn:
            torch.onnx.export(w, ex, path, input_names=keys, output_names=outn, opset_version=18, dynamo=True,
                              dynamic_shapes=(tuple({0: torch.export.Dim("batch", min=1, max=1024)} for _ in keys),), external_data=False)
        else:
            torch.onnx.export(w, ex, path, input_names=keys, output_names=outn, opset_version=17, dynamo=False, dynamic_axes=dyn_axes)
    import onnx, onnxruntime as ort
    onnx.checker.check_model(path)
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    o = s.run(None, {k: ev[k][:4] for k in keys})
    with torch.no_grad():
        ref = w(*(torch.from_numpy(ev[k][:4]) for k in keys))
    ref = [ref] if torch.is_tensor(ref) else ref
    print(name, "onnx vs torch max abs diff", [float(np.abs(a - b.numpy()).max()) for a, b in zip(o, ref)], "out std", [float(a.std()) for a in o])

if __name__ == "__main__":
    for n in sys.argv[1:]:
        build(n)

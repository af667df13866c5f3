"""Regenerates the fixture models in this folder with real exporters.

Tiny random-initialised HuggingFace models (2 layers, hidden 64, 4 heads) exported twice
each: torch.onnx's dynamo exporter at opset 18 and the legacy TorchScript exporter at
opset 17, with batch and sequence dynamic. Needs torch, transformers, onnx, onnxscript and
onnxruntime (pinned in requirements-fixtures.txt); the tests and CI do not.

    python3 models/make_fixtures.py            # writes models/*.onnx and models/*.ref.json
    python3 models/make_fixtures.py /tmp/x     # the same into another folder (to compare)
    python3 models/make_fixtures.py --ops      # only the op fixtures in models/ops/

Weights, graphs and references are reproducible. The dynamo files are not byte-identical
across checkouts: their `pkg.torch.onnx.stack_trace` node metadata holds the absolute paths
of this script and of site-packages.

Each fixture gets a reference: a fixed input (batch 2, sequence 8, one padded position) and
the torch logits, checked here against onnxruntime and usable by tests.
"""
import json
import os
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from transformers import (BertConfig, BertForSequenceClassification, EsmConfig,
                          EsmForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                          RobertaConfig, RobertaForSequenceClassification)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = HERE
SEED = 1234
warnings.filterwarnings("ignore")


def tiny(family):
    common = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64,
                  attn_implementation="eager")
    if family == "bert":
        cls, cfg = BertForSequenceClassification, BertConfig(vocab_size=1000, num_labels=2, **common)
    elif family == "roberta":
        cls, cfg = RobertaForSequenceClassification, RobertaConfig(
            vocab_size=1000, num_labels=2, pad_token_id=1, **common)
    elif family == "esm":
        cls, cfg = EsmForSequenceClassification, EsmConfig(
            vocab_size=33, num_labels=2, pad_token_id=1, mask_token_id=32,
            position_embedding_type="rotary", token_dropout=False, **common)
    elif family == "gpt2":
        cls, cfg = GPT2LMHeadModel, GPT2Config(
            vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=128,
            tie_word_embeddings=True, use_cache=False, attn_implementation="eager")
    else:
        raise ValueError(family)
    return logits_only(cls)(cfg)


def logits_only(cls):
    """A subclass whose forward returns just the logits: one graph output, and module paths
    that read as in peft (bert.encoder.layer.0..., with no wrapper prefix)."""

    def forward(self, input_ids, attention_mask):
        return cls.forward(self, input_ids=input_ids, attention_mask=attention_mask).logits

    return type(cls.__name__, (cls,), {"forward": forward})


def randomise(model):
    # Non-zero biases: the legacy exporter merges identical (zero) initializers into one.
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "ln_" in name or "layer_norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def example():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 4]])
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    return ids, mask


def export_onnx(model, ids, mask, path, exporter):
    """Exports `model(ids, mask) -> logits` with dynamic batch and sequence: `dynamo18` is
    torch.export at opset 18, anything else the legacy TorchScript exporter at opset 17."""
    if exporter == "dynamo18":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=64)
        torch.onnx.export(model, (ids, mask), path, dynamo=True, opset_version=18,
                          external_data=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                          "attention_mask": {0: batch, 1: seq}})
    else:
        axes = {0: "batch", 1: "sequence"}
        torch.onnx.export(model, (ids, mask), path, dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                        "logits": {0: "batch"}})


def export(family, exporter):
    torch.manual_seed(SEED)
    model = tiny(family)
    randomise(model)
    model.eval()
    ids, mask = example()
    with torch.no_grad():
        ref = model(ids, mask)
    name = f"{family}_{exporter}.onnx"
    path = os.path.join(OUT, name)
    export_onnx(model, ids, mask, path, exporter)
    model.eval()  # the legacy exporter leaves the module in train mode
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    diff = float(np.abs(got - ref.numpy()).max())
    assert diff <= 1e-4, f"{name}: onnxruntime differs from torch by {diff}"
    with open(path.replace(".onnx", ".ref.json"), "w") as f:
        json.dump({"inputs": {"input_ids": ids.tolist(), "attention_mask": mask.tolist()},
                   "logits_shape": list(ref.shape),
                   "logits": [round(float(v), 8) for v in ref.flatten()]}, f)
    print(f"{name}: {os.path.getsize(path) / 1e6:.2f} MB, {len(m.graph.node)} nodes, "
          f"ir {m.ir_version}, ort-vs-torch {diff:.2e}")


def main():
    global OUT
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if args:
        OUT = os.path.abspath(args[0])
        os.makedirs(OUT, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    if "--half" in sys.argv:
        os.makedirs(os.path.join(OUT, "half"), exist_ok=True)
        for family in ["bert", "llama"]:
            for exporter in ["dynamo18", "legacy17"]:
                for dtype in ["f16", "bf16"]:
                    export_half(family, exporter, dtype)
        return
    only_ops = "--ops" in sys.argv
    if not only_ops:
        for family in ["bert", "roberta", "gpt2", "esm"]:
            for exporter in ["dynamo18", "legacy17"]:
                export(family, exporter)
    for name in ["llama_seqcls", "phi3_gqa", "vit"]:
        export_op_fixture(name)


# --- Op fixtures (models/ops/): models whose graphs need ops the encoders above do not. ---
# Kept out of models/*.onnx so the per-fixture tests (which feed token ids) do not pick them
# up; tests/tests/op_fixtures.rs tests each. Same tiny sizes, seed and randomisation.


def tiny_op_model(name):
    from transformers import (LlamaConfig, LlamaForSequenceClassification, Phi3Config,
                              Phi3ForCausalLM, ViTConfig, ViTForImageClassification)
    if name == "llama_seqcls":
        # Last-token pooling: dynamo writes it as a GatherND.
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, num_labels=2, pad_token_id=0,
                          use_cache=False, attn_implementation="eager")
        return logits_only(LlamaForSequenceClassification)(cfg)
    if name == "phi3_gqa":
        # Fused qkv_proj with grouped-query attention: q 64 | k 32 | v 32.
        cfg = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, use_cache=False,
                         attn_implementation="eager")
        return logits_only(Phi3ForCausalLM)(cfg)
    if name == "vit":
        cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64,
                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        num_labels=3, attn_implementation="eager")
        cls = ViTForImageClassification

        def forward(self, pixel_values):
            return cls.forward(self, pixel_values=pixel_values).logits

        return type(cls.__name__, (cls,), {"forward": forward})(cfg)
    raise ValueError(name)


def export_op_fixture(name):
    out = os.path.join(OUT, "ops")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(SEED)
    model = tiny_op_model(name)
    randomise(model)
    model.eval()
    batch = torch.export.Dim("batch")
    if name == "vit":
        g = torch.Generator().manual_seed(SEED)
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
        dynamic = {"pixel_values": {0: batch}}
    else:
        ids, mask = example()
        # Right padding on row 2, so last-token pooling picks different positions per row.
        ids[1, -1] = 0
        inputs = {"input_ids": ids, "attention_mask": mask}
        seq = torch.export.Dim("sequence", min=2, max=64)
        dynamic = {k: {0: batch, 1: seq} for k in inputs}
    with torch.no_grad():
        ref = model(**inputs)
    path = os.path.join(out, f"{name}_dynamo18.onnx")
    torch.onnx.export(model, tuple(inputs.values()), path, dynamo=True, opset_version=18,
                      external_data=False, input_names=list(inputs), output_names=["logits"],
                      dynamic_shapes=dynamic)
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    diff = float(np.abs(got - ref.numpy()).max())
    assert diff <= 1e-4, f"{name}: onnxruntime differs from torch by {diff}"
    with open(path.replace(".onnx", ".ref.json"), "w") as f:
        json.dump({"inputs": {k: v.tolist() for k, v in inputs.items()},
                   "logits_shape": list(ref.shape),
                   "logits": [round(float(v), 8) for v in ref.flatten()]}, f)
    ops = sorted({n.op_type for n in m.graph.node})
    print(f"ops/{os.path.basename(path)}: {os.path.getsize(path) / 1e6:.2f} MB, "
          f"{len(m.graph.node)} nodes, ort-vs-torch {diff:.2e}, ops {' '.join(ops)}")



# --- Half-precision fixtures (models/half/): the same tiny BERT, and a tiny Llama (grouped-query
# attention, rotary positions, RMSNorm), exported in f16 and bf16 by both exporters. The
# Llama is written with its weights as external data (`NAME.onnx.data`), as large models are.
# `python3 models/make_fixtures.py --half`.


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, attn_implementation="eager",
                      tie_word_embeddings=False, use_cache=False)

    class LogitsOnly(LlamaForCausalLM):
        def forward(self, input_ids, attention_mask):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).logits

    return LogitsOnly(cfg)


def export_half(family, exporter, dtype):
    """Reference outputs: `logits` is the model evaluated in f32 from the half-rounded weights
    (what a runtime that upcasts at load computes, so tests can hold it to f32 tolerances);
    `logits_half` is torch's own evaluation in the half type."""
    torch.manual_seed(SEED)
    model = tiny_llama() if family == "llama" else tiny(family)
    randomise(model)
    tdtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = model.to(tdtype).eval()
    ids, mask = example()
    with torch.no_grad():
        ref_half = model(ids, mask).float()
        ref = model.float()(ids, mask)
    model = model.to(tdtype).eval()
    name = f"{family}_{exporter}_{dtype}.onnx"
    path = os.path.join(OUT, "half", name)
    external = family == "llama"
    export_onnx(model, ids, mask, path, exporter)
    m = onnx.load(path)
    if external:
        for f in os.listdir(os.path.dirname(path)):
            if f.startswith(name + ".data"):
                os.remove(os.path.join(os.path.dirname(path), f))
        onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=name + ".data", size_threshold=1024)
    onnx.checker.check_model(path, full_check=True)
    got = None
    if dtype == "f16":  # ORT's CPU provider has no bf16 kernels for most ops
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        diff = float(np.abs(got.astype(np.float32) - ref_half.numpy()).max())
        assert diff <= 5e-3, f"{name}: onnxruntime differs from torch by {diff}"
    with open(path.replace(".onnx", ".ref.json"), "w") as f:
        json.dump({"inputs": {"input_ids": ids.tolist(), "attention_mask": mask.tolist()},
                   "logits_shape": list(ref.shape),
                   "logits": [round(float(v), 8) for v in ref.flatten()],
                   "logits_half": [round(float(v), 8) for v in ref_half.flatten()]}, f)
    print(f"half/{name}: {len(m.graph.node)} nodes, f32-vs-half torch "
          f"{float((ref - ref_half).abs().max()):.2e}")


if __name__ == "__main__":
    main()

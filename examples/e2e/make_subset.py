"""Writes this example's data and tokenizer from the E2E NLG files in ../shared/data/e2e_nlg
(tuetschek/e2e-dataset, CC BY-SA 4.0; see ../../../shared/data/README.md, "E2E NLG").

- train.csv: devset.csv's rows for its first 60 meaning representations (501 rows; the
  public E2E train set is not in the data folder, so the dev set trains here).
- test.csv: testset_w_refs.csv's rows for its first 40 meaning representations (291 rows).
- tokenizer.json: a word-level tokenizer over the words of train.csv only (a Hugging Face
  tokenizers WordLevel model over whitespace-separated words, punctuation kept on its word,
  so decoding joins words with spaces and gives back the text exactly), with [UNK], [PAD],
  [BOS] and <|endoftext|>; test words it never saw become [UNK] in prompts (references are
  scored as raw text). It fits the GPT-2 fixture's 1000-token embedding.

Run from the repository root: python3 examples/e2e/make_subset.py [path/to/e2e_nlg]
(needs the `tokenizers` Python package; written with 0.23.3).
"""

import csv
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/e2e_nlg")
OUT = Path(__file__).parent


def first_mrs(path: Path, n: int) -> list[list[str]]:
    rows = list(csv.reader(path.open(newline="", encoding="utf-8")))
    header, body = rows[0], rows[1:]
    seen: list[str] = []
    keep = [header]
    for row in body:
        if row[0] not in seen:
            if len(seen) == n:
                break
            seen.append(row[0])
        keep.append(row)
    return keep


def write(rows: list[list[str]], name: str) -> None:
    with (OUT / name).open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


train = first_mrs(SRC / "devset.csv", 60)
test = first_mrs(SRC / "testset_w_refs.csv", 40)
write(train, "train.csv")
write(test, "test.csv")

pre = pre_tokenizers.WhitespaceSplit()
words: dict[str, None] = {}
for mr, ref in train[1:]:
    for text in (mr, "||", ref):
        for w, _ in pre.pre_tokenize_str(text):
            words.setdefault(w, None)
specials = ["[UNK]", "[PAD]", "[BOS]", "<|endoftext|>"]
vocab = {t: i for i, t in enumerate(specials + sorted(words))}
tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
tok.pre_tokenizer = pre
tok.add_special_tokens(specials)
tok.save(str(OUT / "tokenizer.json"))
print(f"train {len(train) - 1} rows, test {len(test) - 1} rows, vocabulary {len(vocab)}")

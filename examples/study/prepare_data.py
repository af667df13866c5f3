"""Copies the study's data subsets into examples/study/data/ from the public datasets.

Every file is a verbatim prefix (or concatenation) of a public file, so a reader can check it
against the source: the training files are the first N examples of each task's training file,
the test files are the tasks' whole dev/test sets. Sources and licences: data/SOURCES.md
(written by this script). SST-2 uses the quickstart's files already in examples/sst2/.

    python3 examples/study/prepare_data.py --shared ../shared/data
"""
import argparse
import glob
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data")

# (output, source relative to --shared, header lines kept, examples kept (0: all))
GLUE = [
    ("mrpc/train-first2000.tsv", "glue/MRPC/msr_paraphrase_train.txt", 1, 2000),
    ("mrpc/test.tsv", "glue/MRPC/msr_paraphrase_test.txt", 1, 0),
    ("rte/train-first2000.tsv", "glue/RTE/train.tsv", 1, 2000),
    ("rte/dev.tsv", "glue/RTE/dev.tsv", 1, 0),
    ("cola/train-first4000.tsv", "glue/CoLA/cola_public/raw/in_domain_train.tsv", 0, 4000),
    ("stsb/train-first3000.tsv", "glue/STS-B/train.tsv", 1, 3000),
    ("stsb/dev.tsv", "glue/STS-B/dev.tsv", 1, 0),
]
# GLUE's CoLA dev set is in_domain_dev followed by out_of_domain_dev (data README).
COLA_DEV = ["glue/CoLA/cola_public/raw/in_domain_dev.tsv",
            "glue/CoLA/cola_public/raw/out_of_domain_dev.tsv"]

SOURCES = """# Sources of the study's data subsets

Written by `prepare_data.py` from the public files; each is a verbatim prefix or concatenation.

| file | source | licence / terms |
|---|---|---|
| `mrpc/train-first2000.tsv` | header + first 2,000 pairs of the Microsoft Research Paraphrase Corpus `msr_paraphrase_train.txt` (the file GLUE's script downloads) | MSR Paraphrase Corpus licence terms |
| `mrpc/test.tsv` | `msr_paraphrase_test.txt`, whole (1,725 pairs) | as above |
| `rte/train-first2000.tsv` | header + first 2,000 pairs of GLUE RTE `train.tsv` | GLUE RTE (PASCAL RTE challenges), research use |
| `rte/dev.tsv` | GLUE RTE `dev.tsv`, whole (277 pairs) | as above |
| `cola/train-first4000.tsv` | first 4,000 rows of CoLA v1.1 `raw/in_domain_train.tsv` (no header) | CoLA: no licence stated; cite Warstadt et al. 2018 |
| `cola/dev.tsv` | `raw/in_domain_dev.tsv` + `raw/out_of_domain_dev.tsv` = GLUE CoLA dev (1,043 rows) | as above |
| `stsb/train-first3000.tsv` | header + first 3,000 pairs of GLUE STS-B `train.tsv` | STS Benchmark, see its LICENSE.txt (mixed sources, research use) |
| `stsb/dev.tsv` | GLUE STS-B `dev.tsv`, whole (1,500 pairs) | as above |
| `conll/train-first2000.txt` | the first 2,000 sentences of CoNLL-2003 English `eng.train` | CoNLL-2003 shared task; Reuters RCV1 text, research use |
| `conll/testb.txt` | CoNLL-2003 English `eng.testb`, whole (3,453 sentences) | as above |
| `reuters/modapte-train-first2000.sgm` | the first 2,000 ModApte training documents (`LEWISSPLIT="TRAIN" TOPICS="YES"`, in file order) of Reuters-21578 Distribution 1.0, each `<REUTERS>` element byte for byte | Reuters Ltd. and Carnegie Group: free distribution for research purposes only; cite "Reuters-21578, Distribution 1.0" |
| `reuters/modapte-test.sgm` | every ModApte test document (`LEWISSPLIT="TEST" TOPICS="YES"`, 3,299), byte for byte | as above |
"""


REUTERS = re.compile(rb"<REUTERS [^>]*>.*?</REUTERS>\r?\n?", re.S)


def lines(path):
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    return [l for l in text.split("\n")]


def write(rel, rows):
    path = os.path.join(OUT, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\n".join(rows).rstrip("\n") + "\n")
    print(f"{rel}: {len(rows)} lines")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", required=True, help="the datasets folder (with glue/, conll2003/)")
    args = ap.parse_args()
    for out, src, header, keep in GLUE:
        rows = [l for l in lines(os.path.join(args.shared, src)) if l.strip()]
        write(out, rows[: header + keep] if keep else rows)
    cola = []
    for src in COLA_DEV:
        cola += [l for l in lines(os.path.join(args.shared, src)) if l.strip()]
    write("cola/dev.tsv", cola)
    # CoNLL: sentences are separated by blank lines; -DOCSTART- lines belong to no sentence.
    rows, sentences, inside = [], 0, False
    for l in lines(os.path.join(args.shared, "conll2003/eng.train")):
        if not l.strip():
            if inside:
                sentences += 1
                inside = False
                if sentences == 2000:
                    break
        elif not l.startswith("-DOCSTART-"):
            inside = True
        rows.append(l)
    write("conll/train-first2000.txt", rows)
    write("conll/testb.txt", lines(os.path.join(args.shared, "conll2003/eng.testb")))
    # Reuters: whole <REUTERS> elements, bytes unchanged (the files are Latin-1 SGML).
    docs = []
    for f in sorted(glob.glob(os.path.join(args.shared, "reuters21578", "reut2-*.sgm"))):
        with open(f, "rb") as fh:
            docs += [m.group(0) for m in REUTERS.finditer(fh.read())]
    head = lambda d: d[: d.index(b">")]
    train = [d for d in docs if b'LEWISSPLIT="TRAIN"' in head(d) and b'TOPICS="YES"' in head(d)]
    test = [d for d in docs if b'LEWISSPLIT="TEST"' in head(d) and b'TOPICS="YES"' in head(d)]
    for rel, part in [("reuters/modapte-train-first2000.sgm", train[:2000]),
                      ("reuters/modapte-test.sgm", test)]:
        path = os.path.join(OUT, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(b'<!DOCTYPE lewis SYSTEM "lewis.dtd">\n' + b"".join(part))
        print(f"{rel}: {len(part)} documents")
    with open(os.path.join(OUT, "SOURCES.md"), "w") as f:
        f.write(SOURCES)


if __name__ == "__main__":
    main()

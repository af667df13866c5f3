//! The data layer on real slices of each format (runtime/tests/data/README.md): counts,
//! labels and the first examples' token ids (the ids from Python `tokenizers` 0.23.3 on the
//! same tokenizer.json), bad input naming file and line, and `Trainer` steps on CoNLL data.

use std::path::{Path, PathBuf};

mod common;

use bidora_runtime::backend::HostTensor;
use bidora_runtime::data::{reuters, Target};
use bidora_runtime::train::dataset::{self, Loaded, ModelSpec};
use bidora_runtime::train::{Examples, TrainConfig};

const IGN: i64 = -100;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

const MINILM: &str = "../../../models/tokenizers/all-minilm-l6-v2/tokenizer.json";

fn cfg(sets: &[&str]) -> TrainConfig {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    TrainConfig::parse("", "test", &sets).unwrap()
}

fn spec(task: &str, vocab: Option<usize>) -> ModelSpec {
    ModelSpec {
        inputs: vec![
            "input_ids".into(),
            "attention_mask".into(),
            "token_type_ids".into(),
        ],
        task: task.into(),
        vocab_size: vocab,
        classes: None,
    }
}

fn read(sets: &[&str], task: &str) -> Loaded {
    read_in(&data_dir(), sets, task, None).unwrap()
}

fn read_in(base: &Path, sets: &[&str], task: &str, vocab: Option<usize>) -> Result<Loaded, String> {
    dataset::read(&cfg(sets).data, base, &spec(task, vocab)).map_err(|e| e.to_string())
}

const RTE: [&str; 4] = [
    "data.text_a=sentence1",
    "data.text_b=sentence2",
    "data.label=label",
    "data.max_len=128",
];

/// `[CLS] no weapons of mass destruction found in iraq yet . [SEP] weapons … . [SEP]`.
const RTE_FIRST: [i64; 21] = [
    101, 2053, 4255, 1997, 3742, 6215, 2179, 1999, 5712, 2664, 1012, 102, 4255, 1997, 3742, 6215,
    2179, 1999, 5712, 1012, 102,
];

fn rte(format: &str, file: &str) -> Loaded {
    let mut sets = RTE.to_vec();
    let f = format!("data.format={format}");
    let t = format!("data.train={file}");
    let tok = format!("data.tokenizer={MINILM}");
    sets.extend([f.as_str(), t.as_str(), tok.as_str()]);
    read(&sets, "seq-cls")
}

#[test]
fn glue_tsv_pairs_encode_with_the_real_tokenizer() {
    let d = rte("glue-tsv", "rte-train-head21.tsv").data;
    assert_eq!(d.rows.len(), 20);
    assert_eq!(d.labels, ["entailment", "not_entailment"]);
    assert_eq!(d.rows[0].ids, RTE_FIRST);
    assert_eq!(d.rows[0].types[12..], [1; 9]);
    assert_eq!(d.rows[0].target, Target::Class(1));
    assert_eq!(d.rows[0].line, 2);
    let classes: Vec<i64> = d
        .rows
        .iter()
        .map(|r| match r.target {
            Target::Class(c) => c,
            _ => panic!(),
        })
        .collect();
    assert_eq!(classes.iter().filter(|&&c| c == 0).count(), 11);
}

#[test]
fn csv_and_jsonl_read_the_same_rows_as_the_tsv() {
    let tsv = rte("glue-tsv", "rte-train-head21.tsv").data;
    for (format, file) in [
        ("csv", "rte-train-head20.csv"),
        ("jsonl", "rte-train-head20.jsonl"),
    ] {
        let d = rte(format, file).data;
        assert_eq!(d.labels, tsv.labels, "{format}");
        assert_eq!(d.rows.len(), 20, "{format}");
        for (a, b) in d.rows.iter().zip(&tsv.rows) {
            assert_eq!((&a.ids, &a.types, &a.target), (&b.ids, &b.types, &b.target));
        }
        // After the header (CSV) or on the first line (JSON Lines).
        let lines: Vec<usize> = d.rows.iter().map(|r| r.line).take(3).collect();
        let first = if format == "csv" { 2 } else { 1 };
        assert_eq!(lines, [first, first + 1, first + 2], "{format}");
    }
}

#[test]
fn batches_pad_to_the_longest_rounded_up_and_never_past_max_len() {
    let mut sets = RTE.to_vec();
    sets.extend([
        "data.train=rte-train-head21.tsv",
        "data.tokenizer=hash:1000",
        "data.pad_to_multiple_of=16",
        "data.max_len=40",
    ]);
    let d = read(&sets, "seq-cls").data;
    assert_eq!(d.rows[0].ids.len(), 17, "<s> + 9 + 7 words");
    let b = d.batch(&[0]).unwrap();
    let shape = |n: &str| b.iter().find(|(k, _)| k == n).unwrap().1.shape().to_vec();
    assert_eq!(shape("input_ids"), [1, 32]);
    assert_eq!(shape("token_type_ids"), [1, 32]);
    assert_eq!(shape("labels"), [1]);
    let longest = (0..20).max_by_key(|&i| d.rows[i].ids.len()).unwrap();
    assert_eq!(d.rows[longest].ids.len(), 40, "cut to max_len");
    let b = d.batch(&[0, longest]).unwrap();
    assert_eq!(b[0].1.shape(), [2, 40], "48 capped at max_len");
    let mask = i64s(&b[1].1);
    assert_eq!(mask.index_axis(ndarray::Axis(0), 0).sum(), 17);
}

fn i64s(t: &HostTensor) -> &ndarray::ArrayD<i64> {
    match t {
        HostTensor::I64(a) => a,
        other => panic!("{} tensor, expected i64", other.dtype()),
    }
}

#[test]
fn conll_labels_the_first_subword_of_each_word() {
    let sets = [
        "data.format=conll",
        "data.train=conll2003-eng.train-head49",
        "data.test=conll2003-eng.testa-head17",
    ];
    let tok = format!("data.tokenizer={MINILM}");
    let mut s = sets.to_vec();
    s.push(&tok);
    let l = read(&s, "token-cls");
    let d = &l.data;
    assert_eq!(d.rows.len(), 4);
    assert_eq!(l.test.as_ref().unwrap().rows.len(), 2);
    // IOB1 → IOB2: every entity's first word is B-.
    assert_eq!(
        d.labels,
        ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-ORG", "I-PER", "O"]
    );
    let id = |t: &str| d.labels.iter().position(|n| n == t).unwrap() as i64;
    // Hand-worked: `EU rejects German call to boycott British lamb .`, one token per word.
    assert_eq!(
        d.rows[0].ids,
        [101, 7327, 19164, 2446, 2655, 2000, 17757, 2329, 12559, 1012, 102]
    );
    assert_eq!(
        d.rows[0].target,
        Target::Tokens(vec![
            IGN,
            id("B-ORG"),
            id("O"),
            id("B-MISC"),
            id("O"),
            id("O"),
            id("O"),
            id("B-MISC"),
            id("O"),
            id("O"),
            IGN
        ])
    );
    // `BRUSSELS 1996-08-22`: the date is five word pieces (1996 - 08 - 22); only the first
    // carries the tag.
    assert_eq!(
        d.rows[2].ids,
        [101, 9371, 2727, 1011, 5511, 1011, 2570, 102]
    );
    assert_eq!(
        d.rows[2].target,
        Target::Tokens(vec![IGN, id("B-LOC"), id("O"), IGN, IGN, IGN, IGN, IGN])
    );
    assert_eq!(d.rows[2].line, 16);
    // Padding gets -100 too.
    let b = d.batch(&[0, 2]).unwrap();
    let y = i64s(&b.iter().find(|(k, _)| k == "labels").unwrap().1);
    assert_eq!(
        y.shape(),
        [2, 32],
        "11 tokens, padded to the default multiple of 32"
    );
    assert_eq!(y[[1, 8]], IGN);
    assert_eq!(y[[1, 31]], IGN);

    // As in the file: IOB1.
    let mut s = s.clone();
    s.push("data.tag_scheme=iob1");
    let d = read(&s, "token-cls").data;
    assert_eq!(d.labels, ["I-LOC", "I-MISC", "I-ORG", "I-PER", "O"]);
}

#[test]
fn untyped_bio_files_without_docstart_read_as_one_entity_type() {
    // BioBERT's NER releases (NCBI-disease, BC2GM…): `token<TAB>tag`, tags B / I / O, no
    // -DOCSTART-. IOB1 `I` after `O` opens an entity, so the IOB2 labels start with `B`.
    let text = "Famil\tO\nadenomatous\tB\npolyposis\tI\nis\tO\nrare\tO\n\n\
                Colon\tI\ncancer\tI\nand\tO\nbreast\tB\ncancer\tI\n";
    let (d, f) = tmp("ncbi.tsv", text);
    let t = format!("data.train={f}");
    let sets = ["data.format=conll", "data.tokenizer=hash:100", t.as_str()];
    let l = read_in(d.path(), &sets, "token-cls", Some(100)).unwrap();
    assert_eq!(l.data.labels, ["B", "I", "O"]);
    assert_eq!(l.data.rows.len(), 2);
    use bidora_runtime::data::conll::{read as read_conll, Scheme};
    let s = read_conll(&d.path().join(&f), Scheme::Iob2, 0).unwrap();
    assert_eq!(s[0].tags, ["O", "B", "I", "O", "O"]);
    assert_eq!(
        s[1].tags,
        ["B", "I", "O", "B", "I"],
        "a leading I opens the entity"
    );
    assert_eq!(s[1].lines, [7, 8, 9, 10, 11]);
    // Entity F1 over spans, hand-counted: gold spans (1,2) | (0,1), (3,4); the prediction
    // finds (1,2) and (3,4) and invents (0,0) in sentence 0: P = 2/3, R = 2/3.
    use bidora_runtime::metrics::entity_scores;
    let gold = vec![s[0].tags.clone(), s[1].tags.clone()];
    let pred = vec![vec!["B", "B", "I", "O", "O"], vec!["O", "O", "O", "B", "I"]];
    let pred: Vec<Vec<String>> = pred
        .into_iter()
        .map(|v| v.into_iter().map(String::from).collect())
        .collect();
    let sc = entity_scores(&gold, &pred).unwrap();
    assert_eq!((sc.gold, sc.predicted, sc.correct), (3, 3, 2));
    assert!((sc.f1 - 2.0 / 3.0).abs() < 1e-12, "{}", sc.f1);
    // A tag that is neither still names the line.
    let (d, f) = tmp("bad.tsv", "a\tB\nb\tX-Y\n");
    let t = format!("data.train={f}");
    let e = err(
        d.path(),
        &["data.format=conll", "data.tokenizer=hash:100", &t],
        "token-cls",
        None,
    );
    assert!(e.contains("bad.tsv:2:") && e.contains("'X-Y'"), "{e}");
}

#[test]
fn iob1_to_iob2_starts_entities_with_b() {
    use bidora_runtime::data::conll::iob1_to_iob2;
    let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        iob1_to_iob2(&t(&[
            "I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG", "I-ORG"
        ])),
        t(&["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG", "I-ORG"])
    );
    let iob2 = t(&["B-PER", "I-PER", "O", "B-LOC"]);
    assert_eq!(iob1_to_iob2(&iob2), iob2);
}

#[test]
fn reuters_splits_count_as_the_readme_defines() {
    let read_split = |split: &str| {
        let s = format!("data.split={split}");
        read(
            &[
                "data.format=reuters-sgml",
                "data.train=reuters",
                "data.tokenizer=hash:1000",
                &s,
            ],
            "multi-label",
        )
    };
    // The slice: NEWID 1–10 (LEWISSPLIT=TRAIN; TOPICS YES: 1, 5, 6, 8, 9, 10) and
    // 17026–17035 (3 NOT-USED/PUBLISHED-TESTSET; 7 TEST, of which 5 TOPICS=YES).
    for (split, train, test) in [("modapte", 6, 5), ("modlewis", 10, 7), ("modhayes", 17, 3)] {
        let l = read_split(split);
        assert_eq!(l.data.rows.len(), train, "{split} train");
        assert_eq!(
            l.test.as_ref().map_or(0, |t| t.rows.len()),
            test,
            "{split} test"
        );
    }
    let l = read_split("modapte");
    assert_eq!(l.data.labels.len(), 17);
    assert_eq!(&l.data.labels[..3], ["acq", "barley", "cocoa"]);
    let hot = |i: usize| match &l.data.rows[i].target {
        Target::MultiHot(h) => h.clone(),
        _ => panic!(),
    };
    let on = |h: Vec<f32>| -> Vec<&str> {
        h.iter()
            .zip(&l.data.labels)
            .filter(|(v, _)| **v == 1.0)
            .map(|(_, n)| n.as_str())
            .collect()
    };
    assert_eq!(on(hot(0)), ["cocoa"]);
    assert_eq!(
        on(hot(3)),
        Vec::<&str>::new(),
        "NEWID 8: TOPICS=YES, no topic"
    );
    assert_eq!(l.data.rows[0].line, 2);
    let b = l.data.batch(&[0, 1]).unwrap();
    let y = b.iter().find(|(k, _)| k == "labels").unwrap();
    assert_eq!(y.1.shape(), [2, 17]);
    // Test topics outside the training label set are left out; earn is in it.
    let t = l.test.as_ref().unwrap();
    assert_eq!(t.rows[1].line, 168);

    let docs = reuters::read_file(&data_dir().join("reuters/reut2-000-head.sgm")).unwrap();
    assert_eq!(docs.len(), 10);
    assert_eq!(docs[0].new_id, 1);
    assert_eq!(docs[0].title, "BAHIA COCOA REVIEW");
    assert!(docs[0]
        .body
        .starts_with("Showers continued throughout the week"));
    assert!(!docs[0].body.contains('\u{3}'), "&#3; is dropped");
    assert_eq!(
        docs[4].topics,
        ["grain", "wheat", "corn", "barley", "oat", "sorghum"]
    );
}

#[test]
fn peptides_read_the_descriptor_line_spaces_and_crlf() {
    use bidora_runtime::data::peptides;
    let p = peptides::read(&data_dir().join("AMPvsUniProt-head31.csv"), " ", true, 0).unwrap();
    assert_eq!(p.records.rows.len(), 30);
    assert_eq!(p.class_names, Some(["UniProt".into(), "AMP".into()]));
    assert_eq!(p.records.rows[0].label, "1");
    assert!(p.records.rows[0].text_a.starts_with("G L W S K I K"));
    assert_eq!(p.records.rows[0].line, 2);
    let p = peptides::read(
        &data_dir().join("ACP_CancPPD_vs_TM-head21.csv"),
        "",
        true,
        0,
    )
    .unwrap();
    assert_eq!(p.records.rows.len(), 20);
    assert_eq!(
        p.records.rows[0].text_a, "AAKKWAKAKWAKAKKWAKAA",
        "no CR left"
    );
    assert_eq!(p.class_names, Some(["TM".into(), "ACP".into()]));

    // Through the config: ESM-sized hashing, one id per residue after <s>; classes 0 and 1
    // by number even when the slice holds only positives.
    let l = read(
        &[
            "data.format=peptides",
            "data.train=AMPvsUniProt-head31.csv",
            "data.tokenizer=hash:33",
        ],
        "seq-cls",
    );
    assert_eq!(l.data.labels, ["0", "1"]);
    assert_eq!(l.data.rows[0].ids.len(), 1 + 33);
    assert!(l.data.rows.iter().all(|r| r.target == Target::Class(1)));
}

#[test]
fn e2e_scores_only_the_reference_and_keeps_references_per_mr() {
    let l = read(
        &[
            "data.format=e2e",
            "data.train=e2e-devset-head31.csv",
            "data.tokenizer=hash:1000",
        ],
        "causal-lm",
    );
    let d = &l.data;
    assert_eq!(d.rows.len(), 30);
    let refs = d.references.as_ref().unwrap();
    assert_eq!(refs.groups.len(), 5);
    assert!(refs.groups.iter().all(|(_, r)| r.len() == 6));
    assert_eq!(
        refs.groups[0].0,
        "name[Alimentum], area[city centre], familyFriendly[no]"
    );
    assert_eq!(
        refs.groups[0].1[0],
        "There is a place in the city centre, Alimentum, that is not family-friendly."
    );
    // `name[Alimentum], area[city centre], familyFriendly[no] ||`: 5 hashed words, then
    // the 13-word reference and eos (2).
    let r = &d.rows[0];
    assert_eq!(r.ids.len(), 5 + 13 + 1);
    assert_eq!(*r.ids.last().unwrap(), 2);
    let Target::Tokens(y) = &r.target else {
        panic!()
    };
    assert_eq!(y[..5], [IGN; 5]);
    assert_eq!(y[5..], r.ids[5..]);

    // The validation split takes whole MRs.
    let run = dataset::load_for(
        &cfg(&[
            "data.format=e2e",
            "data.train=e2e-devset-head31.csv",
            "data.tokenizer=hash:1000",
        ])
        .data,
        &data_dir(),
        &spec("causal-lm", None),
        0.4,
        1,
    )
    .unwrap();
    let g = &run.data.references().unwrap().example_group;
    assert_eq!(run.val_idx.len(), 12);
    for &v in &run.val_idx {
        assert!(run.train_idx.iter().all(|&t| g[t] != g[v]));
    }
}

fn tmp(name: &str, text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(name), text).unwrap();
    (dir, name.to_string())
}

fn err(base: &Path, sets: &[&str], task: &str, vocab: Option<usize>) -> String {
    match read_in(base, sets, task, vocab) {
        Ok(_) => panic!("{sets:?} was accepted"),
        Err(e) => e,
    }
}

#[test]
fn bad_rows_are_errors_naming_file_and_line() {
    // Missing column: in the header, and in a short row.
    let (d, f) = tmp("a.csv", "text,label\nfine,1\nshort\n");
    let t = format!("data.train={f}");
    let e = err(
        d.path(),
        &[
            "data.format=csv",
            &t,
            "data.text_a=nope",
            "data.tokenizer=hash:100",
        ],
        "seq-cls",
        None,
    );
    assert!(e.contains("a.csv") && e.contains("no column 'nope'"), "{e}");
    let e = err(
        d.path(),
        &[
            "data.format=csv",
            &t,
            "data.text_a=text",
            "data.tokenizer=hash:100",
        ],
        "seq-cls",
        None,
    );
    assert!(
        e.contains("a.csv:3:") && e.contains("missing column 'label'"),
        "{e}"
    );
    let (d, f) = tmp(
        "a.jsonl",
        "{\"text\": \"x\", \"label\": 1}\n\n{\"text\": \"y\"}\n",
    );
    let t = format!("data.train={f}");
    let e = err(
        d.path(),
        &[
            "data.format=jsonl",
            &t,
            "data.text_a=text",
            "data.tokenizer=hash:100",
        ],
        "seq-cls",
        None,
    );
    assert!(
        e.contains("a.jsonl:3:") && e.contains("missing column 'label'"),
        "{e}"
    );

    // Unknown label, given a label list.
    let mut sets = RTE.to_vec();
    sets.extend(["data.train=rte-train-head21.tsv", "data.tokenizer=hash:100"]);
    let mut s = sets.clone();
    s.push("data.labels=['entailment']");
    let e = err(&data_dir(), &s, "seq-cls", None);
    assert!(
        e.contains("rte-train-head21.tsv:2:") && e.contains("unknown label 'not_entailment'"),
        "{e}"
    );

    // Unparsable number (regression on class names).
    let e = err(&data_dir(), &sets, "regression", None);
    assert!(
        e.contains("rte-train-head21.tsv:2:") && e.contains("'not_entailment' is not a number"),
        "{e}"
    );

    // Empty files, in every format.
    for format in [
        "glue-tsv",
        "csv",
        "jsonl",
        "peptides",
        "conll",
        "reuters-sgml",
        "e2e",
    ] {
        let (d, f) = tmp("empty.txt", "\n  \n");
        let t = format!("data.train={f}");
        let fm = format!("data.format={format}");
        let task = match format {
            "conll" => "token-cls",
            "reuters-sgml" => "multi-label",
            "e2e" => "causal-lm",
            _ => "seq-cls",
        };
        let e = err(d.path(), &[&fm, &t, "data.tokenizer=hash:100"], task, None);
        assert!(e.contains("empty.txt: the file is empty"), "{format}: {e}");
    }

    // Tokenizer mismatch: all-MiniLM's ids against a 1000-token model.
    let mut s = RTE.to_vec();
    let tok = format!("data.tokenizer={MINILM}");
    s.extend(["data.train=rte-train-head21.tsv", tok.as_str()]);
    let e = err(&data_dir(), &s, "seq-cls", Some(1000));
    assert!(
        e.contains("rte-train-head21.tsv:2:")
            && e.contains("token id 2053 is outside the model's vocabulary of 1000"),
        "{e}"
    );
    let e = err(
        &data_dir(),
        &[
            "data.format=conll",
            "data.train=conll2003-eng.train-head49",
            &tok,
        ],
        "token-cls",
        Some(1000),
    );
    assert!(
        e.contains("conll2003-eng.train-head49:3:") && e.contains("vocabulary"),
        "{e}"
    );

    // Format-specific: a CoNLL tag, a Reuters attribute, a peptide, an E2E column.
    let cases: [(&str, &str, &str, &str, [&str; 2]); 4] = [
        (
            "x.conll",
            "EU NNP I-NP I-ORG\nrejects VBZ I-VP Q-X\n",
            "conll",
            "token-cls",
            ["x.conll:2:", "'Q-X'"],
        ),
        (
            "x.sgm",
            "<!DOCTYPE lewis>\n\n<REUTERS TOPICS=\"YES\" NEWID=\"1\">\n</REUTERS>\n",
            "reuters-sgml",
            "multi-label",
            ["x.sgm:3:", "LEWISSPLIT"],
        ),
        (
            "p.csv",
            "2,1,A,B\nKLLK,1\nKL7K,0\n",
            "peptides",
            "seq-cls",
            ["p.csv:3:", "'KL7K'"],
        ),
        (
            "t.csv",
            "MR\n\"name[X]\"\n",
            "e2e",
            "causal-lm",
            ["t.csv", "no column 'ref'"],
        ),
    ];
    for (name, text, format, task, needles) in cases {
        let (d, f) = tmp(name, text);
        let (fm, t) = (format!("data.format={format}"), format!("data.train={f}"));
        let e = err(d.path(), &[&fm, &t, "data.tokenizer=hash:100"], task, None);
        assert!(needles.iter().all(|n| e.contains(n)), "{format}: {e}");
    }

    // A format for another head.
    let e = err(
        &data_dir(),
        &["data.format=conll", "data.train=x"],
        "seq-cls",
        None,
    );
    assert!(e.contains("feeds the token-cls head"), "{e}");
}

/// `Trainer` steps on CoNLL data: the GPT-2 fixture compiled with the token-cls head (its
/// 1000 logits per token serve as classes), LoRA, words hashed into its vocabulary.
#[test]
fn trainer_runs_on_conll_with_a_token_cls_fixture() {
    use bidora_compiler::heads::Task;
    use bidora_compiler::rewrite::Method as AdapterMethod;
    use bidora_runtime::artifact::Artifact;
    use bidora_runtime::backend;

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("artifact");
    common::write_artifact(
        &out,
        "gpt2_legacy17.onnx",
        "c_attn:q,v",
        AdapterMethod::Lora,
        Task::TokenCls,
        false,
        7,
    );
    let art = Artifact::open(&out).unwrap();
    assert_eq!(art.manifest.vocab_size, Some(1000));

    let base = data_dir();
    let cfg = TrainConfig::parse(
        "",
        "test",
        &[
            "method=lora",
            "steps=4",
            "batch_size=2",
            "eval_batch_size=4",
            "val_ratio=0.25",
            "lower.lr=1e-2",
            "data.format=conll",
            "data.train=conll2003-eng.train-head49",
            "data.test=conll2003-eng.testa-head17",
            "data.tokenizer=hash:1000",
            "data.pad_to_multiple_of=8",
            "data.max_len=64",
        ]
        .map(String::from),
    )
    .unwrap();
    let mut spec = ModelSpec::of(&art).unwrap();
    assert_eq!(spec.vocab_size, Some(1000));
    // The fixture's head is GPT-2's 1000-way LM projection standing in for a tagger: the 7
    // tag names of the training file do not fill it, so loading refuses before training.
    assert_eq!(spec.classes, Some(1000));
    let err = match dataset::load_for(&cfg.data, &base, &spec, cfg.val_ratio, cfg.seed) {
        Ok(_) => panic!("7 tags for 1000 classes were accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("conll2003-eng.train-head49")
            && err.contains("7 distinct labels")
            && err.contains("1000 classes")
            && err.contains("data.labels"),
        "{err}"
    );
    // Without the class count the steps run, and scoring refuses what 7 tags cannot name.
    spec.classes = None;
    let data = dataset::load_for(&cfg.data, &base, &spec, cfg.val_ratio, cfg.seed).unwrap();
    assert_eq!((data.train_idx.len(), data.val_idx.len()), (3, 1));
    let tract = backend::tract::TractBackend::new(
        &backend::BackendOptions {
            threads: 1,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let run = dir.path().join("run");
    let mut t = bidora_runtime::train::Trainer::new(cfg, &art, &tract, data, &run, false).unwrap();
    t.progress = false;
    let err = t.run_to_end(None).unwrap_err().to_string();
    let steps = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"kind\":\"step\""))
        .count();
    assert_eq!(steps, 4);
    assert!(
        err.contains("names 7 tags") && err.contains("1000 classes"),
        "{err}"
    );
}

fn err_classes(base: &Path, sets: &[&str], task: &str, classes: usize) -> String {
    let mut sp = spec(task, None);
    sp.classes = Some(classes);
    match dataset::read(&cfg(sets).data, base, &sp) {
        Ok(_) => panic!("{sets:?} was accepted for {classes} classes"),
        Err(e) => e.to_string(),
    }
}

/// Every label maps to a class the head has, or loading stops naming the file, the line and
/// the label: a typo, an empty cell, a label list of the wrong length, a one-class slice.
#[test]
fn labels_that_do_not_fit_the_head_are_refused_before_training() {
    let csv = "text,label\na,0\nb,1\nc,7\nd,0\ne,1\n";
    let (d, f) = tmp("l.csv", csv);
    let t = format!("data.train={f}");
    let base = [
        "data.format=csv",
        "data.text_a=text",
        "data.tokenizer=hash:100",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .chain([t.as_str()].iter())
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let sets = with(&[]);
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    // A typo label '7' in a binary file: named with its line, rarest first.
    let e = err_classes(d.path(), &sets, "seq-cls", 2);
    assert!(
        e.contains("l.csv")
            && e.contains("3 distinct labels")
            && e.contains("2 classes")
            && e.contains("'7' (1 time, first at line 4)"),
        "{e}"
    );
    // The same file fits a 3-class head.
    let mut sp = spec("seq-cls", None);
    sp.classes = Some(3);
    assert!(dataset::read(&cfg(&sets).data, d.path(), &sp).is_ok());

    // A configured list of the wrong length, and one naming a label twice.
    let s = with(&["data.labels=['0', '1', '7']"]);
    let s: Vec<&str> = s.iter().map(String::as_str).collect();
    let e = err_classes(d.path(), &s, "seq-cls", 2);
    assert!(
        e.contains("data.labels names 3 labels") && e.contains("2 classes"),
        "{e}"
    );
    let s = with(&["data.labels=['0', '0']"]);
    let s: Vec<&str> = s.iter().map(String::as_str).collect();
    let e = err_classes(d.path(), &s, "seq-cls", 2);
    assert!(e.contains("'0' twice"), "{e}");

    // An empty label cell is an error at its line, not a class "" that shifts the others.
    let (d2, f2) = tmp("e.csv", "text,label\na,0\nb,\nc,1\n");
    let t2 = format!("data.train={f2}");
    let e = err(
        d2.path(),
        &[base[0], base[1], base[2], &t2],
        "seq-cls",
        None,
    );
    assert!(
        e.contains("e.csv:3:") && e.contains("label is empty"),
        "{e}"
    );

    // A slice holding one of a binary head's two labels would map it to id 0.
    let (d3, f3) = tmp("one.csv", "text,label\na,1\nb,1\n");
    let t3 = format!("data.train={f3}");
    let e = err_classes(d3.path(), &[base[0], base[1], base[2], &t3], "seq-cls", 2);
    assert!(
        e.contains("1 distinct labels") && e.contains("data.labels"),
        "{e}"
    );

    // Names with terminal escape codes are printed escaped.
    let (d4, f4) = tmp("esc.csv", "text,label\na,0\nb,\u{1b}[2Jx\n");
    let t4 = format!("data.train={f4}");
    let e = err_classes(d4.path(), &[base[0], base[1], base[2], &t4], "seq-cls", 3);
    assert!(!e.contains('\u{1b}') && e.contains("\\u{1b}[2Jx"), "{e}");
}

/// Regression targets must be finite numbers; CoNLL tags outside the tag set are refused.
#[test]
fn regression_targets_and_tags_outside_the_set_are_refused() {
    for bad in ["nan", "inf", "-inf"] {
        let (d, f) = tmp("r.csv", &format!("text,label\na,0.5\nb,{bad}\n"));
        let t = format!("data.train={f}");
        let e = err(
            d.path(),
            &[
                "data.format=csv",
                "data.text_a=text",
                "data.tokenizer=hash:100",
                &t,
            ],
            "regression",
            None,
        );
        assert!(
            e.contains("r.csv:3:") && e.contains("not a finite number"),
            "{e}"
        );
    }
    let (d, f) = tmp("t.conll", "EU B-ORG\nrejects O\n\nPeter B-PER\n");
    let t = format!("data.train={f}");
    let sets = [
        "data.format=conll",
        "data.tokenizer=hash:100",
        "data.labels=['O', 'B-ORG', 'I-ORG']",
        &t,
    ];
    let e = err(d.path(), &sets, "token-cls", None);
    assert!(
        e.contains("t.conll:4:") && e.contains("unknown label 'B-PER'"),
        "{e}"
    );
    // The tag set derived from the file must fill the head.
    let e = err_classes(
        d.path(),
        &sets[..3]
            .iter()
            .copied()
            .chain([t.as_str()])
            .filter(|s| !s.starts_with("data.labels"))
            .collect::<Vec<_>>(),
        "token-cls",
        9,
    );
    assert!(
        e.contains("3 distinct labels") && e.contains("9 classes"),
        "{e}"
    );
}

/// A JSON file that is not a tokenizer is called that, not a syntax error at a column.
#[test]
fn a_json_file_that_is_no_tokenizer_says_so() {
    let (d, f) = tmp("a.csv", "text,label\na,0\n");
    std::fs::write(
        d.path().join("config.json"),
        r#"{"vocab_size": 3, "hidden": 2}"#,
    )
    .unwrap();
    let t = format!("data.train={f}");
    let e = err(
        d.path(),
        &[
            "data.format=csv",
            "data.text_a=text",
            "data.tokenizer=config.json",
            &t,
        ],
        "seq-cls",
        None,
    );
    assert!(
        e.contains("config.json")
            && e.contains("is JSON but not a tokenizer.json")
            && e.contains("vocab_size"),
        "{e}"
    );
}

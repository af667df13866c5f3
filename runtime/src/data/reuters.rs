//! Reuters-21578 SGML (`reuters-sgml`): `<REUTERS TOPICS=.. LEWISSPLIT=.. CGISPLIT=..
//! NEWID=..>` elements holding `<TOPICS><D>..</D></TOPICS>`, `<TITLE>` and `<BODY>`, in
//! Latin-1 with character entities (`&lt;`, `&#3;`). The three standard splits are defined in
//! the collection's README.txt, §VIII.A–C (shared/data/reuters21578/README.txt):
//!
//! | split | train | test |
//! |---|---|---|
//! | ModLewis | LEWISSPLIT=TRAIN, TOPICS=YES or NO | LEWISSPLIT=TEST, TOPICS=YES or NO |
//! | ModApte | LEWISSPLIT=TRAIN, TOPICS=YES | LEWISSPLIT=TEST, TOPICS=YES |
//! | ModHayes | CGISPLIT=TRAINING-SET | CGISPLIT=PUBLISHED-TESTSET |
//!
//! Everything else (NOT-USED, TOPICS=BYPASS) is in neither part. The parser is a tolerant
//! scan for the few tags it needs, not a general SGML parser: the files are regular.

use std::path::{Path, PathBuf};

use super::{at, file_error, DataError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    ModApte,
    ModLewis,
    ModHayes,
}

impl Split {
    pub fn parse(s: &str) -> Result<Split, DataError> {
        match s.to_ascii_lowercase().as_str() {
            "modapte" => Ok(Split::ModApte),
            "modlewis" => Ok(Split::ModLewis),
            "modhayes" => Ok(Split::ModHayes),
            other => Err(DataError::Config(format!(
                "split '{other}' is not modapte, modlewis or modhayes"
            ))),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Train,
    Test,
}

/// One document.
#[derive(Clone, Debug, PartialEq)]
pub struct Doc {
    pub file: PathBuf,
    /// The line of its `<REUTERS` tag.
    pub line: usize,
    pub new_id: u32,
    pub topics_attr: String,
    pub lewis_split: String,
    pub cgi_split: String,
    pub topics: Vec<String>,
    pub title: String,
    pub body: String,
}

impl Doc {
    /// Which part of `split` the document is in, if any (module table).
    pub fn part(&self, split: Split) -> Option<Part> {
        let topics = self.topics_attr.as_str();
        match split {
            Split::ModApte | Split::ModLewis => {
                let labelled = topics == "YES" || (split == Split::ModLewis && topics == "NO");
                match (self.lewis_split.as_str(), labelled) {
                    ("TRAIN", true) => Some(Part::Train),
                    ("TEST", true) => Some(Part::Test),
                    _ => None,
                }
            }
            Split::ModHayes => match self.cgi_split.as_str() {
                "TRAINING-SET" => Some(Part::Train),
                "PUBLISHED-TESTSET" => Some(Part::Test),
                _ => None,
            },
        }
    }

    /// The text a model reads: title, then body.
    pub fn text(&self) -> String {
        match (self.title.is_empty(), self.body.is_empty()) {
            (false, false) => format!("{}\n{}", self.title, self.body),
            (false, true) => self.title.clone(),
            _ => self.body.clone(),
        }
    }
}

/// The `.sgm` files to read: `path` itself, or every `*.sgm` in it, sorted by name (so
/// reut2-000 … reut2-021, the collection's order).
pub fn files(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| file_error(path, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("sgm")))
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(file_error(path, "no .sgm files in the folder"));
    }
    Ok(out)
}

/// Every document of `path` (a file or a folder of them).
pub fn read(path: &Path) -> Result<Vec<Doc>, DataError> {
    let mut docs = vec![];
    for f in files(path)? {
        docs.extend(read_file(&f)?);
    }
    Ok(docs)
}

/// The files are Latin-1: every byte is its own code point.
fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// `&lt;`, `&gt;`, `&amp;` and numeric entities; control characters (the wire codes `&#2;`,
/// `&#3;`, …) become nothing, except newlines and tabs.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        // `;` is ASCII, so its byte position is a char boundary.
        let end = rest.bytes().take(12).position(|b| b == b';');
        let ent = end.map(|e| &rest[1..e]);
        let rep = match ent {
            Some("lt") => Some(Some('<')),
            Some("gt") => Some(Some('>')),
            Some("amp") => Some(Some('&')),
            Some("quot") => Some(Some('"')),
            Some(e) if e.starts_with('#') => e[1..]
                .parse::<u32>()
                .ok()
                .map(|n| char::from_u32(n).filter(|c| !c.is_control() || *c == '\n' || *c == '\t')),
            _ => None,
        };
        match (rep, end) {
            (Some(c), Some(e)) => {
                out.extend(c);
                rest = &rest[e + 1..];
            }
            _ => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The content of the first `<tag>…</tag>` (or `<tag …>…</tag>`) in `s`.
fn element<'s>(s: &'s str, tag: &str) -> Option<&'s str> {
    let open = format!("<{tag}");
    let mut from = 0;
    while let Some(i) = s[from..].find(&open) {
        let start = from + i;
        let after = &s[start + open.len()..];
        // `<TEXT` must not match `<TEXTX`: the name ends at `>` or a space.
        if after.starts_with('>') || after.starts_with(' ') {
            let gt = start + open.len() + after.find('>')?;
            let close = format!("</{tag}>");
            let end = s[gt + 1..].find(&close)? + gt + 1;
            return Some(&s[gt + 1..end]);
        }
        from = start + open.len();
    }
    None
}

fn attribute(open_tag: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let i = open_tag.find(&key)? + key.len();
    let j = open_tag[i..].find('"')? + i;
    Some(open_tag[i..j].to_string())
}

fn strip_tags(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut inside = false;
    for c in s.chars() {
        match c {
            '<' => inside = true,
            '>' if inside => inside = false,
            c if !inside => out.push(c),
            _ => {}
        }
    }
    out
}

pub fn read_file(path: &Path) -> Result<Vec<Doc>, DataError> {
    let bytes = super::read_bytes(path)?;
    let text = latin1(&bytes);
    let mut docs = vec![];
    let (mut pos, mut line) = (0usize, 1usize);
    while let Some(i) = text[pos..].find("<REUTERS") {
        let start = pos + i;
        line += text[pos..start].matches('\n').count();
        let end = text[start..]
            .find("</REUTERS>")
            .map(|e| start + e)
            .ok_or_else(|| at(path, line, "a <REUTERS> element without </REUTERS>"))?;
        let doc = &text[start..end];
        let open = &doc[..doc.find('>').unwrap_or(doc.len())];
        let attr = |name: &str| {
            attribute(open, name)
                .ok_or_else(|| at(path, line, format!("<REUTERS> has no {name} attribute")))
        };
        let new_id = attr("NEWID")?;
        let new_id = new_id
            .parse()
            .map_err(|_| at(path, line, format!("NEWID '{new_id}' is not a number")))?;
        let topics: Vec<String> = element(doc, "TOPICS")
            .map(|t| {
                t.split("<D>")
                    .skip(1)
                    .filter_map(|d| d.split("</D>").next())
                    .map(|d| unescape(d.trim()))
                    .filter(|d| !d.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let body_text = element(doc, "TEXT").unwrap_or_default();
        let title = element(body_text, "TITLE")
            .map(|t| unescape(t.trim()))
            .unwrap_or_default();
        let body = match element(body_text, "BODY") {
            Some(b) => unescape(b.trim()),
            // UNPROC documents have neither title nor body, only text.
            None if title.is_empty() => unescape(strip_tags(body_text).trim()),
            None => String::new(),
        };
        docs.push(Doc {
            file: path.to_path_buf(),
            line,
            new_id,
            topics_attr: attr("TOPICS")?,
            lewis_split: attr("LEWISSPLIT")?,
            cgi_split: attr("CGISPLIT")?,
            topics,
            title,
            body,
        });
        line += doc.matches('\n').count();
        pos = end;
    }
    if docs.is_empty() {
        return Err(file_error(path, "no <REUTERS> documents in the file"));
    }
    Ok(docs)
}

/// Multi-hot targets over `names`; topics outside the label set are left out (the usual
/// subsets, e.g. the 10 or 90 most frequent categories, are label lists).
pub fn multi_hot(topics: &[String], names: &[String]) -> Vec<f32> {
    names
        .iter()
        .map(|n| if topics.contains(n) { 1.0 } else { 0.0 })
        .collect()
}

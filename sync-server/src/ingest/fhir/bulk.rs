//! Bulk onboarding: many patients from files, directories and NDJSON, on every core, resumable.
//!
//! Sources are FHIR Bundles (one patient per `.json` file) and NDJSON (`.ndjson`, `.jsonl`: one
//! resource per line, each patient's `Patient` line first and then its resources, as a FHIR Bulk
//! Data export grouped by patient; a line may also hold a whole Bundle). Directories are read
//! recursively, in name order.
//!
//! One thread reads the sources into patients (a Bundle, or a `Patient` line and the lines after
//! it). Workers, one per core, parse and map each patient and build its document (a new one, or
//! the changes to the stored one). The calling thread writes them in order, many patients per
//! transaction, and with each transaction how far each source has been read
//! ([`ImportProgress`]). Killed at any point, the import keeps what it committed, and a rerun
//! resumes each unchanged source where the last commit left it; a source read again from the
//! start (it changed) is imported idempotently anyway (entries keep ids derived from the
//! sender's identifiers, patients are found by NHS number).
//!
//! Each patient is imported whole or refused whole; a refusal names the source and the line
//! (NDJSON) or entry (Bundle) of the first problem, and the import goes on with the next patient.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use super::import::{ImportError, MAX_BUNDLE_BYTES, MAX_BUNDLE_ENTRIES, Prepared, parse_bundle_value};
use super::model as f;
use crate::store::{BatchWrite, ImportProgress, ServerStore, StoreError};

/// What stops an import (a refused patient does not: it is reported and the import goes on).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BulkError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0} is neither a FHIR file (.json, .ndjson, .jsonl) nor a directory")]
    NotFhir(PathBuf),
    #[error("no FHIR files (.json, .ndjson, .jsonl) in {0}")]
    Empty(PathBuf),
    /// The store failed: what was committed before stays, and a rerun resumes after it.
    #[error("the import stopped (what was committed before stays; run it again to resume): {0}")]
    Store(#[from] StoreError),
}

/// How an import runs.
#[derive(Debug, Clone)]
pub struct BulkOptions {
    /// The name recorded as the source of entries without care-sync provenance.
    pub feed: String,
    /// Threads that parse and build documents (default: one per core).
    pub workers: usize,
    /// Patients written per transaction.
    pub batch: usize,
}

impl Default for BulkOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        BulkOptions { feed: "FHIR import".into(), workers: cores, batch: 256 }
    }
}

/// What an import tells its caller as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// A patient refused whole: where, and why (opaque: entry numbers, resource types, fields).
    Refused { at: &'a str, reason: &'a str },
    /// A source read before, and unchanged since: resumed after what was committed then.
    Resumed { source: &'a Path, bytes: u64, refused_then: u64 },
    /// After each commit.
    Progress(&'a Progress),
}

/// How far an import is.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Bytes of the sources read and committed (or refused), this run and resumed.
    pub bytes_done: u64,
    /// Bytes of every source.
    pub bytes_total: u64,
    /// Bytes skipped because an earlier run committed them.
    pub bytes_resumed: u64,
    /// Patients written this run (new or changed records, or found unchanged).
    pub imported: u64,
    /// Of those, new records.
    pub created: u64,
    /// Patients refused this run.
    pub refused: u64,
    pub elapsed: Duration,
}

impl Progress {
    /// Patients per second this run.
    pub fn rate(&self) -> f64 {
        (self.imported + self.refused) as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }

    /// The time left, from this run's bytes per second.
    pub fn eta(&self) -> Option<Duration> {
        let done = self.bytes_done.saturating_sub(self.bytes_resumed);
        if done == 0 {
            return None;
        }
        let left = self.bytes_total.saturating_sub(self.bytes_done);
        Some(self.elapsed.mul_f64(left as f64 / done as f64))
    }
}

/// The FHIR files under `paths`: files as named, directories recursively (their `.json`,
/// `.ndjson` and `.jsonl` files, in name order).
pub fn sources(paths: &[PathBuf]) -> Result<Vec<PathBuf>, BulkError> {
    let mut found = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| BulkError::Read(path.clone(), e))?;
        if meta.is_dir() {
            let before = found.len();
            walk(path, &mut found)?;
            if found.len() == before {
                return Err(BulkError::Empty(path.clone()));
            }
        } else {
            found.push(path.clone());
        }
    }
    Ok(found)
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> Result<(), BulkError> {
    let mut entries = std::fs::read_dir(dir)
        .and_then(|d| d.map(|e| e.map(|e| e.path())).collect::<Result<Vec<_>, _>>())
        .map_err(|e| BulkError::Read(dir.to_path_buf(), e))?;
    entries.sort();
    for path in entries {
        let meta = std::fs::metadata(&path).map_err(|e| BulkError::Read(path.clone(), e))?;
        if meta.is_dir() {
            walk(&path, found)?;
        } else if kind_of(&path).is_some() {
            found.push(path);
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One Bundle.
    Bundle,
    /// One resource (or Bundle) per line.
    Lines,
}

fn kind_of(path: &Path) -> Option<Kind> {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("json") => Some(Kind::Bundle),
        Some("ndjson" | "jsonl") => Some(Kind::Lines),
        _ => None,
    }
}

/// One source, as the import sees it.
struct Source {
    path: PathBuf,
    kind: Kind,
    size: u64,
    /// Where to start (an earlier run's committed progress).
    start: ImportProgress,
}

/// Imports every patient in `paths` (files and directories), reporting as it goes.
pub fn import(
    store: &dyn ServerStore,
    paths: &[PathBuf],
    options: &BulkOptions,
    on: &mut dyn FnMut(Event<'_>),
) -> Result<Progress, BulkError> {
    let started = Instant::now();
    let mut sources = Vec::new();
    let mut progress = Progress::default();
    for path in self::sources(paths)? {
        let kind = kind_of(&path).ok_or_else(|| BulkError::NotFhir(path.clone()))?;
        let meta = std::fs::metadata(&path).map_err(|e| BulkError::Read(path.clone(), e))?;
        let key = std::fs::canonicalize(&path).map_err(|e| BulkError::Read(path.clone(), e))?;
        let key = key.to_string_lossy().into_owned();
        let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        let fingerprint = format!("{} bytes, modified {}", meta.len(), modified.map_or(0, |d| d.as_nanos()));
        let fresh = ImportProgress {
            source: key.clone(),
            fingerprint: fingerprint.clone(),
            offset: 0,
            line: 0,
            refused: 0,
        };
        let start = match store.import_progress(&key)? {
            Some(done) if done.fingerprint == fingerprint && done.offset <= meta.len() => {
                on(Event::Resumed { source: &path, bytes: done.offset, refused_then: done.refused });
                progress.bytes_resumed += done.offset;
                done
            }
            _ => fresh,
        };
        progress.bytes_total += meta.len();
        sources.push(Source { path, kind, size: meta.len(), start });
    }
    progress.bytes_done = progress.bytes_resumed;
    let workers = options.workers.max(1);
    let feed = options.feed.as_str();
    std::thread::scope(|scope| {
        let mut to_workers = Vec::new();
        let mut from_workers = Vec::new();
        for _ in 0..workers {
            let (send, receive) = sync_channel::<Unit>(32);
            let (sent, done) = sync_channel::<Finished>(32);
            to_workers.push(send);
            from_workers.push(done);
            scope.spawn(move || work(store, feed, receive, sent));
        }
        let sources = &sources;
        scope.spawn(move || read_all(sources, to_workers));
        write_all(store, sources, options, from_workers, &mut progress, started, on)
    })?;
    progress.elapsed = started.elapsed();
    Ok(progress)
}

/// One patient as read, or what stopped the reading.
enum Unit {
    Patient(Group),
    Failed(BulkError),
}

/// One patient's text and where it came from.
struct Group {
    source: usize,
    /// Where the source is read to once this patient is committed.
    offset: u64,
    line: u64,
    body: Body,
}

enum Body {
    /// A whole Bundle (a `.json` file, or one NDJSON line).
    Bundle { text: String, line: Option<u64> },
    /// NDJSON resource lines, the `Patient` first, each with its line number.
    Lines(Vec<(u64, String)>),
    /// Refused while reading (too large, a resource before any Patient, not UTF-8, ...).
    Refused { line: Option<u64>, reason: String },
}

/// One patient prepared (or refused), with where it came from.
struct Done {
    source: usize,
    offset: u64,
    line: u64,
    result: Result<(f::Bundle, Prepared), Refusal>,
}

enum Finished {
    Patient(Box<Done>),
    Failed(BulkError),
}

#[derive(Debug)]
struct Refusal {
    line: Option<u64>,
    reason: String,
}

/// Reads every source in turn, handing its patients to the workers in turn.
fn read_all(sources: &[Source], to_workers: Vec<SyncSender<Unit>>) {
    let mut next = 0;
    let mut send = |unit: Unit| {
        let sent = to_workers[next % to_workers.len()].send(unit).is_ok();
        next += 1;
        sent
    };
    for (index, source) in sources.iter().enumerate() {
        if source.start.offset >= source.size && source.size > 0 {
            continue;
        }
        let read = match source.kind {
            Kind::Bundle => read_bundle(index, source, &mut send),
            Kind::Lines => read_lines(index, source, &mut send),
        };
        match read {
            Ok(true) => {}
            Ok(false) => return, // the writer stopped
            Err(e) => {
                send(Unit::Failed(BulkError::Read(source.path.clone(), e)));
                return;
            }
        }
    }
}

fn read_bundle(index: usize, source: &Source, send: &mut dyn FnMut(Unit) -> bool) -> std::io::Result<bool> {
    let body = if source.size > MAX_BUNDLE_BYTES as u64 {
        // Refused before reading: a file over the limit never reaches memory.
        Body::Refused {
            line: None,
            reason: format!(
                "the Bundle is too large: {} bytes (the limit is {MAX_BUNDLE_BYTES})",
                source.size
            ),
        }
    } else {
        let bytes = std::fs::read(&source.path)?;
        match String::from_utf8(bytes) {
            Ok(text) => Body::Bundle { text, line: None },
            Err(_) => Body::Refused { line: None, reason: "the file is not UTF-8 text".into() },
        }
    };
    Ok(send(Unit::Patient(Group { source: index, offset: source.size, line: 0, body })))
}

/// The resource type of one line, read without building it.
#[derive(serde::Deserialize)]
struct Peek<'a> {
    #[serde(rename = "resourceType", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
}

/// Reads an NDJSON source from where the last commit left it, one patient at a time.
fn read_lines(index: usize, source: &Source, send: &mut dyn FnMut(Unit) -> bool) -> std::io::Result<bool> {
    let mut file = std::fs::File::open(&source.path)?;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(source.start.offset))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let (mut offset, mut line) = (source.start.offset, source.start.line);
    // The patient being gathered: its lines and bytes, or why it is refused.
    let mut lines: Vec<(u64, String)> = Vec::new();
    let mut bytes = 0usize;
    let mut refused: Option<(u64, String)> = None;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let (read, too_long) = read_line_limited(&mut reader, &mut buf, MAX_BUNDLE_BYTES)?;
        if read == 0 {
            break;
        }
        let this_line = line + 1;
        let line_start = offset;
        offset += read as u64;
        line = this_line;
        let text = trim_line(&buf);
        if text.is_empty() && !too_long {
            continue;
        }
        let kind = if too_long {
            Err(format!("the line is longer than {MAX_BUNDLE_BYTES} bytes"))
        } else {
            match std::str::from_utf8(text) {
                Err(_) => Err("the line is not UTF-8 text".to_string()),
                Ok(text) => match serde_json::from_str::<Peek<'_>>(text) {
                    Ok(peek) => Ok(peek.kind.map(|k| k.into_owned()).unwrap_or_default()),
                    Err(e) => Err(format!("not JSON: {:?} error at column {}", e.classify(), e.column())),
                },
            }
        };
        match kind.as_deref() {
            Ok("Patient") | Ok("Bundle") => {
                // The patient gathered so far ends before this line.
                bytes = 0;
                if let Some(unit) = gathered(index, &mut lines, &mut refused, line_start, this_line - 1)
                    && !send(unit)
                {
                    return Ok(false);
                }
                let text = String::from_utf8(text.to_vec()).expect("checked above");
                if kind.as_deref() == Ok("Bundle") {
                    let body = Body::Bundle { text, line: Some(this_line) };
                    if !send(Unit::Patient(Group { source: index, offset, line, body })) {
                        return Ok(false);
                    }
                } else {
                    bytes = text.len();
                    lines.push((this_line, text));
                }
            }
            Ok(_) if lines.is_empty() && refused.is_none() => {
                // A resource before any Patient: refused on its own, with advice.
                let reason = "a resource before any Patient line: NDJSON must list each patient's Patient \
                              first, then that patient's resources (a Bulk Data export grouped by patient)";
                let body = Body::Refused { line: Some(this_line), reason: reason.into() };
                if !send(Unit::Patient(Group { source: index, offset, line, body })) {
                    return Ok(false);
                }
            }
            Ok(_) => {
                if refused.is_some() {
                    continue;
                }
                bytes += text.len();
                if bytes > MAX_BUNDLE_BYTES || lines.len() >= MAX_BUNDLE_ENTRIES {
                    refused = Some((
                        this_line,
                        format!(
                            "the patient's resources pass the limit ({MAX_BUNDLE_ENTRIES} resources, \
                             {MAX_BUNDLE_BYTES} bytes)"
                        ),
                    ));
                    lines.clear();
                } else {
                    lines.push((this_line, String::from_utf8(text.to_vec()).expect("checked above")));
                }
            }
            Err(reason) => {
                // A broken line refuses the patient it belongs to (the one being gathered).
                if refused.is_none() {
                    refused = Some((this_line, reason.clone()));
                    lines.clear();
                }
            }
        }
    }
    Ok(gathered(index, &mut lines, &mut refused, offset, line).is_none_or(send))
}

/// The patient gathered so far, to hand on; `offset` and `line` are where the source is read to
/// after it.
fn gathered(
    source: usize,
    lines: &mut Vec<(u64, String)>,
    refused: &mut Option<(u64, String)>,
    offset: u64,
    line: u64,
) -> Option<Unit> {
    let body = match refused.take() {
        Some((at, reason)) => {
            lines.clear();
            Body::Refused { line: Some(at), reason }
        }
        None if lines.is_empty() => return None,
        None => Body::Lines(std::mem::take(lines)),
    };
    Some(Unit::Patient(Group { source, offset, line, body }))
}

/// A line without its line ending and surrounding white space.
fn trim_line(line: &[u8]) -> &[u8] {
    let start = line.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(line.len());
    let end = line.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &line[start..end.max(start)]
}

/// Reads one line (with its `\n`) into `buf`, keeping at most `limit` bytes of it; returns the
/// bytes consumed and whether the line was longer than the limit (the rest is skipped, never
/// held in memory).
fn read_line_limited(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<(usize, bool)> {
    let (mut consumed, mut too_long) = (0, false);
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok((consumed, too_long));
        }
        let (taken, ends) = match available.iter().position(|b| *b == b'\n') {
            Some(at) => (at + 1, true),
            None => (available.len(), false),
        };
        if !too_long {
            if buf.len() + taken > limit {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&available[..taken]);
            }
        }
        reader.consume(taken);
        consumed += taken;
        if ends {
            return Ok((consumed, too_long));
        }
    }
}

/// A worker: parses and prepares each patient it is handed, in order.
fn work(store: &dyn ServerStore, feed: &str, units: Receiver<Unit>, done: SyncSender<Finished>) {
    for unit in units {
        let finished = match unit {
            Unit::Failed(e) => Finished::Failed(e),
            Unit::Patient(group) => {
                let result = prepare(store, feed, group.body);
                Finished::Patient(Box::new(Done {
                    source: group.source,
                    offset: group.offset,
                    line: group.line,
                    result,
                }))
            }
        };
        if done.send(finished).is_err() {
            return;
        }
    }
}

/// Parses and prepares one patient; a refusal names the line (NDJSON) or entry (Bundle).
fn prepare(store: &dyn ServerStore, feed: &str, body: Body) -> Result<(f::Bundle, Prepared), Refusal> {
    let (bundle, lines) = match body {
        Body::Refused { line, reason } => return Err(Refusal { line, reason }),
        Body::Bundle { text, line } => {
            let parsed = serde_json::from_str(&text)
                .map_err(super::import::not_json)
                .and_then(parse_bundle_value)
                .map_err(|e| Refusal { line, reason: e.to_string() })?;
            (parsed, None)
        }
        Body::Lines(lines) => {
            let mut entries = Vec::with_capacity(lines.len());
            for (line, text) in &lines {
                let resource: serde_json::Value = serde_json::from_str(text).map_err(|e| Refusal {
                    line: Some(*line),
                    reason: format!("not JSON: {:?} error at column {}", e.classify(), e.column()),
                })?;
                // Built by hand: `json!` would copy each value by serializing it.
                entries.push(serde_json::Value::Object(serde_json::Map::from_iter([(
                    "resource".to_string(),
                    resource,
                )])));
            }
            let numbers: Vec<u64> = lines.iter().map(|(n, _)| *n).collect();
            check_subjects(&entries, &numbers)?;
            let first = numbers.first().copied();
            let bundle = parse_bundle_value(serde_json::Value::Object(serde_json::Map::from_iter([
                ("resourceType".to_string(), "Bundle".into()),
                ("type".to_string(), "collection".into()),
                ("entry".to_string(), serde_json::Value::Array(entries)),
            ])))
            .map_err(|e| refusal_at(e, &numbers, first))?;
            (bundle, Some(numbers))
        }
    };
    let now_ms = care_node::now_ms();
    match super::import::prepare_bundle(store, &bundle, feed, now_ms) {
        Ok(prepared) => Ok((bundle, prepared)),
        Err(e) => {
            let first = lines.as_ref().and_then(|l| l.first().copied());
            Err(refusal_at(e, lines.as_deref().unwrap_or(&[]), first))
        }
    }
}

/// A refusal of an NDJSON patient names the line of the entry at fault, not its entry number.
fn refusal_at(e: ImportError, lines: &[u64], first: Option<u64>) -> Refusal {
    match e {
        ImportError::Invalid { index, resource, reason } if !lines.is_empty() => {
            Refusal { line: lines.get(index).copied().or(first), reason: format!("{resource}: {reason}") }
        }
        e => Refusal { line: first, reason: e.to_string() },
    }
}

/// Every resource of an NDJSON patient that names its patient (`subject` or `patient`) names
/// the Patient it follows: a file not grouped by patient is refused, never filed under the
/// wrong person.
fn check_subjects(entries: &[serde_json::Value], lines: &[u64]) -> Result<(), Refusal> {
    let resource = |e: &serde_json::Value| e.get("resource").cloned().unwrap_or_default();
    let Some(patient_id) =
        entries.first().map(resource).and_then(|p| p.get("id")?.as_str().map(str::to_string))
    else {
        return Ok(());
    };
    let expected = format!("Patient/{patient_id}");
    for (index, entry) in entries.iter().enumerate().skip(1) {
        let Some(entry) = entry.get("resource") else { continue };
        let reference =
            ["subject", "patient"].iter().find_map(|field| entry.get(field)?.get("reference")?.as_str());
        let Some(reference) = reference else { continue };
        let same = reference == expected
            || reference.strip_suffix(expected.as_str()).is_some_and(|base| base.ends_with('/'));
        if !same {
            let kind = entry.get("resourceType").and_then(|v| v.as_str()).unwrap_or("?");
            return Err(Refusal {
                line: lines.get(index).copied(),
                reason: format!(
                    "{}: its subject is not the Patient on line {} before it: NDJSON must list each \
                     patient's resources after that patient's Patient line",
                    kind.chars().take(40).collect::<String>(),
                    lines.first().copied().unwrap_or(0)
                ),
            });
        }
    }
    Ok(())
}

/// Writes the prepared patients in order, many per transaction, with each source's progress.
fn write_all(
    store: &dyn ServerStore,
    sources: &[Source],
    options: &BulkOptions,
    from_workers: Vec<Receiver<Finished>>,
    progress: &mut Progress,
    started: Instant,
    on: &mut dyn FnMut(Event<'_>),
) -> Result<(), BulkError> {
    let mut read: Vec<ImportProgress> = sources.iter().map(|s| s.start.clone()).collect();
    let mut committed_offsets: Vec<u64> = sources.iter().map(|s| s.start.offset).collect();
    // Patients written this run, by what names them: a later Bundle of the same person was
    // prepared before the earlier one was written, so it is prepared again.
    let mut seen: HashSet<String> = HashSet::new();
    let mut batch = Batch::default();
    let mut next = 0usize;
    loop {
        let finished = match from_workers[next % from_workers.len()].recv() {
            Ok(f) => f,
            Err(_) => break, // every worker is done: the sources are read
        };
        next += 1;
        let done = match finished {
            Finished::Failed(e) => {
                batch.commit(store, &mut read, &mut committed_offsets, progress, sources, started, on)?;
                return Err(e);
            }
            Finished::Patient(done) => *done,
        };
        let source = &sources[done.source];
        read[done.source].offset = done.offset;
        read[done.source].line = done.line;
        match done.result {
            Err(refusal) => {
                read[done.source].refused += 1;
                progress.refused += 1;
                let at = match refusal.line {
                    Some(line) => format!("{}:{line}", source.path.display()),
                    None => source.path.display().to_string(),
                };
                on(Event::Refused { at: &at, reason: &refusal.reason });
            }
            Ok((bundle, prepared)) => {
                if prepared.keys.iter().any(|k| seen.contains(k)) {
                    // Another Bundle of this person is in this import: write what came before,
                    // then prepare this one on top of it.
                    batch.commit(store, &mut read, &mut committed_offsets, progress, sources, started, on)?;
                    let prepared =
                        super::import::prepare_bundle(store, &bundle, &options.feed, care_node::now_ms());
                    match prepared {
                        Ok(prepared) => batch.add(prepared, &mut seen, done.source),
                        Err(e) => {
                            read[done.source].refused += 1;
                            progress.refused += 1;
                            let at = source.path.display().to_string();
                            on(Event::Refused { at: &at, reason: &e.to_string() });
                        }
                    }
                } else {
                    batch.add(prepared, &mut seen, done.source);
                }
            }
        }
        batch.touched.insert(done.source);
        if batch.patients.len() >= options.batch.max(1) || batch.touched.len() >= 64 {
            batch.commit(store, &mut read, &mut committed_offsets, progress, sources, started, on)?;
        }
    }
    batch.commit(store, &mut read, &mut committed_offsets, progress, sources, started, on)
}

/// The patients of one transaction.
#[derive(Default)]
struct Batch {
    patients: Vec<(Prepared, usize)>,
    /// Sources read into since the last commit.
    touched: std::collections::BTreeSet<usize>,
}

impl Batch {
    fn add(&mut self, prepared: Prepared, seen: &mut HashSet<String>, source: usize) {
        seen.extend(prepared.keys.iter().cloned());
        self.patients.push((prepared, source));
    }

    /// Commits the batch with the progress of every source it read from; a batch that fails
    /// (a patient created meanwhile by another writer, say) is written one patient at a time,
    /// so that only the patient at fault is refused.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &mut self,
        store: &dyn ServerStore,
        read: &mut [ImportProgress],
        committed: &mut [u64],
        progress: &mut Progress,
        sources: &[Source],
        started: Instant,
        on: &mut dyn FnMut(Event<'_>),
    ) -> Result<(), BulkError> {
        if self.touched.is_empty() {
            return Ok(());
        }
        let patients = std::mem::take(&mut self.patients);
        let touched = std::mem::take(&mut self.touched);
        let outcomes: Vec<_> = patients.iter().map(|(p, _)| p.outcome.clone()).collect();
        let mut writes: Vec<BatchWrite> = Vec::new();
        let mut singles = Vec::new();
        for (prepared, source) in patients {
            let w = prepared.into_writes();
            singles.push((w.len(), source));
            writes.extend(w);
        }
        writes.extend(touched.iter().map(|&s| BatchWrite::Progress(read[s].clone())));
        if let Err(e) = store.write_batch(&mut writes) {
            if matches!(e, StoreError::StorageFull | StoreError::Backend(_) | StoreError::Io(_)) {
                return Err(e.into());
            }
            // One at a time: each patient with its own writes.
            let mut rest = writes.into_iter();
            for (i, (n, source)) in singles.into_iter().enumerate() {
                let mut one: Vec<BatchWrite> = rest.by_ref().take(n).collect();
                match store.write_batch(&mut one) {
                    Ok(()) => count(progress, &outcomes[i]),
                    Err(e) => {
                        read[source].refused += 1;
                        progress.refused += 1;
                        let at = sources[source].path.display().to_string();
                        on(Event::Refused { at: &at, reason: &e.to_string() });
                    }
                }
            }
            let mut marks: Vec<BatchWrite> =
                touched.iter().map(|&s| BatchWrite::Progress(read[s].clone())).collect();
            store.write_batch(&mut marks)?;
        } else {
            outcomes.iter().for_each(|o| count(progress, o));
        }
        for s in touched {
            progress.bytes_done += read[s].offset.saturating_sub(committed[s]);
            committed[s] = read[s].offset;
        }
        progress.elapsed = started.elapsed();
        on(Event::Progress(progress));
        Ok(())
    }
}

fn count(progress: &mut Progress, outcome: &super::import::ImportOutcome) {
    progress.imported += 1;
    progress.created += u64::from(outcome.created);
}

/// A Bundle as NDJSON lines, as a Bulk Data export grouped by patient writes them: the Patient
/// first, then every other resource but the Composition (a document's own index), one per line;
/// references to entries by `fullUrl` become `Type/id`, as there are no fullUrls in NDJSON.
pub fn ndjson_of(bundle: &serde_json::Value) -> Vec<String> {
    use serde_json::Value;
    let entries = bundle.get("entry").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    let by_url: std::collections::HashMap<&str, String> = entries
        .iter()
        .filter_map(|e| {
            let resource = e.get("resource")?;
            let kind = resource.get("resourceType")?.as_str()?;
            let id = resource.get("id")?.as_str()?;
            Some((e.get("fullUrl")?.as_str()?, format!("{kind}/{id}")))
        })
        .collect();
    fn rewrite(value: &mut Value, by_url: &std::collections::HashMap<&str, String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    match v {
                        Value::String(s) if key == "reference" => {
                            if let Some(to) = by_url.get(s.as_str()) {
                                *s = to.clone();
                            }
                        }
                        other => rewrite(other, by_url),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| rewrite(v, by_url)),
            _ => {}
        }
    }
    let kind = |e: &Value| {
        e.get("resource").and_then(|r| r.get("resourceType")).and_then(Value::as_str).map(str::to_string)
    };
    let (patients, rest): (Vec<&Value>, Vec<&Value>) = entries
        .iter()
        .filter(|e| kind(e).as_deref() != Some("Composition"))
        .partition(|e| kind(e).as_deref() == Some("Patient"));
    patients
        .into_iter()
        .chain(rest)
        .filter_map(|e| {
            let mut resource = e.get("resource")?.clone();
            rewrite(&mut resource, &by_url);
            Some(resource.to_string())
        })
        .collect()
}

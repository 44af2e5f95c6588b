//! [`Filter`]: what a content set syncs (include/exclude [`Pattern`]s) and which kinds
//! of change it may make on a replica ([`CommandMask`]).
//!
//! # Which paths are synced
//!
//! A path is synced when it is not excluded and it is included:
//!
//! - **excluded**: some exclude pattern matches the path or one of its ancestor
//!   directories (an excluded directory excludes everything beneath it);
//! - **included**: the include list is empty (everything), or some include pattern
//!   matches the path or one of its ancestor directories (an included directory
//!   includes everything beneath it), or — for a directory — some include pattern may
//!   match something beneath it (the directory is needed as a parent). For a name
//!   pattern like `*.jpg` or a regex without a literal `^prefix`, that is every
//!   directory: the replica gets the directory skeleton, as rsync does with
//!   `--include='*/'`. Incremental sync and full reconciles use the same rule, so they
//!   agree on which directories exist.
//!
//! # Patterns
//!
//! Globs ([`Pattern::glob`]), matched bytewise against the relative path:
//! `*` matches any run of bytes without `/`; `**` as a whole component matches any
//! number of components (`**/x`, `a/**/x`; a trailing `a/**` matches everything beneath
//! `a`), elsewhere it matches any bytes including `/`; `?` matches one byte other than
//! `/` (a multi-byte UTF-8 character needs `*` or one `?` per byte, as in rsync);
//! `[abc]`, `[a-z]`, `[!a]` / `[^a]` match one byte from (not from) the set, never `/`
//! (class members must be ASCII); `\x` matches `x` literally. A pattern without `/` (a
//! trailing one aside) matches the file name at any depth, like rsync and gitignore; a
//! pattern with a `/` in it, or starting with `/`, is matched against the whole
//! relative path from the root. A trailing `/` matches directories only.
//!
//! Regexes ([`Pattern::regex`], the `regex` crate's bytes flavour) are searched in the
//! whole relative path; a directory is presented with a trailing `/`, so `^cache/`
//! matches the directory `cache` itself and, through it, everything beneath.
//!
//! # Commands
//!
//! [`CommandMask`] follows CD-Master's CREATE / UPDATE / DELETE / MOVE / ERASE:
//! creating paths the replica lacks, updating paths it has, deleting files (and
//! symlinks), moving/renaming, erasing directories. A disallowed command is not
//! performed on the replica; a disallowed move is performed as its parts (create the
//! new path, delete the old), each subject to the mask.
//!
//! # Where the daemon applies it
//!
//! - Before the coalescer, [`Filter::filter_event`] drops events for paths that are not
//!   synced and rewrites renames across the boundary (in→out: a removal; out→in: a
//!   creation, and for a directory a `Lost` of it, as its contents were never seen).
//! - After the coalescer, once a change has been stat'ed, [`Filter::allows`] applies the
//!   same path rule and the command mask, given [`ChangeFacts`].
//! - For a full reconcile the sender ships [`Filter::apply_to_manifest`] of its tree;
//!   the replica plans against [`Filter::reconcile_target`]`(received, local)`, which
//!   applies the command mask (e.g. delete off keeps the replica's extras) and keeps the
//!   replica's own excluded entries untouched. Both ends of a content set hold its
//!   filter. Moves do not exist in a full reconcile (the planner's reuse of local
//!   content is not a command).

use std::collections::BTreeMap;

use regex::bytes::Regex;

use crate::coalesce::PathChange;
use crate::event::{EventKind, FsEvent};
use crate::manifest::{Entry, EntryKind, Hash, Manifest};
use crate::path::RelPath;

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FilterError {
    #[error("invalid glob {pattern:?}: {reason}")]
    Glob {
        pattern: String,
        reason: &'static str,
    },
    #[error("invalid regex {pattern:?}")]
    Regex {
        pattern: String,
        #[source]
        source: regex::Error,
    },
}

/// One include or exclude pattern. See the module docs for the syntax.
#[derive(Debug, Clone)]
pub enum Pattern {
    Glob(Glob),
    Regex(RegexPattern),
}

/// A compiled glob.
#[derive(Debug, Clone)]
pub struct Glob {
    source: String,
    regex: Regex,
    dir_only: bool,
    /// Components of an anchored pattern; `None` for a name pattern.
    segments: Option<Vec<Segment>>,
}

#[derive(Debug, Clone)]
enum Segment {
    /// `**`: any number of components.
    AnyDirs,
    /// A component without `**`.
    Name(Regex),
    /// A component with `**` inside: may span components.
    Wide,
}

/// A compiled regex pattern.
#[derive(Debug, Clone)]
pub struct RegexPattern {
    regex: Regex,
    /// A literal every match starts with (after `^`), when there is one.
    prefix: Option<Vec<u8>>,
}

impl Pattern {
    /// Compiles a glob (see the module docs).
    pub fn glob(pattern: &str) -> Result<Pattern, FilterError> {
        Glob::new(pattern).map(Pattern::Glob)
    }

    /// Compiles a regex matched against the whole relative path.
    pub fn regex(pattern: &str) -> Result<Pattern, FilterError> {
        let regex = Regex::new(pattern).map_err(|source| FilterError::Regex {
            pattern: pattern.to_owned(),
            source,
        })?;
        Ok(Pattern::Regex(RegexPattern {
            regex,
            prefix: literal_prefix(pattern),
        }))
    }

    /// The pattern as written (without any config prefix).
    pub fn as_str(&self) -> &str {
        match self {
            Pattern::Glob(g) => g.as_str(),
            Pattern::Regex(r) => r.regex.as_str(),
        }
    }

    /// Whether this pattern matches `path` itself (ancestors are not considered).
    pub fn is_match(&self, path: &RelPath, is_dir: bool) -> bool {
        match self {
            Pattern::Glob(g) => g.is_match(path, is_dir),
            Pattern::Regex(r) => {
                if is_dir {
                    let mut v = path.as_bytes().to_vec();
                    v.push(b'/');
                    r.regex.is_match(&v)
                } else {
                    r.regex.is_match(path.as_bytes())
                }
            }
        }
    }

    /// Whether some path strictly beneath the directory `dir` may match (an
    /// over-approximation: `true` when in doubt).
    pub fn may_match_beneath(&self, dir: &RelPath) -> bool {
        match self {
            Pattern::Glob(g) => g.may_match_beneath(dir),
            Pattern::Regex(r) => match &r.prefix {
                None => true,
                Some(pre) => {
                    let mut d = dir.as_bytes().to_vec();
                    d.push(b'/');
                    d.starts_with(pre) || pre.starts_with(&d)
                }
            },
        }
    }

    /// A glob without `/` (a trailing one aside): decided by one component's name.
    fn is_name_only(&self) -> bool {
        matches!(self, Pattern::Glob(Glob { segments: None, .. }))
    }
}

/// Two patterns are equal when they are of the same kind and written the same way.
impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Pattern::Glob(a), Pattern::Glob(b)) => a.as_str() == b.as_str(),
            (Pattern::Regex(a), Pattern::Regex(b)) => a.regex.as_str() == b.regex.as_str(),
            _ => false,
        }
    }
}

impl Eq for Pattern {}

impl Glob {
    fn new(pattern: &str) -> Result<Glob, FilterError> {
        let err = |reason| FilterError::Glob {
            pattern: pattern.to_owned(),
            reason,
        };
        let mut body = pattern;
        let leading = body.starts_with('/');
        if leading {
            body = &body[1..];
        }
        let dir_only = body.ends_with('/');
        if dir_only {
            body = &body[..body.len() - 1];
        }
        if body.is_empty() {
            return Err(err("empty pattern"));
        }
        let toks = tokenize(body).map_err(err)?;
        let mut segs: Vec<Vec<Tok>> = vec![Vec::new()];
        for t in toks {
            match t {
                Tok::Sep => segs.push(Vec::new()),
                t => segs.last_mut().unwrap_or_else(|| unreachable!()).push(t),
            }
        }
        if segs.iter().any(Vec::is_empty) {
            return Err(err("empty path component (`//`, or `/` at an end)"));
        }
        let anchored = leading || segs.len() > 1;
        let mut re = String::from("(?s-u)^");
        if !anchored {
            re.push_str("(?:.*/)?");
        }
        let n = segs.len();
        for (i, seg) in segs.iter().enumerate() {
            let last = i + 1 == n;
            if matches!(seg.as_slice(), [Tok::DStar]) {
                if last {
                    re.push_str(".+");
                } else {
                    re.push_str("(?:.*/)?");
                    continue;
                }
            } else {
                for t in seg {
                    push_tok(&mut re, t);
                }
            }
            if !last {
                re.push('/');
            }
        }
        re.push('$');
        let regex = Regex::new(&re).map_err(|_| err("cannot be compiled"))?;
        let segments = if anchored {
            let mut v = Vec::with_capacity(n);
            for seg in &segs {
                v.push(if matches!(seg.as_slice(), [Tok::DStar]) {
                    Segment::AnyDirs
                } else if seg.iter().any(|t| matches!(t, Tok::DStar)) {
                    Segment::Wide
                } else {
                    let mut r = String::from("(?s-u)^");
                    for t in seg {
                        push_tok(&mut r, t);
                    }
                    r.push('$');
                    Segment::Name(Regex::new(&r).map_err(|_| err("cannot be compiled"))?)
                });
            }
            Some(v)
        } else {
            None
        };
        Ok(Glob {
            source: pattern.to_owned(),
            regex,
            dir_only,
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_match(&self, path: &RelPath, is_dir: bool) -> bool {
        (is_dir || !self.dir_only) && self.regex.is_match(path.as_bytes())
    }

    fn may_match_beneath(&self, dir: &RelPath) -> bool {
        let Some(segs) = &self.segments else {
            return true;
        };
        let comps: Vec<&[u8]> = dir.components().collect();
        // ok[i][j]: with `i` components of `dir` consumed by `j` segments, something
        // beneath `dir` can still match the remaining segments.
        let (nc, ns) = (comps.len(), segs.len());
        let mut ok = vec![vec![false; ns + 1]; nc + 1];
        for i in (0..=nc).rev() {
            for j in (0..ns).rev() {
                ok[i][j] = if i == nc {
                    true
                } else {
                    match &segs[j] {
                        Segment::AnyDirs => ok[i][j + 1] || ok[i + 1][j],
                        Segment::Wide => true,
                        Segment::Name(r) => r.is_match(comps[i]) && ok[i + 1][j + 1],
                    }
                };
            }
        }
        ok[0][0]
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(u8),
    Any,
    Star,
    DStar,
    Class {
        negated: bool,
        ranges: Vec<(u8, u8)>,
    },
    Sep,
}

fn tokenize(p: &str) -> Result<Vec<Tok>, &'static str> {
    let b = p.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => {
                // The next character, all of its bytes, literally.
                let rest = p.get(i + 1..).ok_or("bad escape")?;
                let c = rest.chars().next().ok_or("trailing `\\`")?;
                if c == '/' {
                    out.push(Tok::Sep);
                } else {
                    out.extend(rest.as_bytes()[..c.len_utf8()].iter().map(|&x| Tok::Lit(x)));
                }
                i += 1 + c.len_utf8();
            }
            b'*' => {
                let n = b[i..].iter().take_while(|&&c| c == b'*').count();
                out.push(if n == 1 { Tok::Star } else { Tok::DStar });
                i += n;
            }
            b'?' => {
                out.push(Tok::Any);
                i += 1;
            }
            b'/' => {
                out.push(Tok::Sep);
                i += 1;
            }
            b'[' => {
                let (tok, len) = parse_class(&b[i..])?;
                out.push(tok);
                i += len;
            }
            c => {
                out.push(Tok::Lit(c));
                i += 1;
            }
        }
    }
    Ok(out)
}

/// Parses `[...]` at the start of `b`; returns the token and the bytes consumed.
fn parse_class(b: &[u8]) -> Result<(Tok, usize), &'static str> {
    // One member byte, `\` escaping the next.
    let read = |i: &mut usize| -> Result<u8, &'static str> {
        let mut c = *b.get(*i).ok_or("unclosed `[`")?;
        if c == b'\\' {
            *i += 1;
            c = *b.get(*i).ok_or("unclosed `[`")?;
        }
        *i += 1;
        Ok(c)
    };
    let mut i = 1;
    let negated = matches!(b.get(i), Some(b'!' | b'^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        if b.get(i) == Some(&b']') && !first {
            i += 1;
            break;
        }
        first = false;
        let lo = read(&mut i)?;
        let mut hi = lo;
        if b.get(i) == Some(&b'-') && b.get(i + 1).is_some_and(|&x| x != b']') {
            i += 1;
            hi = read(&mut i)?;
        }
        if !lo.is_ascii() || !hi.is_ascii() {
            return Err("non-ASCII character in `[...]`");
        }
        if lo == b'/' && hi == b'/' {
            return Err("`/` in `[...]` (a class never matches `/`)");
        }
        if lo > hi {
            return Err("reversed range in `[...]`");
        }
        ranges.push((lo, hi));
    }
    // `/` is never matched by a class: cut it out of ranges that span it.
    let mut cut = Vec::new();
    for (lo, hi) in ranges {
        if lo <= b'/' && b'/' <= hi {
            if lo < b'/' {
                cut.push((lo, b'/' - 1));
            }
            if hi > b'/' {
                cut.push((b'/' + 1, hi));
            }
        } else {
            cut.push((lo, hi));
        }
    }
    Ok((
        Tok::Class {
            negated,
            ranges: cut,
        },
        i,
    ))
}

fn push_tok(re: &mut String, t: &Tok) {
    use std::fmt::Write;
    match t {
        Tok::Lit(b) => {
            let _ = write!(re, "\\x{b:02X}");
        }
        Tok::Any => re.push_str("[^/]"),
        Tok::Star => re.push_str("[^/]*"),
        Tok::DStar => re.push_str(".*"),
        Tok::Class { negated, ranges } => {
            re.push('[');
            if *negated {
                re.push_str("^/");
            }
            for (lo, hi) in ranges {
                let _ = write!(re, "\\x{lo:02X}-\\x{hi:02X}");
            }
            re.push(']');
        }
        Tok::Sep => re.push('/'),
    }
}

/// The literal that every match of `src` starts with, if `src` is anchored with `^`
/// and has no alternation; conservative (may be shorter than the real one).
fn literal_prefix(src: &str) -> Option<Vec<u8>> {
    if src.contains('|') {
        return None;
    }
    let b = src.strip_prefix('^')?.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let (lit, len) = match b[i] {
            b'\\' => match b.get(i + 1) {
                Some(&n) if n.is_ascii_punctuation() => (n, 2),
                _ => break,
            },
            c if c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'/' | b'_' | b'-' | b',' | b'=' | b'@' | b'%' | b'~' | b':'
                ) =>
            {
                (c, 1)
            }
            _ => break,
        };
        match b.get(i + len) {
            Some(b'*' | b'?' | b'{') => break,
            Some(b'+') => {
                out.push(lit);
                break;
            }
            _ => {}
        }
        out.push(lit);
        i += len;
    }
    Some(out)
}

/// Which commands a content set may perform on its replicas (CD-Master's CREATE,
/// UPDATE, DELETE, MOVE, ERASE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CommandMask {
    /// Create paths the replica does not have.
    pub create: bool,
    /// Update paths the replica has (content, attributes, type).
    pub update: bool,
    /// Delete files and symlinks.
    pub delete: bool,
    /// Move/rename on the replica.
    pub r#move: bool,
    /// Erase directories (and what is beneath them).
    pub erase: bool,
}

impl CommandMask {
    /// Everything allowed.
    pub const ALL: CommandMask = CommandMask {
        create: true,
        update: true,
        delete: true,
        r#move: true,
        erase: true,
    };
}

impl Default for CommandMask {
    fn default() -> Self {
        Self::ALL
    }
}

/// What [`Filter::allows`] needs to know about a change beyond its paths; the daemon
/// learns it from its stat of the source and its index of what the replica holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChangeFacts {
    /// The entry is (or, if it is gone, was) a directory.
    pub is_dir: bool,
    /// `Upsert`: the source has the path now (a stat found it).
    pub exists: bool,
    /// The replica had the path before this change (for a `Rename`: had `to`).
    pub existed: bool,
}

/// A content set's include/exclude patterns and command mask. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
    commands: CommandMask,
}

impl Default for Filter {
    fn default() -> Self {
        Self::new(Vec::new(), Vec::new(), CommandMask::ALL)
    }
}

impl Filter {
    pub fn new(include: Vec<Pattern>, exclude: Vec<Pattern>, commands: CommandMask) -> Self {
        Self {
            include,
            exclude,
            commands,
        }
    }

    pub fn commands(&self) -> CommandMask {
        self.commands
    }

    /// The include patterns, in the order given.
    pub fn include(&self) -> &[Pattern] {
        &self.include
    }

    /// The exclude patterns, in the order given.
    pub fn exclude(&self) -> &[Pattern] {
        &self.exclude
    }

    /// True when the filter changes nothing: every path synced, every command allowed.
    pub fn is_noop(&self) -> bool {
        self.is_everything() && self.commands == CommandMask::ALL
    }

    /// True when every path is synced (no patterns).
    pub fn is_everything(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    /// Whether `path` is synced (see the module docs).
    pub fn matches(&self, path: &RelPath, is_dir: bool) -> bool {
        if self.is_everything() {
            return true;
        }
        let ancestors = path.ancestors();
        let hit = |pats: &[Pattern]| {
            pats.iter()
                .any(|p| p.is_match(path, is_dir) || ancestors.iter().any(|a| p.is_match(a, true)))
        };
        if hit(&self.exclude) {
            return false;
        }
        self.include.is_empty()
            || hit(&self.include)
            || (is_dir && self.include.iter().any(|p| p.may_match_beneath(path)))
    }

    /// An include pattern matches `path` (a directory) or an ancestor.
    fn included_whole(&self, dir: &RelPath) -> bool {
        self.include.is_empty()
            || self.include.iter().any(|p| {
                p.is_match(dir, true) || dir.ancestors().iter().any(|a| p.is_match(a, true))
            })
    }

    /// For two synced directories: whether every relative path beneath them is synced
    /// under one exactly when it is under the other (so a rename between them needs no
    /// rescan of the result).
    pub fn subtree_invariant(&self, from: &RelPath, to: &RelPath) -> bool {
        let wide =
            self.include.iter().chain(&self.exclude).any(|p| {
                !p.is_name_only() && (p.may_match_beneath(from) || p.may_match_beneath(to))
            });
        !wide && self.included_whole(from) == self.included_whole(to)
    }

    /// Include/exclude applied to a raw event before the coalescer. Renames across the
    /// boundary become a removal or a creation; a directory renamed in (or within, when
    /// the patterns could tell its old and new contents apart) is followed by a `Lost`
    /// of it so that its contents are rescanned.
    pub fn filter_event(&self, ev: FsEvent) -> Vec<FsEvent> {
        if self.is_everything() {
            return vec![ev];
        }
        let with = |kind, path: &RelPath, is_dir| FsEvent {
            kind,
            path: Some(path.clone()),
            path2: None,
            is_dir,
            pid: ev.pid,
        };
        match (ev.kind, &ev.path, &ev.path2) {
            (EventKind::Lost, None, _) => vec![ev],
            (EventKind::Lost, Some(p), _) => {
                if self.matches(p, true) || self.matches(p, false) {
                    vec![ev]
                } else {
                    Vec::new()
                }
            }
            (EventKind::Rename, Some(a), Some(b)) => {
                let d = ev.is_dir;
                match (self.matches(a, d), self.matches(b, d)) {
                    (true, true) => {
                        let rescan = d && !self.subtree_invariant(a, b);
                        let lost = with(EventKind::Lost, b, true);
                        if rescan { vec![ev, lost] } else { vec![ev] }
                    }
                    (true, false) => {
                        vec![with(
                            if d {
                                EventKind::Rmdir
                            } else {
                                EventKind::Unlink
                            },
                            a,
                            d,
                        )]
                    }
                    (false, true) if d => {
                        vec![
                            with(EventKind::Mkdir, b, true),
                            with(EventKind::Lost, b, true),
                        ]
                    }
                    (false, true) => vec![with(EventKind::Create, b, false)],
                    (false, false) => Vec::new(),
                }
            }
            (kind, Some(p), _) => {
                let is_dir = ev.is_dir || matches!(kind, EventKind::Mkdir | EventKind::Rmdir);
                if self.matches(p, is_dir) {
                    vec![ev]
                } else {
                    Vec::new()
                }
            }
            (_, None, _) => Vec::new(),
        }
    }

    /// The changes to ship for `change` under this filter (empty: drop it). Applies
    /// include/exclude (renames across the boundary become a removal or a creation) and
    /// the command mask (a disallowed move becomes its create and delete parts, each
    /// subject to the mask).
    pub fn allows(&self, change: &PathChange, facts: ChangeFacts) -> Vec<PathChange> {
        let m = self.commands;
        let d = facts.is_dir;
        let may_remove = if d { m.erase } else { m.delete };
        match change {
            PathChange::Upsert { path } => {
                let ok = if !self.matches(path, d) {
                    false
                } else if !facts.exists {
                    facts.existed && may_remove
                } else if facts.existed {
                    m.update
                } else {
                    m.create
                };
                if ok { vec![change.clone()] } else { Vec::new() }
            }
            PathChange::Remove { path } => {
                if self.matches(path, d) && may_remove {
                    vec![change.clone()]
                } else {
                    Vec::new()
                }
            }
            PathChange::Rescan { path } => match path {
                Some(p) if !self.matches(p, d) => Vec::new(),
                _ => vec![change.clone()],
            },
            PathChange::Rename { from, to } => {
                let create = |out: &mut Vec<PathChange>| {
                    if if facts.existed { m.update } else { m.create } {
                        out.push(if d {
                            PathChange::Rescan {
                                path: Some(to.clone()),
                            }
                        } else {
                            PathChange::Upsert { path: to.clone() }
                        });
                    }
                };
                let remove = |out: &mut Vec<PathChange>| {
                    if may_remove {
                        out.push(PathChange::Remove { path: from.clone() });
                    }
                };
                let mut out = Vec::new();
                match (self.matches(from, d), self.matches(to, d)) {
                    (false, false) => {}
                    (true, false) => remove(&mut out),
                    (false, true) => create(&mut out),
                    (true, true) if m.r#move => {
                        out.push(change.clone());
                        if d && !self.subtree_invariant(from, to) {
                            out.push(PathChange::Rescan {
                                path: Some(to.clone()),
                            });
                        }
                    }
                    (true, true) => {
                        create(&mut out);
                        remove(&mut out);
                    }
                }
                out
            }
        }
    }

    /// The synced part of `m`: matching entries plus the directories they need as
    /// parents. A hard link whose target is filtered out is re-pointed at the first
    /// remaining path (tree order) of its inode, which becomes a plain file.
    pub fn apply_to_manifest(&self, m: &Manifest) -> Manifest {
        if self.is_everything() {
            return m.clone();
        }
        let mut keep: BTreeMap<RelPath, Entry> = BTreeMap::new();
        for e in m.iter() {
            if self.matches(&e.path, e.is_dir()) {
                for a in e.path.ancestors() {
                    if !keep.contains_key(&a)
                        && let Some(pe) = m.get(&a)
                    {
                        keep.insert(a, pe.clone());
                    }
                }
                keep.insert(e.path.clone(), e.clone());
            }
        }
        finish(keep)
    }

    /// The tree a replica holding `local` should hold after a full reconcile against
    /// the source tree `source`, under this filter and command mask; plan with
    /// `plan(&target, local, ..)`.
    ///
    /// - Synced paths follow `source`, except where the mask forbids it: create off
    ///   leaves out what `local` lacks (and what lies beneath), update off keeps the
    ///   local entry where both have one and they differ, delete (erase) off keeps local
    ///   files (directories) that `source` lacks.
    /// - Local paths that are not synced are kept as they are, unless `source` puts a
    ///   synced entry at that path; the directories they sit in are kept too.
    /// - An entry whose parent cannot be a directory in the result is left out; a hard
    ///   link whose target does not hold the same content becomes a plain file (or
    ///   joins others of its group).
    pub fn reconcile_target(&self, source: &Manifest, local: &Manifest) -> Manifest {
        let m = self.commands;
        let mut t: BTreeMap<RelPath, Entry> = self
            .apply_to_manifest(source)
            .into_entries()
            .map(|e| (e.path.clone(), e))
            .collect();
        if !m.create {
            t.retain(|p, _| local.get(p).is_some());
        }
        if !m.update {
            for (p, e) in t.iter_mut() {
                if let Some(le) = local.get(p)
                    && le != e
                {
                    *e = le.clone();
                }
            }
        }
        for le in local.iter() {
            if t.contains_key(&le.path) {
                continue;
            }
            let keep = if self.matches(&le.path, le.is_dir()) {
                if le.is_dir() { !m.erase } else { !m.delete }
            } else {
                true
            };
            if keep {
                t.insert(le.path.clone(), le.clone());
            }
        }
        // Every entry needs its parents as directories: take them from `local` where
        // the result lacks them, else leave the entry out.
        let mut order: Vec<RelPath> = t.keys().cloned().collect();
        order.sort_by(|a, b| a.cmp_tree(b));
        for p in order {
            if !t.contains_key(&p) {
                continue;
            }
            let mut ok = true;
            for a in p.ancestors() {
                match t.get(&a) {
                    Some(e) if e.is_dir() => {}
                    Some(_) => {
                        ok = false;
                        break;
                    }
                    None => match local.get(&a) {
                        Some(le) if le.is_dir() => {
                            t.insert(a, le.clone());
                        }
                        _ => {
                            ok = false;
                            break;
                        }
                    },
                }
            }
            if !ok {
                t.remove(&p);
            }
        }
        finish(t)
    }
}

/// Makes hard links valid (re-pointing groups whose target is gone or differs) and
/// builds the manifest; parents are already in place.
fn finish(mut map: BTreeMap<RelPath, Entry>) -> Manifest {
    let mut groups: BTreeMap<(RelPath, u64, Hash), Vec<RelPath>> = BTreeMap::new();
    for e in map.values() {
        if let EntryKind::File {
            size,
            hash,
            hardlink_to: Some(t),
        } = &e.kind
        {
            let valid = t != &e.path
                && matches!(map.get(t), Some(Entry {
                    kind: EntryKind::File { size: s, hash: h, hardlink_to: None },
                    ..
                }) if s == size && h == hash);
            if !valid {
                groups
                    .entry((t.clone(), *size, *hash))
                    .or_default()
                    .push(e.path.clone());
            }
        }
    }
    for mut members in groups.into_values() {
        members.sort_by(|a, b| a.cmp_tree(b));
        let first = members[0].clone();
        for (i, p) in members.iter().enumerate() {
            if let Some(Entry {
                kind: EntryKind::File { hardlink_to, .. },
                ..
            }) = map.get_mut(p)
            {
                *hardlink_to = (i > 0).then(|| first.clone());
            }
        }
    }
    Manifest::from_entries(map.into_values())
        .expect("filtered entries keep their parents and valid hard links")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::testutil::p;
    fn g(s: &str) -> Pattern {
        Pattern::glob(s).unwrap()
    }
    fn re(s: &str) -> Pattern {
        Pattern::regex(s).unwrap()
    }
    fn file_match(pat: &str, path: &str) -> bool {
        g(pat).is_match(&p(path), false)
    }
    fn filter(include: Vec<Pattern>, exclude: Vec<Pattern>) -> Filter {
        Filter::new(include, exclude, CommandMask::ALL)
    }

    #[test]
    fn a_star_stays_within_one_component() {
        assert!(file_match("a/*", "a/x"));
        assert!(!file_match("a/*", "a/x/y"));
        assert!(file_match("a/*/c", "a/b/c"));
        assert!(!file_match("a/*/c", "a/b/b/c"));
        assert!(file_match("*.jpg", "x.jpg"));
        assert!(
            !file_match("a*", "b/c"),
            "a name pattern looks at the name only"
        );
    }

    #[test]
    fn a_double_star_crosses_components() {
        for path in ["x.jpg", "a/x.jpg", "a/b/c/x.jpg"] {
            assert!(file_match("**/*.jpg", path), "{path}");
        }
        for path in ["a/b", "a/x/b", "a/x/y/b"] {
            assert!(file_match("a/**/b", path), "{path}");
        }
        assert!(!file_match("a/**/b", "a/xb"));
        assert!(file_match("a/**", "a/x") && file_match("a/**", "a/x/y"));
        assert!(!file_match("a/**", "a"), "`a/**` is what is beneath `a`");
        assert!(
            file_match("a**b", "a/x/b"),
            "`**` inside a component spans `/`"
        );
        assert!(file_match("**", "any/thing"));
    }

    #[test]
    fn question_marks_and_classes_match_one_byte_but_never_a_slash() {
        assert!(file_match("?.txt", "a.txt") && !file_match("?.txt", "ab.txt"));
        assert!(!file_match("a?b", "a/b"));
        assert!(file_match("[ab].txt", "b.txt") && !file_match("[ab].txt", "c.txt"));
        assert!(file_match("[!a].txt", "b.txt") && !file_match("[!a].txt", "a.txt"));
        assert!(file_match("[^a].txt", "b.txt"));
        assert!(file_match("[a-c]", "b") && !file_match("[a-c]", "d"));
        assert!(!file_match("a[!x]b", "a/b") && !file_match("a[.-0]b", "a/b"));
        assert!(file_match("[]]", "]") && file_match("[!]]", "x"));
        assert!(file_match("\\*", "*") && !file_match("\\*", "x"));
        assert!(
            file_match("??", "ü") && !file_match("?", "ü"),
            "bytewise, as rsync"
        );
    }

    #[test]
    fn name_patterns_match_at_any_depth_and_slashed_ones_from_the_root() {
        assert!(file_match("cache", "cache") && file_match("cache", "x/y/cache"));
        assert!(file_match("/cache", "cache") && !file_match("/cache", "x/cache"));
        assert!(file_match("a/cache", "a/cache") && !file_match("a/cache", "x/a/cache"));
    }

    #[test]
    fn a_trailing_slash_matches_directories_only() {
        let pat = g("build/");
        assert!(pat.is_match(&p("x/build"), true));
        assert!(!pat.is_match(&p("x/build"), false));
    }

    #[test]
    fn patterns_keep_their_source_and_compare_by_kind_and_text() {
        assert_eq!(g("*.jpg").as_str(), "*.jpg");
        assert_eq!(re("^cache/").as_str(), "^cache/");
        assert_eq!(g("a/**"), g("a/**"));
        assert_ne!(g("a"), re("a"), "same text, other kind");
        let f = filter(vec![g("*.jpg")], vec![re("^tmp/")]);
        assert_eq!(
            (f.include(), f.exclude()),
            (&[g("*.jpg")][..], &[re("^tmp/")][..])
        );
        assert!(!f.is_noop() && Filter::default().is_noop());
        let mask_only = Filter::new(
            vec![],
            vec![],
            CommandMask {
                delete: false,
                ..CommandMask::ALL
            },
        );
        assert!(mask_only.is_everything() && !mask_only.is_noop());
    }

    #[test]
    fn invalid_globs_are_refused() {
        for bad in ["", "/", "a//b", "[ab", "[/]", "[z-a]", "[é]", "a\\"] {
            assert!(
                matches!(Pattern::glob(bad), Err(FilterError::Glob { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Pattern::regex("(unclosed"),
            Err(FilterError::Regex { .. })
        ));
    }

    #[test]
    fn regexes_see_the_whole_path_and_directories_with_a_slash() {
        let cache = re("^cache/");
        assert!(cache.is_match(&p("cache"), true), "the directory itself");
        assert!(!cache.is_match(&p("cache"), false), "a file named cache");
        assert!(cache.is_match(&p("cache/x/y"), false));
        assert!(!cache.is_match(&p("x/cache/y"), false));
        assert!(re(r"\.jpg$").is_match(&p("a/b.jpg"), false));
        assert!(re("^[^/]+$").is_match(&p("top"), false));
        assert!(re("(?-u)^\\xff").is_match(&RelPath::new(vec![0xff]).unwrap(), false));
    }

    #[test]
    fn an_excluded_directory_excludes_everything_beneath() {
        let f = filter(vec![], vec![g("cache/"), re("^tmp/")]);
        assert!(!f.matches(&p("a/cache"), true));
        assert!(!f.matches(&p("a/cache/x/y.html"), false));
        assert!(f.matches(&p("a/cache.html"), false));
        assert!(!f.matches(&p("tmp/x"), false) && !f.matches(&p("tmp"), true));
        assert!(f.matches(&p("a/tmp/x"), false));
    }

    #[test]
    fn includes_select_paths_and_keep_the_directories_they_need() {
        assert!(Filter::default().matches(&p("any/thing"), false));
        let f = filter(vec![g("**/*.jpg")], vec![]);
        assert!(f.matches(&p("a/b/x.jpg"), false));
        assert!(!f.matches(&p("a/b/x.txt"), false));
        assert!(f.matches(&p("a/b"), true), "may hold a jpg");
        let f = filter(vec![g("/images/")], vec![]);
        assert!(f.matches(&p("images"), true));
        assert!(
            f.matches(&p("images/x/y.txt"), false),
            "beneath an included dir"
        );
        assert!(!f.matches(&p("docs"), true) && !f.matches(&p("docs/x"), false));
        let f = filter(vec![g("site/**/*.css")], vec![]);
        assert!(f.matches(&p("site"), true) && f.matches(&p("site/a/b"), true));
        assert!(!f.matches(&p("other"), true));
        let f = filter(vec![re("^static/")], vec![]);
        assert!(f.matches(&p("static"), true) && f.matches(&p("static/js/a.js"), false));
        assert!(
            !f.matches(&p("other"), true),
            "a literal regex prefix rules it out"
        );
        assert!(filter(vec![re("(?i)^STATIC/")], vec![]).matches(&p("other"), true));
    }

    #[test]
    fn renames_across_the_boundary_become_removals_and_creations() {
        let f = filter(vec![], vec![g("*.tmp"), g("/private/")]);
        let facts = |is_dir| ChangeFacts {
            is_dir,
            exists: true,
            existed: false,
        };
        let mv = |a: &str, b: &str| PathChange::Rename {
            from: p(a),
            to: p(b),
        };
        // An editor's temporary renamed into place: the content is new here.
        assert_eq!(
            f.allows(&mv("x.tmp", "x"), facts(false)),
            [PathChange::Upsert { path: p("x") }]
        );
        assert_eq!(
            f.allows(&mv("x", "x.tmp"), facts(false)),
            [PathChange::Remove { path: p("x") }]
        );
        assert_eq!(f.allows(&mv("a.tmp", "b.tmp"), facts(false)), []);
        assert_eq!(f.allows(&mv("a", "b"), facts(false)), [mv("a", "b")]);
        assert_eq!(
            f.allows(&mv("private/d", "pub"), facts(true)),
            [PathChange::Rescan {
                path: Some(p("pub"))
            }],
            "a directory moved in brings contents never seen"
        );
        // Name patterns judge moved contents the same way on both sides...
        assert_eq!(f.allows(&mv("a", "b"), facts(true)), [mv("a", "b")]);
        // ...a pattern anchored beneath one side does not.
        let f = filter(vec![], vec![g("a/secret")]);
        assert_eq!(
            f.allows(&mv("a", "b"), facts(true)),
            [mv("a", "b"), PathChange::Rescan { path: Some(p("b")) }]
        );
        assert_eq!(f.allows(&mv("x", "y"), facts(true)), [mv("x", "y")]);
    }

    #[test]
    fn the_command_mask_applies_to_changes() {
        let only = |m: CommandMask| Filter::new(vec![], vec![], m);
        let up = PathChange::Upsert { path: p("f") };
        let rm = PathChange::Remove { path: p("f") };
        let new = ChangeFacts {
            is_dir: false,
            exists: true,
            existed: false,
        };
        let old = ChangeFacts {
            existed: true,
            ..new
        };
        let gone = ChangeFacts {
            exists: false,
            existed: true,
            ..new
        };
        let no_create = only(CommandMask {
            create: false,
            ..CommandMask::ALL
        });
        assert_eq!(no_create.allows(&up, new), []);
        assert_eq!(no_create.allows(&up, old), std::slice::from_ref(&up));
        let no_update = only(CommandMask {
            update: false,
            ..CommandMask::ALL
        });
        assert_eq!(no_update.allows(&up, old), []);
        assert_eq!(no_update.allows(&up, new), std::slice::from_ref(&up));
        let no_delete = only(CommandMask {
            delete: false,
            ..CommandMask::ALL
        });
        assert_eq!(no_delete.allows(&rm, old), []);
        assert_eq!(
            no_delete.allows(&up, gone),
            [],
            "an upsert of a vanished file"
        );
        let dir = ChangeFacts {
            is_dir: true,
            ..old
        };
        assert_eq!(
            no_delete.allows(&rm, dir),
            std::slice::from_ref(&rm),
            "erase still on"
        );
        let no_erase = only(CommandMask {
            erase: false,
            ..CommandMask::ALL
        });
        assert_eq!(no_erase.allows(&rm, dir), []);
        assert_eq!(no_erase.allows(&rm, old), std::slice::from_ref(&rm));
        let no_move = only(CommandMask {
            r#move: false,
            ..CommandMask::ALL
        });
        let mv = PathChange::Rename {
            from: p("f"),
            to: p("g"),
        };
        assert_eq!(
            no_move.allows(&mv, new),
            [PathChange::Upsert { path: p("g") }, rm.clone()],
            "done as its parts"
        );
        assert_eq!(
            no_move.allows(
                &mv,
                ChangeFacts {
                    is_dir: true,
                    ..new
                }
            ),
            [PathChange::Rescan { path: Some(p("g")) }, rm]
        );
    }

    #[test]
    fn events_are_filtered_before_the_coalescer() {
        let f = filter(vec![], vec![g("*.tmp"), g("cache/")]);
        let ev = |kind, a: &str, b: Option<&str>, is_dir| FsEvent {
            kind,
            path: Some(p(a)),
            path2: b.map(p),
            is_dir,
            pid: 7,
        };
        assert_eq!(
            f.filter_event(ev(EventKind::Modify, "x.tmp", None, false)),
            []
        );
        assert_eq!(
            f.filter_event(ev(EventKind::Create, "cache/x", None, false)),
            []
        );
        assert_eq!(
            f.filter_event(ev(EventKind::Mkdir, "cache", None, true)),
            []
        );
        let keep = ev(EventKind::Modify, "x", None, false);
        assert_eq!(f.filter_event(keep.clone()), [keep]);
        assert_eq!(
            f.filter_event(ev(EventKind::Rename, "x.tmp", Some("x"), false)),
            [ev(EventKind::Create, "x", None, false)]
        );
        assert_eq!(
            f.filter_event(ev(EventKind::Rename, "d", Some("cache"), true)),
            [ev(EventKind::Rmdir, "d", None, true)]
        );
        assert_eq!(
            f.filter_event(ev(EventKind::Rename, "cache", Some("d"), true)),
            [
                ev(EventKind::Mkdir, "d", None, true),
                ev(EventKind::Lost, "d", None, true)
            ]
        );
        let lost_root = FsEvent {
            kind: EventKind::Lost,
            path: None,
            path2: None,
            is_dir: true,
            pid: 0,
        };
        assert_eq!(f.filter_event(lost_root.clone()), [lost_root]);
    }

    // ----- manifests ------------------------------------------------------------------

    use crate::testutil::{M, dir, file, link, m};

    #[test]
    fn apply_to_manifest_keeps_parents_and_repoints_hard_links() {
        let src = m([
            dir("a"),
            dir("a/b"),
            file("a/b/x.jpg", 1),
            file("a/b/y.txt", 2),
            dir("c"),
            file("c/z.txt", 3),
            file("a/0.txt", 4),
            link("a/b/l1.jpg", "a/0.txt", 4),
            link("a/b/l2.jpg", "a/0.txt", 4),
        ]);
        let f = filter(vec![g("*.jpg")], vec![]);
        let got = f.apply_to_manifest(&src);
        let want = m([
            dir("a"),
            dir("a/b"),
            file("a/b/l1.jpg", 4),
            link("a/b/l2.jpg", "a/b/l1.jpg", 4),
            file("a/b/x.jpg", 1),
            dir("c"),
        ]);
        assert_eq!(got, want, "`c` stays: a directory that may hold a jpg");
        let f = filter(vec![g("/a/b/x.jpg")], vec![]);
        assert_eq!(
            f.apply_to_manifest(&src),
            m([dir("a"), dir("a/b"), file("a/b/x.jpg", 1)])
        );
    }

    #[test]
    fn reconcile_target_honours_the_mask_and_leaves_excluded_paths_alone() {
        let f = |m: CommandMask| Filter::new(vec![], vec![g("*.log")], m);
        let source = m([
            dir("d"),
            file("d/new", 1),
            file("d/same", 2),
            file("d/changed", 3),
        ]);
        let local = m([
            dir("d"),
            file("d/same", 2),
            file("d/changed", 9),
            file("d/extra", 4),
            file("d/app.log", 5),
            dir("gone"),
            file("gone/x.log", 6),
            dir("empty"),
        ]);
        // Everything allowed: the source's tree, plus the replica's excluded files
        // (and the directory they need).
        assert_eq!(
            f(CommandMask::ALL).reconcile_target(&source, &local),
            m([
                dir("d"),
                file("d/new", 1),
                file("d/same", 2),
                file("d/changed", 3),
                file("d/app.log", 5),
                dir("gone"),
                file("gone/x.log", 6),
            ])
        );
        let no_delete = f(CommandMask {
            delete: false,
            ..CommandMask::ALL
        })
        .reconcile_target(&source, &local);
        assert_eq!(no_delete.get(&p("d/extra")), Some(&file("d/extra", 4)));
        assert_eq!(no_delete.get(&p("empty")), None, "erase is still on");
        let no_erase = f(CommandMask {
            erase: false,
            ..CommandMask::ALL
        })
        .reconcile_target(&source, &local);
        assert_eq!(no_erase.get(&p("empty")), Some(&dir("empty")));
        assert_eq!(no_erase.get(&p("d/extra")), None);
        let no_create = f(CommandMask {
            create: false,
            ..CommandMask::ALL
        })
        .reconcile_target(&source, &local);
        assert_eq!(no_create.get(&p("d/new")), None);
        assert_eq!(no_create.get(&p("d/changed")), Some(&file("d/changed", 3)));
        let no_update = f(CommandMask {
            update: false,
            ..CommandMask::ALL
        })
        .reconcile_target(&source, &local);
        assert_eq!(no_update.get(&p("d/changed")), Some(&file("d/changed", 9)));
        assert_eq!(no_update.get(&p("d/new")), Some(&file("d/new", 1)));
    }

    #[test]
    fn reconcile_target_plans_like_a_filtered_sync() {
        // The planner consumes the target as is.
        let f = Filter::new(
            vec![],
            vec![g("*.log")],
            CommandMask {
                delete: false,
                ..CommandMask::ALL
            },
        );
        let source = m([dir("d"), file("d/a", 1)]);
        let local = m([dir("d"), file("d/b", 2), file("d/x.log", 3)]);
        let target = f.reconcile_target(&source, &local);
        let plan = crate::plan::plan(&target, &local, crate::plan::PlanOptions::default());
        assert!(
            !plan
                .steps
                .iter()
                .any(|s| matches!(s, crate::plan::Step::Remove { .. })),
            "{plan:?}"
        );
        assert_eq!(plan.fetch.len(), 1);
    }

    // ----- properties -----------------------------------------------------------------

    /// A direct backtracking matcher for the glob syntax in the module docs.
    fn reference(pat: &str, path: &[u8], is_dir: bool) -> bool {
        let mut pb = pat.as_bytes();
        let lead = pb.first() == Some(&b'/');
        if lead {
            pb = &pb[1..];
        }
        let dir_only = pb.last() == Some(&b'/');
        if dir_only {
            pb = &pb[..pb.len() - 1];
            if !is_dir {
                return false;
            }
        }
        if lead || pb.contains(&b'/') {
            return rm(pb, path, true);
        }
        std::iter::once(0)
            .chain((0..path.len()).filter(|&i| path[i] == b'/').map(|i| i + 1))
            .any(|i| rm(pb, &path[i..], true))
    }

    fn rm(p: &[u8], s: &[u8], seg_start: bool) -> bool {
        let Some(&c) = p.first() else {
            return s.is_empty();
        };
        match c {
            b'*' => {
                let n = p.iter().take_while(|&&x| x == b'*').count();
                let rest = &p[n..];
                if n == 1 {
                    let k = s.iter().take_while(|&&x| x != b'/').count();
                    return (0..=k).any(|i| rm(rest, &s[i..], false));
                }
                if seg_start && rest.is_empty() {
                    return !s.is_empty();
                }
                if seg_start && rest.first() == Some(&b'/') {
                    let after = &rest[1..];
                    return rm(after, s, true)
                        || (0..s.len()).any(|i| s[i] == b'/' && rm(after, &s[i + 1..], true));
                }
                (0..=s.len()).any(|i| rm(rest, &s[i..], false))
            }
            b'?' => !s.is_empty() && s[0] != b'/' && rm(&p[1..], &s[1..], false),
            b'[' => {
                let mut i = 1;
                let neg = matches!(p.get(1), Some(b'!' | b'^'));
                if neg {
                    i += 1;
                }
                let mut set = Vec::new();
                let mut first = true;
                while p[i] != b']' || first {
                    first = false;
                    let lo = p[i];
                    if p.get(i + 1) == Some(&b'-') && p.get(i + 2).is_some_and(|&x| x != b']') {
                        set.push((lo, p[i + 2]));
                        i += 3;
                    } else {
                        set.push((lo, lo));
                        i += 1;
                    }
                }
                let Some(&b) = s.first() else { return false };
                let hit = set.iter().any(|&(lo, hi)| lo <= b && b <= hi);
                b != b'/' && hit != neg && rm(&p[i + 1..], &s[1..], false)
            }
            b'/' => s.first() == Some(&b'/') && rm(&p[1..], &s[1..], true),
            _ => s.first() == Some(&c) && rm(&p[1..], &s[1..], false),
        }
    }

    fn glob_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                4 => Just("a"),
                2 => Just("b"),
                1 => Just("."),
                3 => Just("/"),
                3 => Just("*"),
                2 => Just("**"),
                2 => Just("?"),
                1 => Just("[ab]"),
                1 => Just("[!a]"),
                1 => Just("[.-b]"),
            ],
            1..7,
        )
        .prop_map(|v| v.concat())
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just(".")], 1..4)
                .prop_map(|v| v.concat()),
            1..5,
        )
        .prop_map(|v| v.join("/"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Globs agree with the reference matcher, and a path that matches makes every
        /// ancestor directory `may_match_beneath`.
        #[test]
        fn globs_match_like_the_reference(
            pat in glob_strategy(),
            path in path_strategy(),
            is_dir in any::<bool>(),
        ) {
            let (Ok(glob), Ok(rp)) = (Pattern::glob(&pat), RelPath::new(path.clone())) else {
                return Ok(());
            };
            let got = glob.is_match(&rp, is_dir);
            prop_assert_eq!(got, reference(&pat, path.as_bytes(), is_dir), "{} vs {}", pat, path);
            if got {
                let mut a = rp.parent();
                while let Some(d) = a {
                    prop_assert!(glob.may_match_beneath(&d), "{} beneath {:?}", pat, d);
                    a = d.parent();
                }
            }
        }

        /// `matches` is the documented rule, and `apply_to_manifest` keeps exactly the
        /// matching entries plus their parents.
        #[test]
        fn filters_follow_the_documented_rule(
            inc in proptest::collection::vec(glob_strategy(), 0..2),
            exc in proptest::collection::vec(glob_strategy(), 0..2),
            paths in proptest::collection::vec(path_strategy(), 1..12),
        ) {
            let (Ok(include), Ok(exclude)) = (
                inc.iter().map(|s| Pattern::glob(s)).collect::<Result<Vec<_>, _>>(),
                exc.iter().map(|s| Pattern::glob(s)).collect::<Result<Vec<_>, _>>(),
            ) else {
                return Ok(());
            };
            let f = Filter::new(include, exclude, CommandMask::ALL);
            // A valid tree from the paths: parents become directories.
            let mut tree: BTreeMap<RelPath, Entry> = BTreeMap::new();
            for (i, s) in paths.iter().enumerate() {
                let Ok(rp) = RelPath::new(s.clone()) else { continue };
                let mut a = rp.parent();
                while let Some(d) = a {
                    tree.insert(d.clone(), Entry { path: d.clone(), kind: EntryKind::Dir, meta: M });
                    a = d.parent();
                }
                if !tree.contains_key(&rp) {
                    tree.insert(rp.clone(), Entry { path: rp.clone(), ..file("x", i as u8) });
                }
            }
            let src = Manifest::from_entries(tree.into_values()).unwrap();
            let reference_match = |e: &Entry| {
                let anc: Vec<String> = e.path.ancestors().iter().map(RelPath::display).collect();
                let hit = |pats: &[String]| pats.iter().any(|pat| {
                    reference(pat, e.path.as_bytes(), e.is_dir())
                        || anc.iter().any(|a| reference(pat, a.as_bytes(), true))
                });
                !hit(&exc) && (inc.is_empty() || hit(&inc) || (e.is_dir() && f.include.iter().any(|p| p.may_match_beneath(&e.path))))
            };
            let got = f.apply_to_manifest(&src);
            for e in src.iter() {
                let m = reference_match(e);
                prop_assert_eq!(f.matches(&e.path, e.is_dir()), m, "{:?}", e.path);
                let needed = src.iter().any(|c| c.path != e.path && c.path.starts_with(&e.path) && reference_match(c));
                prop_assert_eq!(got.get(&e.path).is_some(), m || needed, "{:?}", e.path);
            }
        }
    }
}

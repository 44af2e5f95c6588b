//! [`RelPath`]: a validated path relative to a content root.
//!
//! Paths arrive from the network and from the kernel; neither is trusted. A `RelPath`
//! is a non-empty sequence of components separated by single `/`, where no component
//! is empty, `.` or `..`, and no byte is NUL. It never starts with `/`. Bytes need not
//! be UTF-8 (Linux file names are bytes). The root itself is not a `RelPath`.
//!
//! Ordering is bytewise on the full path, except that [`RelPath::cmp_tree`] orders a
//! directory immediately before its contents (`a`, `a/b`, `a.txt`), which is the order
//! the planner needs.

use std::cmp::Ordering;
use std::fmt;

/// Longest path accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest component accepted, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// Why a byte string is not a valid [`RelPath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path is absolute")]
    Absolute,
    #[error("path has an empty component (`//` or trailing `/`)")]
    EmptyComponent,
    #[error("path has a `.` component")]
    Dot,
    #[error("path has a `..` component")]
    DotDot,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path is {len} bytes, longer than {MAX_PATH_LEN}")]
    TooLong { len: usize },
    #[error("a component is {len} bytes, longer than {MAX_NAME_LEN}")]
    NameTooLong { len: usize },
}

/// A validated, normalised path relative to a content root. See the module docs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    /// Validates `bytes` strictly: no normalisation is attempted, so `a//b`, `./a`
    /// and `a/` are refused rather than repaired.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let bytes = bytes.into();
        validate(&bytes)?;
        Ok(Self(bytes))
    }

    /// Joins a validated parent and a single file name (which must not contain `/`).
    pub fn join(&self, name: &[u8]) -> Result<Self, PathError> {
        if name.contains(&b'/') {
            return Err(PathError::EmptyComponent);
        }
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        v.push(b'/');
        v.extend_from_slice(name);
        Self::new(v)
    }

    /// A path of one component.
    pub fn from_name(name: &[u8]) -> Result<Self, PathError> {
        if name.contains(&b'/') {
            return Err(PathError::EmptyComponent);
        }
        Self::new(name.to_vec())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The parent directory, or `None` for a top-level entry.
    pub fn parent(&self) -> Option<RelPath> {
        let i = self.0.iter().rposition(|&b| b == b'/')?;
        Some(RelPath(self.0[..i].to_vec()))
    }

    /// The last component.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// Components, outermost first.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/')
    }

    /// Number of components (1 for a top-level entry).
    pub fn depth(&self) -> usize {
        self.0.iter().filter(|&&b| b == b'/').count() + 1
    }

    /// True if `self` is `other` or lies beneath it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0
            || (self.0.len() > other.0.len()
                && self.0.starts_with(&other.0)
                && self.0[other.0.len()] == b'/')
    }

    /// Strict ancestors, outermost first (`a`, `a/b` for `a/b/c`).
    pub fn ancestors(&self) -> Vec<RelPath> {
        let mut v = Vec::new();
        let mut cur = self.parent();
        while let Some(q) = cur {
            cur = q.parent();
            v.push(q);
        }
        v.reverse();
        v
    }

    /// `self` (at or beneath `from`) moved to `to`: `to` plus what follows `from`.
    /// `None` when the result is not a valid path (longer than
    /// [`MAX_PATH_LEN`](crate::path::MAX_PATH_LEN)).
    pub fn rebase(&self, from: &RelPath, to: &RelPath) -> Option<RelPath> {
        debug_assert!(self.starts_with(from));
        let mut v = to.0.clone();
        v.extend_from_slice(&self.0[from.0.len()..]);
        RelPath::new(v).ok()
    }

    /// Tree order: compares component by component, so a directory's contents sort
    /// directly after it (`a`, `a/b`, `a.txt`).
    pub fn cmp_tree(&self, other: &RelPath) -> Ordering {
        // Same as comparing `components()` lexicographically, in one pass: after the
        // common prefix, a `/` (end of a component) sorts before any name byte, and a
        // path that ends there is a prefix of the other. Names hold no NUL, so mapping
        // `/` to 0 keeps every other byte's order.
        let (a, b) = (&self.0, &other.0);
        let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        let key = |c: u8| if c == b'/' { 0 } else { c };
        match (a.get(common), b.get(common)) {
            (Some(&x), Some(&y)) => key(x).cmp(&key(y)),
            (x, y) => x.is_some().cmp(&y.is_some()),
        }
    }

    /// Lossy UTF-8 for logs and display.
    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.display())
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

fn validate(b: &[u8]) -> Result<(), PathError> {
    if b.is_empty() {
        return Err(PathError::Empty);
    }
    if b.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong { len: b.len() });
    }
    if b[0] == b'/' {
        return Err(PathError::Absolute);
    }
    if b.contains(&0) {
        return Err(PathError::Nul);
    }
    for c in b.split(|&x| x == b'/') {
        match c {
            b"" => return Err(PathError::EmptyComponent),
            b"." => return Err(PathError::Dot),
            b".." => return Err(PathError::DotDot),
            _ if c.len() > MAX_NAME_LEN => return Err(PathError::NameTooLong { len: c.len() }),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_hostile_paths() {
        for (p, e) in [
            (&b""[..], PathError::Empty),
            (b"/etc/passwd", PathError::Absolute),
            (b"a/../../etc", PathError::DotDot),
            (b"..", PathError::DotDot),
            (b"./a", PathError::Dot),
            (b"a//b", PathError::EmptyComponent),
            (b"a/", PathError::EmptyComponent),
            (b"a\0b", PathError::Nul),
        ] {
            assert_eq!(RelPath::new(p.to_vec()), Err(e), "{p:?}");
        }
        assert!(RelPath::new("dir with space/ünïcödé ✓").is_ok());
        assert!(
            RelPath::new(vec![0xff, 0xfe]).is_ok(),
            "non-UTF-8 names are valid"
        );
        assert!(RelPath::new("...").is_ok());
    }

    #[test]
    fn tree_order_puts_contents_after_dir() {
        let mut v: Vec<RelPath> = ["a.txt", "a/b", "a", "a/b/c", "a-b"]
            .iter()
            .map(|s| RelPath::new(*s).unwrap())
            .collect();
        v.sort_by(|a, b| a.cmp_tree(b));
        let s: Vec<String> = v.iter().map(|p| p.display()).collect();
        assert_eq!(s, ["a", "a/b", "a/b/c", "a-b", "a.txt"]);
    }

    proptest::proptest! {
        /// The one-pass `cmp_tree` agrees with comparing component lists.
        #[test]
        fn cmp_tree_is_componentwise(
            a in "[a./-]{1,3}(/[a./-]{1,3}){0,3}",
            b in "[a./-]{1,3}(/[a./-]{1,3}){0,3}",
        ) {
            let (Ok(a), Ok(b)) = (RelPath::new(a), RelPath::new(b)) else { return Ok(()) };
            let slow = |p: &RelPath| p.components().map(<[u8]>::to_vec).collect::<Vec<_>>();
            proptest::prop_assert_eq!(a.cmp_tree(&b), slow(&a).cmp(&slow(&b)));
            proptest::prop_assert_eq!(a.cmp_tree(&b) == Ordering::Equal, a == b);
        }
    }

    #[test]
    fn parent_and_name() {
        let p = RelPath::new("x/y/z").unwrap();
        assert_eq!(p.parent().unwrap().as_bytes(), b"x/y");
        assert_eq!(p.file_name(), b"z");
        assert_eq!(p.depth(), 3);
        assert!(p.starts_with(&RelPath::new("x/y").unwrap()));
        assert!(
            !RelPath::new("x/yz")
                .unwrap()
                .starts_with(&RelPath::new("x/y").unwrap())
        );
        assert_eq!(RelPath::new("x").unwrap().parent(), None);
    }
}

//! A file tree to be written as a cpio archive, in path order, with parent
//! directories created implicitly.

use crate::FileEntry;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use steelcup_proto::cpio::CpioWriter;

#[derive(Debug, Clone)]
enum Node {
    Dir(u32),
    File(u32, Vec<u8>),
    Symlink(String),
    CharDev(u32, u32, u32),
}

/// The tree; paths are relative, `/`-separated.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    fn insert(&mut self, path: &str, node: Node) -> Result<()> {
        if path.is_empty()
            || path.starts_with('/')
            || path.split('/').any(|c| c.is_empty() || c == "..")
        {
            bail!("{path:?}: not a clean relative path");
        }
        let mut parent = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for p in &parts[..parts.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(p);
            match self.nodes.get(&parent) {
                None => {
                    self.nodes.insert(parent.clone(), Node::Dir(0o755));
                }
                Some(Node::Dir(_)) => {}
                Some(_) => bail!("{path:?}: {parent:?} is not a directory"),
            }
        }
        match (self.nodes.get(path), &node) {
            (Some(Node::Dir(_)), Node::Dir(_)) | (None, _) => {
                self.nodes.insert(path.to_string(), node);
                Ok(())
            }
            // The same file again (a library two shipped programs load).
            (Some(Node::File(m1, d1)), Node::File(m2, d2)) if m1 == m2 && d1 == d2 => Ok(()),
            _ => bail!("{path:?}: added twice"),
        }
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        self.insert(path, Node::Dir(mode))
    }
    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<()> {
        self.insert(path, Node::File(mode, data))
    }
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.insert(path, Node::Symlink(target.into()))
    }
    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        self.insert(path, Node::CharDev(mode, major, minor))
    }

    /// Size and sha256 of every regular file.
    pub fn digests(&self) -> BTreeMap<String, FileEntry> {
        self.nodes
            .iter()
            .filter_map(|(p, n)| match n {
                Node::File(_, d) => Some((p.clone(), crate::digest(d))),
                _ => None,
            })
            .collect()
    }

    /// The tree as a cpio newc archive (mtime 0, entries in path order).
    pub fn to_cpio(&self) -> Result<Vec<u8>> {
        let mut w = CpioWriter::new(Vec::new(), 0);
        for (path, node) in &self.nodes {
            match node {
                Node::Dir(m) => w.dir(path, *m)?,
                Node::File(m, d) => w.file(path, *m, d)?,
                Node::Symlink(t) => w.symlink(path, t)?,
                Node::CharDev(m, a, b) => w.char_dev(path, *m, *a, *b)?,
            }
        }
        Ok(w.finish()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_implicit_and_order_is_by_path() {
        let mut t = Tree::default();
        t.file("usr/bin/b", 0o755, b"b".to_vec()).unwrap();
        t.file("init", 0o755, b"i".to_vec()).unwrap();
        let cpio = t.to_cpio().unwrap();
        let s = String::from_utf8_lossy(&cpio);
        let pos = |n: &str| s.find(&format!("{n}\0")).unwrap();
        assert!(
            pos("init") < pos("usr")
                && pos("usr") < pos("usr/bin")
                && pos("usr/bin") < pos("usr/bin/b")
        );
    }

    #[test]
    fn refuses_escapes_duplicates_and_files_as_dirs() {
        let mut t = Tree::default();
        assert!(t.file("../x", 0o644, vec![]).is_err());
        assert!(t.file("/x", 0o644, vec![]).is_err());
        assert!(t.file("a//b", 0o644, vec![]).is_err());
        t.file("a", 0o644, vec![]).unwrap();
        // The same file twice is one file; another one at its path is not.
        t.file("a", 0o644, vec![]).unwrap();
        assert!(t.file("a", 0o644, b"other".to_vec()).is_err());
        assert!(t.file("a", 0o755, vec![]).is_err());
        assert!(t.file("a/b", 0o644, vec![]).is_err());
    }
}

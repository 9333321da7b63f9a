//! The dependency graph of units: start order, cycles, missing requirements.
//!
//! # Design
//! Edges come from `after` and `requires` (a unit starts after both). A unit
//! in a cycle, or one that `requires` a unit that is missing or refused, is
//! refused with a reason; every other unit gets a place in the start order.
//! `after` naming a unit that does not exist is ignored, as in systemd.

use super::Unit;
use std::collections::{BTreeMap, BTreeSet};

/// The result of ordering a set of units.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Unit names in an order where every unit comes after its dependencies.
    pub order: Vec<String>,
    /// Refused units and why.
    pub refused: BTreeMap<String, String>,
}

/// Orders `units`.
pub fn plan(units: &[Unit]) -> Plan {
    let names: BTreeSet<&str> = units.iter().map(|u| u.name.as_str()).collect();
    let deps: BTreeMap<&str, BTreeSet<&str>> = units
        .iter()
        .map(|u| {
            let d = u
                .unit
                .after
                .iter()
                .chain(&u.unit.requires)
                .map(String::as_str)
                .filter(|d| names.contains(d))
                .collect();
            (u.name.as_str(), d)
        })
        .collect();

    let mut refused: BTreeMap<String, String> = BTreeMap::new();
    for scc in strongly_connected(&deps) {
        let cyclic = scc.len() > 1 || deps[scc[0]].contains(scc[0]);
        if cyclic {
            let mut members = scc.clone();
            members.sort_unstable();
            let cycle = members.join(" -> ");
            for m in &members {
                refused.insert(m.to_string(), format!("dependency cycle: {cycle}"));
            }
        }
    }
    for u in units {
        for r in &u.unit.requires {
            if !names.contains(r.as_str()) {
                refused
                    .entry(u.name.clone())
                    .or_insert_with(|| format!("requires {r:?}, which does not exist"));
            }
        }
    }
    // Refusal spreads along `requires` until nothing changes.
    loop {
        let mut changed = false;
        for u in units {
            if refused.contains_key(&u.name) {
                continue;
            }
            if let Some(r) = u.unit.requires.iter().find(|r| refused.contains_key(*r)) {
                refused.insert(u.name.clone(), format!("requires {r:?}, which was refused"));
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }

    // Kahn's algorithm over the rest, by name for a stable order.
    let mut remaining: BTreeMap<&str, BTreeSet<&str>> = deps
        .iter()
        .filter(|(n, _)| !refused.contains_key(**n))
        .map(|(n, d)| {
            (
                *n,
                d.iter()
                    .copied()
                    .filter(|d| !refused.contains_key(*d))
                    .collect(),
            )
        })
        .collect();
    let mut order = Vec::new();
    while !remaining.is_empty() {
        let ready: Vec<&str> = remaining
            .iter()
            .filter(|(_, d)| d.is_empty())
            .map(|(n, _)| *n)
            .collect();
        if ready.is_empty() {
            // Unreachable: cycles were refused above. Refuse the rest rather than loop.
            for n in remaining.keys() {
                refused.insert(n.to_string(), "dependency cycle".into());
            }
            break;
        }
        for n in &ready {
            remaining.remove(n);
            order.push(n.to_string());
        }
        for d in remaining.values_mut() {
            for n in &ready {
                d.remove(n);
            }
        }
    }
    Plan { order, refused }
}

/// Tarjan's algorithm, iterative so a deep chain cannot overflow the stack.
fn strongly_connected<'a>(deps: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Vec<Vec<&'a str>> {
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    let mut low: BTreeMap<&str, usize> = BTreeMap::new();
    let mut on_stack: BTreeSet<&str> = BTreeSet::new();
    let mut stack: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    let mut next = 0;
    for &root in deps.keys() {
        if index.contains_key(root) {
            continue;
        }
        let mut work: Vec<(&str, Vec<&str>)> = vec![(root, deps[root].iter().copied().collect())];
        index.insert(root, next);
        low.insert(root, next);
        next += 1;
        stack.push(root);
        on_stack.insert(root);
        while let Some((v, children)) = work.last_mut() {
            let v = *v;
            if let Some(w) = children.pop() {
                if !index.contains_key(w) {
                    index.insert(w, next);
                    low.insert(w, next);
                    next += 1;
                    stack.push(w);
                    on_stack.insert(w);
                    work.push((w, deps[w].iter().copied().collect()));
                } else if on_stack.contains(w) {
                    let m = low[v].min(index[w]);
                    low.insert(v, m);
                }
            } else {
                work.pop();
                if let Some((parent, _)) = work.last() {
                    let m = low[*parent].min(low[v]);
                    low.insert(*parent, m);
                }
                if low[v] == index[v] {
                    let mut scc = Vec::new();
                    while let Some(w) = stack.pop() {
                        on_stack.remove(w);
                        scc.push(w);
                        if w == v {
                            break;
                        }
                    }
                    out.push(scc);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse, Unit};
    use std::path::PathBuf;

    fn unit(name: &str, after: &[&str], requires: &[&str]) -> Unit {
        let text = format!(
            "[unit]\nafter = {after:?}\nrequires = {requires:?}\n[service]\nexec = [\"/bin/true\"]\n"
        );
        parse(&PathBuf::from(format!("/u/{name}.toml")), &text).unwrap()
    }

    #[test]
    fn orders_by_dependencies() {
        let p = plan(&[
            unit("web", &["vmmd"], &[]),
            unit("vmmd", &["net"], &[]),
            unit("net", &[], &[]),
            unit("other", &[], &[]),
        ]);
        assert!(p.refused.is_empty());
        let pos = |n: &str| p.order.iter().position(|x| x == n).unwrap();
        assert!(pos("net") < pos("vmmd") && pos("vmmd") < pos("web"));
        assert_eq!(p.order.len(), 4);
    }

    #[test]
    fn cycle_refuses_only_its_members_and_their_requirers() {
        let p = plan(&[
            unit("a", &["b"], &[]),
            unit("b", &["c"], &[]),
            unit("c", &["a"], &[]),
            unit("needs-a", &[], &["a"]),
            unit("after-a", &["a"], &[]),
            unit("fine", &[], &[]),
        ]);
        for n in ["a", "b", "c"] {
            assert!(
                p.refused[n].contains("dependency cycle: a -> b -> c"),
                "{:?}",
                p.refused
            );
        }
        assert!(p.refused["needs-a"].contains("refused"));
        assert_eq!(p.order, ["after-a", "fine"]);
    }

    #[test]
    fn self_cycle_is_a_cycle() {
        let p = plan(&[unit("a", &["a"], &[])]);
        assert!(p.refused.contains_key("a"));
        assert!(p.order.is_empty());
    }

    #[test]
    fn missing_requirement_is_refused_missing_after_is_ignored() {
        let p = plan(&[
            unit("a", &[], &["ghost"]),
            unit("b", &["ghost"], &[]),
            unit("c", &[], &["a"]),
        ]);
        assert!(p.refused["a"].contains("\"ghost\", which does not exist"));
        assert!(p.refused["c"].contains("\"a\", which was refused"));
        assert_eq!(p.order, ["b"]);
    }

    #[test]
    fn long_chain_does_not_overflow() {
        let units: Vec<Unit> = (0..5000)
            .map(|i| {
                let dep = format!("u{}", i + 1);
                if i == 4999 {
                    unit(&format!("u{i}"), &[], &[])
                } else {
                    unit(&format!("u{i}"), &[dep.as_str()], &[])
                }
            })
            .collect();
        let p = plan(&units);
        assert_eq!(p.order.len(), 5000);
        assert_eq!(p.order[0], "u4999");
    }
}

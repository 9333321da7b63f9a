//! `cup validate` checks unit files as init reads them: the whole set,
//! drop-ins and the dependency graph, so what it accepts boots.

#![allow(clippy::unwrap_used)] // tests fail by panicking

use std::path::Path;
use std::process::Command;

fn validate(args: &[&Path]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cup"))
        .arg("validate")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn svc(after: &str, requires: &str) -> String {
    format!(
        "[unit]\nafter = [{after}]\nrequires = [{requires}]\n[service]\nexec = [\"/bin/true\"]\n"
    )
}

#[test]
fn a_set_with_a_cycle_or_a_missing_requirement_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("a.toml"), svc("\"b\"", "")).unwrap();
    std::fs::write(d.join("b.toml"), svc("\"a\"", "")).unwrap();
    std::fs::write(d.join("c.toml"), svc("", "\"nosuch\"")).unwrap();
    std::fs::write(d.join("d.toml"), svc("", "")).unwrap();
    let (ok, text) = validate(&[d]);
    assert!(!ok, "{text}");
    assert!(text.contains("a: refused: dependency cycle"), "{text}");
    assert!(text.contains("c: refused: requires"), "{text}");
    assert!(text.contains("d: ok (service)"), "{text}");
    // The same files named one by one: the same verdict.
    let (ok, text) = validate(&[&d.join("a.toml"), &d.join("b.toml")]);
    assert!(!ok && text.contains("dependency cycle"), "{text}");
}

#[test]
fn drop_ins_count_and_a_good_set_passes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("db.toml"), svc("", "")).unwrap();
    std::fs::write(d.join("web.toml"), svc("\"db\"", "\"db\"")).unwrap();
    let (ok, text) = validate(&[d]);
    assert!(ok, "{text}");
    // A bad drop-in refuses its unit, as init would.
    std::fs::create_dir_all(d.join("web.d")).unwrap();
    std::fs::write(d.join("web.d/10-x.toml"), "[service]\nbogus = 1\n").unwrap();
    let (ok, text) = validate(&[&d.join("web.toml"), &d.join("db.toml")]);
    assert!(!ok, "{text}");
    assert!(text.contains("10-x.toml"), "{text}");
}

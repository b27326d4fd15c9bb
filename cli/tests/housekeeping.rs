//! The workspace's manifests kept honest, from `cargo metadata --locked`
//! (what the lockfile resolves, not what a developer's cache happens to
//! hold): a `rust-version` every member declares and the locked
//! dependencies build with, no dependency that no source file names, and
//! no unmaintained crate where a maintained one does the job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn metadata() -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&root)
        .args(["metadata", "--locked", "--format-version", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata --locked: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `1.89` or `1.89.0` as (1, 89, 0).
fn version(v: &str) -> (u32, u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap());
    (
        parts.next().unwrap(),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

fn members(meta: &Value) -> Vec<&Value> {
    let ids: Vec<&Value> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| ids.contains(&&p["id"]))
        .collect()
}

#[test]
fn rust_version_is_declared_by_every_member_and_covers_the_lockfile() {
    let meta = metadata();
    let members = members(&meta);
    let declared: Vec<(&str, Option<&str>)> = members
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["rust_version"].as_str()))
        .collect();
    let msrv = declared[0].1.unwrap_or_else(|| {
        panic!("{declared:?}: every member needs rust-version.workspace = true")
    });
    for (name, v) in &declared {
        assert_eq!(*v, Some(msrv), "{name}: rust-version.workspace = true");
    }
    // The newest Rust any locked package asks for: with an older one,
    // `cargo build --locked` fails ("package X cannot be built because it
    // requires rustc 1.89").
    let (needed, by) = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| Some((version(p["rust_version"].as_str()?), p["name"].as_str()?)))
        .max()
        .unwrap();
    assert!(
        version(msrv) >= needed,
        "rust-version {msrv} is older than {needed:?}, which {by} (locked) needs"
    );
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Whether Rust code in `text` names the crate `ident` (a path, a `use`,
/// an attribute or a macro of it).
fn names(text: &str, ident: &str) -> bool {
    text.match_indices(ident).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = &text[at + ident.len()..];
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && (after.starts_with("::") || after.starts_with('!') || after.starts_with(" as "))
    })
}

/// Dependencies that no file of their package names, by design, with why.
const NAMED_ELSEWHERE: &[(&str, &str, &str)] = &[];

#[test]
fn every_dependency_is_used_by_its_package() {
    let meta = metadata();
    let mut unused = Vec::new();
    for p in members(&meta) {
        let dir = Path::new(p["manifest_path"].as_str().unwrap())
            .parent()
            .unwrap()
            .to_owned();
        let name = p["name"].as_str().unwrap();
        let mut code: BTreeMap<&str, String> = BTreeMap::new();
        for (kind, dirs) in [
            ("normal", &["src"][..]),
            ("dev", &["src", "tests", "benches", "examples"][..]),
        ] {
            let mut files = Vec::new();
            for d in dirs {
                sources(&dir.join(d), &mut files);
            }
            code.insert(
                kind,
                files
                    .iter()
                    .map(|f| std::fs::read_to_string(f).unwrap())
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        }
        for d in p["dependencies"].as_array().unwrap() {
            let kind = d["kind"].as_str().unwrap_or("normal");
            if kind == "build" {
                continue;
            }
            let ident = d["rename"]
                .as_str()
                .unwrap_or(d["name"].as_str().unwrap())
                .replace('-', "_");
            // A package's dev-dependency on itself (to switch a feature on).
            if d["path"]
                .as_str()
                .is_some_and(|path| Path::new(path) == dir)
            {
                continue;
            }
            if NAMED_ELSEWHERE
                .iter()
                .any(|(pkg, dep, _)| *pkg == name && *dep == ident)
            {
                continue;
            }
            if !names(&code[kind], &ident) {
                unused.push(format!("{name}: {kind} dependency {ident}"));
            }
        }
    }
    assert!(
        unused.is_empty(),
        "unused dependencies:\n{}",
        unused.join("\n")
    );
}

#[test]
fn nothing_in_the_build_depends_on_an_unmaintained_crate() {
    // RUSTSEC-2025-0134: rustls-pemfile is unmaintained; rustls-pki-types
    // parses PEM (`PemObject`). Checked over the whole resolved graph, not
    // only the members' own dependencies: lapin 2 pulled it in through
    // tcp-stream, lapin 4 no longer does.
    let meta = metadata();
    let packages = meta["packages"].as_array().unwrap();
    assert!(packages.len() > 100, "the resolved graph is listed");
    for p in packages {
        assert_ne!(
            p["name"], "rustls-pemfile",
            "rustls-pemfile {} is in the build (use rustls_pki_types::pem::PemObject)",
            p["version"]
        );
    }
}

#[test]
fn one_crypto_provider_and_no_other_tls_stack() {
    // ring is the provider (lapin's rustls, sqlx, hyper-rustls): a second
    // one would leave rustls without a default, and aws-lc, OpenSSL or
    // native-tls would be a second TLS stack to keep patched.
    let meta = metadata();
    let active: Vec<&str> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    let named = |name: &str| {
        meta["packages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == name && active.contains(&p["id"].as_str().unwrap()))
    };
    assert!(named("ring"), "ring is the crypto provider");
    for other in ["aws-lc-rs", "aws-lc-sys", "openssl", "native-tls"] {
        assert!(!named(other), "{other} is in the build");
    }
}

#[test]
fn the_image_builds_with_a_rust_at_least_the_rust_version() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let image = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("a FROM rust:<version> stage");
    let tag = image.split(['-', ' ']).next().unwrap();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert!(
        version(tag) >= version(msrv),
        "Dockerfile builds with rust:{tag}, older than rust-version {msrv}"
    );
}

#[test]
fn every_workspace_dependency_is_used_by_a_member() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let declared: Vec<&str> = manifest
        .lines()
        .skip_while(|l| *l != "[workspace.dependencies]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .map(|l| l.split('=').next().unwrap().trim())
        .collect();
    assert!(declared.len() > 10, "{declared:?}");
    let meta = metadata();
    let used: Vec<String> = members(&meta)
        .iter()
        .flat_map(|p| p["dependencies"].as_array().unwrap())
        .map(|d| {
            d["rename"]
                .as_str()
                .unwrap_or(d["name"].as_str().unwrap())
                .to_owned()
        })
        .collect();
    let unused: Vec<&&str> = declared
        .iter()
        .filter(|d| !used.iter().any(|u| u == *d))
        .collect();
    assert!(
        unused.is_empty(),
        "[workspace.dependencies] no member uses: {unused:?}"
    );
}

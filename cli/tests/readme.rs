//! README.md against what the code serves: the command table shows every
//! command of the binary with an example, the exit-code table every code
//! `--help` names, and the HTTP API table every route the shop mounts
//! (and none it does not).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).unwrap()
}

/// The rows of the first README table whose header row starts with
/// `header`, as cells.
fn table(readme: &str, header: &str) -> Vec<Vec<String>> {
    let mut lines = readme.lines().skip_while(|l| !l.starts_with(header));
    assert!(lines.next().is_some(), "README has no table `{header}`");
    lines
        .skip(1) // |---|
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

/// Subcommand names from a `--help`'s "Commands:" section, `help` aside.
fn subcommands(args: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(args)
        .arg("--help")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect()
}

#[test]
fn the_command_table_shows_every_command_with_an_example() {
    let rows = table(&readme(), "| command | what it does | example |");
    let mut commands = subcommands(&[]);
    assert!(commands.len() >= 12, "{commands:?}");
    for sub in subcommands(&["dlq"]) {
        commands.push(format!("dlq {sub}"));
    }
    for command in &commands {
        let row = rows
            .iter()
            .find(|r| r[0] == format!("`{command}`"))
            .unwrap_or_else(|| panic!("no row for `{command}` in README's command table"));
        let example = &row[2];
        assert!(
            example.starts_with(&format!("`warren {command}")),
            "{command}: the example {example} runs another command"
        );
        // The example parses: clap checks every argument before it gets
        // to a trailing --help (shell redirections and quotes aside).
        let words: Vec<&str> = example
            .trim_matches('`')
            .split_whitespace()
            .skip(1)
            .take_while(|w| !w.starts_with('>'))
            .map(|w| w.trim_matches('\''))
            .collect();
        let parsed = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(&words)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            parsed.status.success(),
            "{example}: {}",
            String::from_utf8_lossy(&parsed.stderr)
        );
    }
    assert_eq!(
        rows.len(),
        commands.len(),
        "rows for commands that do not exist"
    );
}

#[test]
fn the_exit_codes_of_help_are_documented_in_the_readme() {
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let codes: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Exit codes"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c.parse::<u8>().is_ok())
        .collect();
    assert!(codes.len() >= 4, "{help}");
    let rows = table(&readme(), "| code | meaning |");
    let documented: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        documented, codes,
        "README's exit codes differ from --help's"
    );
}

/// `(METHOD, path)` of every route the shop mounts: `.route("/p", get(a).put(b))`.
fn routes() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("services/src")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        for (at, _) in text.match_indices(".route(\"") {
            let rest = &text[at + ".route(\"".len()..];
            let path = &rest[..rest.find('"').unwrap()];
            // The method routers up to the call's closing parenthesis.
            let mut depth = 1;
            let mut end = 0;
            for (i, c) in rest.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let call = &rest[..end];
            for method in ["get", "post", "put", "patch", "delete"] {
                let named = call.match_indices(&format!("{method}(")).any(|(i, _)| {
                    !call[..i]
                        .chars()
                        .next_back()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_')
                });
                if named {
                    out.push((method.to_uppercase(), path.to_owned()));
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_api_table_lists_every_route_and_only_those() {
    let routes = routes();
    assert!(routes.len() >= 12, "{routes:?}");
    let rows = table(&readme(), "| request | answer |");
    let mut documented: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            // `GET /customers?limit=&cursor=` or `POST /customers {name, email}`
            let request = r[0].trim_matches('`');
            let mut parts = request.split_whitespace();
            let method = parts.next().unwrap().to_owned();
            let path = parts.next().unwrap();
            let path = path.split('?').next().unwrap().to_owned();
            (method, path)
        })
        .collect();
    documented.sort();
    assert_eq!(documented, routes, "README's HTTP API table vs the routes");
}

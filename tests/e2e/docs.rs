//! The documents cite tests by file and name (`docs/semantics.md`'s "Tests" lines, the mode
//! READMEs): every cited test must exist where the document says, so a reader who follows a
//! citation finds the test, and a moved or renamed test fails here instead of leaving the
//! document pointing at nothing.

use std::path::Path;

/// `modes/{iptables,nftables}/src/tests.rs` → both paths.
fn expand(path: &str) -> Vec<String> {
    match (path.find('{'), path.find('}')) {
        (Some(open), Some(close)) if open < close => path[open + 1..close]
            .split(',')
            .flat_map(|alt| expand(&format!("{}{alt}{}", &path[..open], &path[close + 1..])))
            .collect(),
        _ => vec![path.to_string()],
    }
}

/// The (file, test name) pairs a document cites: a backticked `path.rs` followed by a colon
/// or an opening parenthesis, then the backticked names listed after it (separated by commas, semicolons, parentheses,
/// "and", or "the property test"); any other text ends the list.
fn citations(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for paragraph in text.split("\n\n") {
        let parts: Vec<&str> = paragraph.split('`').collect();
        // parts[odd] are backticked tokens, parts[even] the text between them.
        let mut files: Vec<String> = Vec::new();
        for i in (1..parts.len()).step_by(2) {
            let (token, after) = (parts[i], parts.get(i + 1).copied().unwrap_or(""));
            let before = parts[i - 1];
            if token.ends_with(".rs") && token.contains('/') {
                files = if after.starts_with(':') || after.trim_start().starts_with('(') {
                    expand(token)
                } else {
                    Vec::new()
                };
                continue;
            }
            let gap = before
                .trim_start_matches(':')
                .replace("the property test", "")
                .replace("and", "")
                .replace([',', ';', '(', ')'], "");
            if !gap.trim().is_empty() {
                files.clear();
            }
            let is_name = token.contains('_')
                && token
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if is_name {
                for f in &files {
                    out.push((f.clone(), token.to_string()));
                }
            }
        }
    }
    out
}

#[test]
fn every_test_the_documents_cite_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs: Vec<_> = [
        "docs",
        "modes/iptables",
        "modes/nftables",
        "modes/ipvs",
        "modes/userspace",
    ]
    .iter()
    .flat_map(|dir| std::fs::read_dir(root.join(dir)).unwrap())
    .map(|e| e.unwrap().path())
    .filter(|p| p.extension().is_some_and(|e| e == "md"))
    .collect();
    docs.push(root.join("README.md"));
    let mut checked = 0;
    let mut missing = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        for (file, name) in citations(&text) {
            // A mode README's paths are relative to its crate.
            let local = doc.parent().unwrap().join(&file);
            let path = if local.exists() {
                local
            } else {
                root.join(&file)
            };
            let source = std::fs::read_to_string(path).unwrap_or_default();
            checked += 1;
            if !source.contains(&format!("fn {name}(")) && !source.contains(&format!("fn {name}<"))
            {
                missing.push(format!("{}: `{file}`: `{name}`", doc.display()));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} citations found: the parser lost them"
    );
    assert!(
        missing.is_empty(),
        "cited tests that do not exist:\n{}",
        missing.join("\n")
    );
}

#[test]
fn citations_are_read_as_written() {
    let text = "- **Tests**: `src/a.rs`: `one_test`, `two_test`; `modes/{x,y}/t.rs`:\n  \
                `three_test`; the prose `not_a_test` here.\n\n`src/b.rs` holds `no_colon_test`.\n\n\
                `src/c.rs` (`four_test`, `five_test`) and more `not_cited`.";
    assert_eq!(
        citations(text),
        [
            ("src/a.rs", "one_test"),
            ("src/a.rs", "two_test"),
            ("modes/x/t.rs", "three_test"),
            ("modes/y/t.rs", "three_test"),
            ("src/c.rs", "four_test"),
            ("src/c.rs", "five_test"),
        ]
        .map(|(f, n)| (f.to_string(), n.to_string()))
    );
}

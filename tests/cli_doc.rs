//! docs/CLI.md must show exactly what `--help` says, so the documentation cannot drift from
//! the binary. Regenerate it with scripts/gen-cli-doc.sh.
mod common;

#[test]
fn cli_doc_matches_help_of_every_subcommand() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CLI.md"))
        .expect("docs/CLI.md");
    for sub in [
        vec![],
        vec!["synth"],
        vec!["pack"],
        vec!["inspect"],
        vec!["pretrain"],
        vec!["report"],
        vec!["bench", "step"],
        vec!["bench", "scaling"],
    ] {
        let mut args = sub.clone();
        args.push("--help");
        let out = common::mtx(&args);
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            doc.contains(help.trim_end()),
            "docs/CLI.md is out of date for `mtx-hpc {}`: run scripts/gen-cli-doc.sh",
            sub.join(" ")
        );
        assert!(
            help.contains("Examples:"),
            "`{sub:?} --help` has no examples"
        );
    }
}

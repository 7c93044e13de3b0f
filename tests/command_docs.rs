//! Keeps docs/commands.md in step with the command table: the page is
//! generated from the table, and this test fails when they differ. Run with
//! `REDCLOAK_WRITE_DOCS=1` to rewrite the page after changing the table.

use redcloak::command::{self, Access, CommandSpec, Handling, ReplyShape, ValueArgs};

const PAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/commands.md");

fn treatment(spec: &CommandSpec) -> String {
    match spec.handling {
        Handling::Forward => "forwarded".into(),
        Handling::Local(local) => format!("answered by the proxy ({local:?})"),
        Handling::Refuse(reason) => format!("refused: {reason}"),
    }
}

fn access(spec: &CommandSpec) -> &'static str {
    match spec.access {
        Access::Connection => "any user",
        Access::Read => "read",
        Access::Write => "readwrite",
        Access::Admin => "admin",
    }
}

fn keys(spec: &CommandSpec) -> &'static str {
    if spec.keys.is_empty() {
        ""
    } else {
        "namespaced"
    }
}

fn values(spec: &CommandSpec) -> String {
    let sealed_in = !matches!(spec.values, ValueArgs::None);
    let opened_out = matches!(
        spec.reply,
        ReplyShape::Value
            | ReplyShape::Values
            | ReplyShape::FieldValues
            | ReplyShape::KeyValue
            | ReplyShape::KeyValues
    );
    match (sealed_in, opened_out) {
        (true, true) => "sealed in, opened out".into(),
        (true, false) => "sealed in".into(),
        (false, true) => "opened out".into(),
        (false, false) => String::new(),
    }
}

fn row(out: &mut String, name: &str, spec: &CommandSpec) {
    out.push_str(&format!(
        "| `{name}` | {} | {} | {} | {} |\n",
        treatment(spec),
        access(spec),
        keys(spec),
        values(spec)
    ));
}

fn render() -> String {
    let mut out = String::from(
        "# Commands\n\n\
         Every command of Redis 7.0 and what redcloak does with it, generated\n\
         from the command table (`src/command/table.rs`) by\n\
         `tests/command_docs.rs`; a test fails when this page and the table\n\
         differ. *Forwarded* commands have their keys rewritten into the\n\
         project's namespace; *answered by the proxy* ones are handled or\n\
         emulated for the project; *refused* ones get an error reply and the\n\
         connection stays open. Commands not listed are refused as unknown.\n\n\
         While encryption is on, `LREM`, `LPOS`, `LINSERT` and `HSTRLEN` are\n\
         refused, and `APPEND`, `SETRANGE`, `GETRANGE`, `SUBSTR`, `STRLEN`,\n\
         `LCS` and the bit commands refuse sealed strings\n\
         ([encryption.md](encryption.md)). Scripts run only for projects with\n\
         `allow_scripts`: a script can reach keys the proxy never sees, so\n\
         allowing them trusts that project with the whole upstream.\n\n\
         | command | treatment | access | keys | values |\n\
         | --- | --- | --- | --- | --- |\n",
    );
    let mut specs: Vec<&CommandSpec> = command::commands().collect();
    specs.sort_by_key(|s| s.name);
    for spec in specs {
        if spec.subcommands.is_empty() {
            row(&mut out, spec.name, spec);
        } else {
            for sub in spec.subcommands {
                row(&mut out, &format!("{} {}", spec.name, sub.name), sub);
            }
        }
    }
    out
}

#[test]
fn the_command_reference_matches_the_table() {
    let generated = render();
    if std::env::var_os("REDCLOAK_WRITE_DOCS").is_some() {
        std::fs::write(PAGE, &generated).expect("writing docs/commands.md");
    }
    let page = std::fs::read_to_string(PAGE).unwrap_or_default();
    assert!(
        page == generated,
        "docs/commands.md is out of date: run REDCLOAK_WRITE_DOCS=1 cargo test --test command_docs"
    );
}

//! The `redcloak keys` commands through the built binary: exit codes,
//! one-line outputs and errors, file modes, and no secret ever printed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use redcloak::keyring::{Keyring, PASSPHRASE_VAR};

/// Runs `redcloak` with `args`, with the passphrase variable set to
/// `passphrase` or removed.
fn redcloak(args: &[&str], passphrase: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_redcloak"));
    command
        .args(args)
        .env_remove(PASSPHRASE_VAR)
        .stdin(Stdio::null());
    if let Some(passphrase) = passphrase {
        command.env(PASSPHRASE_VAR, passphrase);
    }
    command.output().expect("running redcloak")
}

fn keys(verb: &str, keyring: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["keys", verb, "--keyring", path_str(keyring)];
    args.extend_from_slice(extra);
    redcloak(&args, None)
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts success, and returns standard output.
fn succeeded(output: Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}{}",
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

/// Asserts failure with exactly one line on standard error, and returns it.
fn failed(output: Output) -> String {
    assert!(!output.status.success(), "succeeded: {}", stdout(&output));
    let reason = stderr(&output);
    assert_eq!(reason.lines().count(), 1, "one line of reason: {reason}");
    reason
}

fn keyring_path() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("keyring.json");
    (dir, path)
}

/// Every secret of the keyring file, in the forms a leak could take.
fn secret_forms(path: &Path) -> Vec<String> {
    let keyring = Keyring::load(path).expect("a readable keyring");
    keyring
        .list()
        .iter()
        .flat_map(|info| {
            let secret = keyring.secret(&info.id).expect("listed keys have secrets");
            let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            [BASE64.encode(secret), hex, format!("{:?}", &secret[..4])]
        })
        .collect()
}

#[test]
fn generate_creates_a_0600_keyring_and_refuses_an_existing_file() {
    let (_dir, path) = keyring_path();

    let created = succeeded(keys("generate", &path, &[]));
    let keyring = Keyring::load(&path).unwrap();
    assert_eq!(
        created,
        format!(
            "created {} with key {}\n",
            path.display(),
            keyring.current_id()
        )
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let before = std::fs::read(&path).unwrap();
    let refused = failed(keys("generate", &path, &[]));
    assert!(refused.contains("already exists"), "{refused}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn rotate_and_list_show_ids_dates_and_the_current_mark_but_never_a_secret() {
    let (_dir, path) = keyring_path();
    let mut printed = succeeded(keys("generate", &path, &[]));
    let first = Keyring::load(&path).unwrap().current_id().to_owned();

    let rotated = succeeded(keys("rotate", &path, &[]));
    let second = Keyring::load(&path).unwrap().current_id().to_owned();
    assert_ne!(first, second);
    assert_eq!(
        rotated,
        format!("added key {second}, now current (2 keys); old keys stay for reading\n")
    );

    let listed = succeeded(keys("list", &path, &[]));
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(lines[0].starts_with(&format!("{first}  created 20")));
    assert!(!lines[0].contains("current"));
    assert!(lines[1].starts_with(&format!("{second}  created 20")));
    assert!(lines[1].ends_with("  current"));

    printed.push_str(&rotated);
    printed.push_str(&listed);
    for form in secret_forms(&path) {
        assert!(!printed.contains(&form), "a secret was printed");
    }
}

#[test]
fn prune_refuses_unretired_keys_unless_forced() {
    let (_dir, path) = keyring_path();
    succeeded(keys("generate", &path, &[]));
    let first = Keyring::load(&path).unwrap().current_id().to_owned();
    succeeded(keys("rotate", &path, &[]));
    let before = std::fs::read(&path).unwrap();

    let refused = failed(keys("prune", &path, &["--keep", "0"]));
    assert!(refused.contains("not marked retired"), "{refused}");
    assert!(refused.contains(&first), "{refused}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing dropped");

    let forced = succeeded(keys("prune", &path, &["--keep", "0", "--force"]));
    assert_eq!(
        forced,
        format!(
            "dropped {first}; forced: values still sealed under {first} can no longer be opened\n"
        )
    );
    assert_eq!(succeeded(keys("list", &path, &[])).lines().count(), 1);
}

#[test]
fn prune_drops_retired_keys_and_keeps_the_newest_old_ones() {
    let (_dir, path) = keyring_path();
    succeeded(keys("generate", &path, &[]));
    for _ in 0..2 {
        succeeded(keys("rotate", &path, &[]));
    }
    let ids: Vec<String> = Keyring::load(&path)
        .unwrap()
        .list()
        .into_iter()
        .map(|info| info.id)
        .collect();
    Keyring::mark_retired(&path, &ids[..2]).unwrap();

    assert_eq!(
        succeeded(keys("prune", &path, &["--keep", "1"])),
        format!("dropped {}\n", ids[0])
    );
    let listed = succeeded(keys("list", &path, &[]));
    assert!(listed.lines().next().unwrap().contains("  retired 20"));
    assert_eq!(
        succeeded(keys("prune", &path, &["--keep", "1"])),
        "nothing to drop\n"
    );
}

#[test]
fn the_passphrase_variable_seals_a_new_keyring_and_opens_it() {
    let (_dir, path) = keyring_path();
    let keyring = path_str(&path);
    let generate = [
        "keys",
        "generate",
        "--keyring",
        keyring,
        "--passphrase-iterations",
        "1000",
    ];

    let created = succeeded(redcloak(&generate, Some("open sesame")));
    assert!(created.contains(PASSPHRASE_VAR), "{created}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"sealed\""));

    let list = ["keys", "list", "--keyring", keyring];
    let refused = failed(redcloak(&list, None));
    assert!(refused.contains(PASSPHRASE_VAR), "{refused}");
    let wrong = failed(redcloak(&list, Some("guess")));
    assert!(wrong.contains("wrong passphrase"), "{wrong}");

    succeeded(redcloak(
        &["keys", "rotate", "--keyring", keyring],
        Some("open sesame"),
    ));
    let listed = succeeded(redcloak(&list, Some("open sesame")));
    assert_eq!(listed.lines().count(), 2);
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("\"sealed\""),
        "a rotated sealed keyring stays sealed"
    );
}

#[test]
fn every_keys_command_has_help_and_bad_use_fails_with_a_reason() {
    for verb in ["generate", "rotate", "list", "prune"] {
        let help = succeeded(redcloak(&["keys", verb, "--help"], None));
        assert!(help.contains("--keyring"), "{help}");
    }
    succeeded(redcloak(&["keys", "--help"], None));
    succeeded(redcloak(&["reencrypt", "--help"], None));

    let (_dir, path) = keyring_path();
    let missing = failed(keys("list", &path, &[]));
    assert!(missing.contains(path_str(&path)), "{missing}");

    let no_keep = redcloak(&["keys", "prune", "--keyring", path_str(&path)], None);
    assert!(!no_keep.status.success());
    assert!(stderr(&no_keep).contains("--keep"));
}

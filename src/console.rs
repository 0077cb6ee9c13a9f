//! Output for the commands a person runs (`doctor`, `token inspect`, `check-config`): lines on
//! stdout that never panic when the reader has gone away (`doctor --json | head`).

/// Writes `text` and a newline to stdout. A reader that went away is not an error of ours: the
/// rest of the output is dropped instead of panicking like `println!`.
pub fn say(text: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

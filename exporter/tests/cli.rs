//! The `ddit-export` binary: convert, then inspect, and a clean non-zero exit on bad input.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

#[test]
fn convert_then_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("pkg");
    let bin = env!("CARGO_BIN_EXE_ddit-export");
    let out = Command::new(bin)
        .args(["convert", "--checkpoint"])
        .arg(common::checkpoint("tiny-odd"))
        .arg("--out")
        .arg(&pkg)
        .args([
            "--blocks-per-segment",
            "2",
            "--dtype",
            "f16",
            "--name",
            "tiny",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin).arg("inspect").arg(&pkg).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        [
            "joint_blocks_0_1",
            "joint_blocks_1_2",
            "image_tail_2_3",
            "text_tail_2_3"
        ]
        .iter()
        .all(|s| text.contains(s)),
        "{text}"
    );
    assert!(text.contains("f16 weights"), "{text}");
    assert!(text.contains("file hashes verified"), "{text}");
}

#[test]
fn bad_checkpoint_exits_non_zero_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ddit-export"))
        .args(["convert", "--checkpoint"])
        .arg(dir.path().join("nope"))
        .arg("--out")
        .arg(dir.path().join("pkg"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing file") && err.contains("nope"),
        "{err}"
    );
}

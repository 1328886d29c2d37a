//! A damaged pack: verify names the chunk and the snapshots that use it; restore refuses.

mod common;

use std::os::unix::fs::FileExt;

use common::*;

#[test]
fn a_flipped_byte_is_named_by_verify_and_stops_restore() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let repo = dir.path().join("repo");
    backflow_fixtures::generate_image(&image, 32 << 20, 9).unwrap();
    init_repo(&repo, "64K");
    let first = backup(&image, &repo)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = backup(&image, &repo)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(verify(&repo, true).status.success());

    // Flip one byte in the middle of the first pack's data (past its header).
    let pack = pack_files(&repo).into_iter().next().expect("a pack");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let offset = file.metadata().unwrap().len() / 3;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x40], offset).unwrap();
    drop(file);

    let out = verify(&repo, true);
    assert!(
        !out.status.success(),
        "verify --read-data passed a damaged pack"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // Both snapshots use every chunk of this image, so both are named.
    assert!(text.contains(&first) && text.contains(&second), "{text}");
    let pack_id = pack.file_stem().unwrap().to_string_lossy().to_string();
    assert!(
        text.contains(&pack_id),
        "the damaged pack is not named: {text}"
    );
    let digest_named = text
        .split(|c: char| !c.is_ascii_hexdigit())
        .any(|w| w.len() == 64);
    assert!(digest_named, "no chunk digest named: {text}");

    let target = dir.path().join("restored.img");
    let restored = restore(&repo, &second, &target);
    assert!(
        !restored.status.success(),
        "restore of damaged data succeeded"
    );
    let stderr = String::from_utf8_lossy(&restored.stderr);
    assert!(
        stderr.contains("damaged") || stderr.contains("digest") || stderr.contains("corrupt"),
        "unclear error: {stderr}"
    );
    assert!(
        !target.exists(),
        "a restore that failed left an output file"
    );
    assert!(!dir.path().join("restored.img.partial").exists());
}

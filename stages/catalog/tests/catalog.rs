//! The catalog against the spec loader: every file in specs/ loads, and what `backflow stages`
//! documents is what the stages declare.

use std::path::Path;

use backflow_pipeline::spec::{self, Catalog, Options};
use backflow_stages::{ROWS, RepositoryUse, Stages, docs, markdown_table, row};

fn specs_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../specs")
}

#[test]
fn every_spec_in_specs_loads_with_the_real_catalog() {
    let mut seen = 0;
    for entry in std::fs::read_dir(specs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Required variables (declared as `name: ~`) get a placeholder: a path, or a name for
        // those that name a VM (names are never paths).
        let vars: Vec<(String, String)> = ["source", "repo", "to", "name", "domain"]
            .iter()
            .filter(|v| text.contains(&format!("  {v}: ~")))
            .map(|&v| match v {
                "name" | "domain" => (v.to_owned(), format!("placeholder-{v}")),
                _ => (v.to_owned(), format!("/placeholder/{v}")),
            })
            .collect();
        let pipeline = spec::load_file(&path, &vars, &Stages)
            .unwrap_or_else(|e| panic!("{} does not load:\n{e}", path.display()));
        assert!(!pipeline.stages.is_empty());
        seen += 1;
    }
    assert!(seen >= 4, "only {seen} specs found");
}

/// Minimal options that make every kind build.
fn minimal_options(kind: &str) -> &'static str {
    match kind {
        "image" | "qemu-nbd" => "path: /dev/null\n",
        "disk-writer" => "path: /tmp/out.raw\n",
        "nbd" => "socket: /run/nbd.sock\ndisk: vda\n",
        "libvirt" => "domain: web01\n",
        "libvirt-define" => "name: web01-copy\n",
        _ => "{}\n",
    }
}

#[test]
fn documented_message_types_match_the_built_stages() {
    for row in ROWS.iter().filter(|r| !r.is_finaliser()) {
        let options = Options::from_yaml(minimal_options(row.kind), true).unwrap();
        let stage = Stages
            .build_stage(row.kind, &options)
            .unwrap_or_else(|e| panic!("{} does not build: {e:?}", row.kind));
        let io = stage.io();
        assert_eq!(
            (io.input, io.output),
            (row.input, row.output),
            "{}",
            row.kind
        );
    }
    for row in ROWS.iter().filter(|r| r.is_finaliser()) {
        let options = Options::from_yaml(minimal_options(row.kind), true).unwrap();
        Stages
            .build_finaliser(row.kind, &options)
            .unwrap_or_else(|e| panic!("{} does not build: {e:?}", row.kind));
    }
}

#[test]
fn kinds_are_unique_and_each_listed_once() {
    let mut kinds: Vec<_> = ROWS.iter().map(|r| r.kind).collect();
    kinds.sort_unstable();
    let before = kinds.len();
    kinds.dedup();
    assert_eq!(kinds.len(), before, "a kind is listed twice");
    assert_eq!(
        Stages.kinds().len() + Stages.finaliser_kinds().len(),
        ROWS.len()
    );
}

/// What a row says about the repository is what building it without one does.
#[test]
fn kinds_that_need_a_repository_are_refused_without_one() {
    for row in ROWS {
        let without = Options::from_yaml(minimal_options(row.kind), false).unwrap();
        let refused = if row.is_finaliser() {
            Stages.build_finaliser(row.kind, &without).err()
        } else {
            Stages.build_stage(row.kind, &without).err()
        };
        match row.repository {
            RepositoryUse::No => assert!(refused.is_none(), "{}: {refused:?}", row.kind),
            RepositoryUse::Required | RepositoryUse::RequiredUnless(_) => {
                let errors =
                    refused.unwrap_or_else(|| panic!("{} built without a repository", row.kind));
                assert!(
                    errors
                        .iter()
                        .any(|e| e.to_string().contains("needs the pipeline's `repository:`")),
                    "{}: {errors:?}",
                    row.kind
                );
            }
        }
        if let RepositoryUse::RequiredUnless(option) = row.repository {
            let off = Options::from_yaml(&format!("{option}: false\n"), false).unwrap();
            assert!(Stages.build_stage(row.kind, &off).is_ok(), "{}", row.kind);
        }
    }
}

/// A `dedup` without a repository is bad input found at validation, at the stage's line.
#[test]
fn dedup_without_a_repository_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("no-repo.yaml");
    std::fs::write(
        &spec,
        "name: no-repo\nstages:\n  - kind: generate\n    size: 1M\n  - kind: dedup\n  - kind: discard\n",
    )
    .unwrap();
    let err = spec::load_file(&spec, &[], &Stages)
        .err()
        .expect("dedup without a repository is refused")
        .to_string();
    assert!(
        err.contains("no-repo.yaml:5:")
            && err.contains("`dedup` needs the pipeline's `repository:`"),
        "{err}"
    );
    // Comparing with this run only needs no repository (the dedup tuning spec).
    std::fs::write(
        &spec,
        "name: no-repo\nstages:\n  - kind: generate\n    size: 1M\n  - kind: dedup\n    repository_lookup: false\n  - kind: discard\n",
    )
    .unwrap();
    spec::load_file(&spec, &[], &Stages).unwrap();
}

#[test]
fn documented_options_are_the_accepted_ones() {
    for doc in docs() {
        for option in &doc.options {
            assert!(
                !option.doc.is_empty(),
                "{}.{} has no documentation",
                doc.kind,
                option.name
            );
        }
    }
    let zstd = row("zstd").unwrap().doc();
    let level = zstd.options.iter().find(|o| o.name == "level").unwrap();
    assert_eq!(level.default, stage_zstd::DEFAULT_LEVEL.to_string());
    let image = row("image").unwrap().doc();
    let names: Vec<_> = image.options.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["path", "disk", "vm"]);
    assert_eq!(image.options[0].default, "required");
    // Every documented option is accepted by the parser: an options map naming all of them (with
    // their defaults where they have one) is not refused as unknown.
    for doc in docs() {
        for option in &doc.options {
            let minimal = minimal_options(doc.kind).trim_end_matches("{}\n");
            if minimal.starts_with(&format!("{}:", option.name))
                || minimal.contains(&format!("\n{}:", option.name))
            {
                continue;
            }
            let yaml = format!("{minimal}{}: ~\n", option.name);
            let options = Options::from_yaml(&yaml, true).unwrap();
            let built = if doc.finaliser {
                Stages.build_finaliser(doc.kind, &options).err()
            } else {
                Stages.build_stage(doc.kind, &options).err()
            };
            if let Some(errors) = built {
                assert!(
                    !errors.iter().any(|e| e.to_string().contains("unknown")),
                    "{}.{}: {errors:?}",
                    doc.kind,
                    option.name
                );
            }
        }
    }
}

/// The README's stage table is the catalog's: regenerate it with `backflow stages --markdown`.
#[test]
fn readme_stage_table_is_generated_from_the_rows() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let section = readme
        .split("\n## Stages\n")
        .nth(1)
        .expect("README has a section \"Stages\"");
    let table: String = section
        .lines()
        .skip_while(|l| !l.starts_with("| kind |"))
        .take_while(|l| l.starts_with('|'))
        .map(|l| format!("{l}\n"))
        .collect();
    let generated = markdown_table();
    if table != generated {
        let first = table
            .lines()
            .zip(generated.lines())
            .find(|(a, b)| a != b)
            .map(|(a, b)| format!("README:    {a}\ngenerated: {b}"))
            .unwrap_or_else(|| "the tables differ in length".to_owned());
        panic!(
            "the README's stage table differs from `backflow stages --markdown`; replace it with that output.\n{first}"
        );
    }
}

#[test]
fn overrides_set_stage_options_and_are_validated_like_the_spec() {
    let path = specs_dir().join("backup-vm.yaml");
    let vars = vec![
        ("domain".to_owned(), "web01".to_owned()),
        ("repo".to_owned(), "/placeholder/repo".to_owned()),
    ];
    let set = |stage: &str, option: &str, value: &str| spec::Override {
        stage: stage.into(),
        option: option.into(),
        value: value.into(),
    };
    let pipeline = spec::load_file_with(
        &path,
        &vars,
        &[set("reader", "workers", "4"), set("zstd", "level", "3")],
        &Stages,
    )
    .unwrap();
    let reader = pipeline.stages.iter().find(|s| s.kind == "reader").unwrap();
    assert_eq!(reader.workers, 4);

    let bad = spec::load_file_with(&path, &vars, &[set("zstd", "level", "99")], &Stages)
        .err()
        .expect("level 99 is refused")
        .to_string();
    assert!(
        bad.contains("(zstd).level") && bad.contains("between -7 and 19"),
        "{bad}"
    );
    let unknown = spec::load_file_with(&path, &vars, &[set("gzip", "level", "1")], &Stages)
        .err()
        .expect("an unknown stage is refused")
        .to_string();
    assert!(
        unknown.contains("no stage `gzip`")
            && unknown.contains("libvirt, libvirt-checkpoint, reader"),
        "{unknown}"
    );
    let option = spec::load_file_with(&path, &vars, &[set("zstd", "levle", "1")], &Stages)
        .err()
        .expect("an unknown option is refused")
        .to_string();
    assert!(
        option.contains("levle") && option.contains("level"),
        "{option}"
    );
}

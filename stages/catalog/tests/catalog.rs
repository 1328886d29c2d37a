//! The catalog against the spec loader: every file in specs/ loads, and what `backflow stages`
//! documents is what the stages declare.

use std::path::Path;

use backflow_pipeline::spec::{self, Options};
use backflow_stages::{Kind, Stages};

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

#[test]
fn documented_message_types_match_the_built_stages() {
    // Minimal options that make every kind build.
    for kind in Kind::ALL {
        let yaml = match kind {
            Kind::Image | Kind::QemuNbd => "path: /dev/null\n",
            Kind::DiskWriter => "path: /tmp/out.raw\n",
            Kind::Nbd => "socket: /run/nbd.sock\ndisk: vda\n",
            Kind::Libvirt => "domain: web01\n",
            _ => "{}\n",
        };
        let options = Options::from_yaml(yaml, true).unwrap();
        let stage = kind
            .build(&options)
            .unwrap_or_else(|e| panic!("{} does not build: {e:?}", kind.name()));
        let io = stage.io();
        assert_eq!((io.input, io.output), kind.default_io(), "{}", kind.name());
        let doc = kind.doc();
        assert_eq!(doc.kind, kind.name());
    }
}

#[test]
fn documented_options_are_the_accepted_ones() {
    for kind in Kind::ALL {
        for option in kind.doc().options {
            assert!(
                !option.doc.is_empty(),
                "{}.{} has no documentation",
                kind.name(),
                option.name
            );
        }
    }
    let zstd = Kind::Zstd.doc();
    let level = zstd.options.iter().find(|o| o.name == "level").unwrap();
    assert_eq!(level.default, stage_zstd::DEFAULT_LEVEL.to_string());
    let image = Kind::Image.doc();
    assert_eq!(
        image
            .options
            .iter()
            .find(|o| o.name == "path")
            .unwrap()
            .default,
        "required"
    );
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

//! Spec loading against a small test catalog: every error class with its exact position, several
//! errors at once, variables, a valid spec, and garbage that must not panic.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use backflow_pipeline::spec::{self, Catalog, Options, SpecError, SpecErrors};
use backflow_pipeline::{
    Finaliser, MessageType, Outcome, Pipeline, RunContext, Stage, StageError, StageIo, Worker,
};
use serde::Deserialize;

/// A stage double: declares its types and does nothing.
struct Fake(StageIo);

impl Stage for Fake {
    fn io(&self) -> StageIo {
        self.0
    }

    fn run(&self, _worker: &mut Worker<'_>) -> Result<(), StageError> {
        Ok(())
    }
}

struct NoopFinaliser;

impl Finaliser for NoopFinaliser {
    fn finalise(&self, _ctx: &RunContext, _outcome: &Outcome) -> Result<(), StageError> {
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateOptions {
    size: u64,
    #[serde(default)]
    pattern: Option<Pattern>,
    #[serde(default)]
    label: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Pattern {
    Zeros,
    Random,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ZstdOptions {
    #[serde(default)]
    level: i8,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreOptions {
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    retry: Option<Retry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Retry {
    count: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code, reason = "checked through its Debug output")]
struct CleanupOptions {
    #[serde(default)]
    keep: bool,
}

/// source `generate` -> `hash` -> `zstd` -> sink `store` (needs `repository:`), plus `discard`.
#[derive(Default)]
struct TestCatalog {
    /// What each built stage was given, as `kind: {options:?}`.
    built: Mutex<Vec<String>>,
}

fn io(input: Option<MessageType>, output: Option<MessageType>) -> StageIo {
    StageIo { input, output }
}

impl TestCatalog {
    fn record<T: std::fmt::Debug>(&self, kind: &str, options: T) {
        self.built
            .lock()
            .unwrap()
            .push(format!("{kind}: {options:?}"));
    }
}

impl Catalog for TestCatalog {
    fn kinds(&self) -> Vec<&'static str> {
        vec!["generate", "hash", "zstd", "store", "discard"]
    }

    fn finaliser_kinds(&self) -> Vec<&'static str> {
        vec!["cleanup"]
    }

    fn build_stage(
        &self,
        kind: &str,
        options: &Options<'_>,
    ) -> Result<Arc<dyn Stage>, Vec<SpecError>> {
        use MessageType::*;
        let io = match kind {
            "generate" => {
                let o: GenerateOptions = options.deserialize()?;
                if o.size == 0 {
                    return Err(vec![options.error("size", "must be at least 1")]);
                }
                if o.label.as_deref() == Some("patterned") && o.pattern.is_none() {
                    return Err(vec![options.error("pattern", "required with this label")]);
                }
                self.record(kind, o);
                io(None, Some(Chunk))
            }
            "hash" => {
                self.record(kind, options.deserialize::<Empty>()?);
                io(Some(Chunk), Some(HashedChunk))
            }
            "zstd" => {
                self.record(kind, options.deserialize::<ZstdOptions>()?);
                io(Some(HashedChunk), Some(CompressedChunk))
            }
            "store" => {
                let o: StoreOptions = options.deserialize()?;
                if !options.has_repository() {
                    return Err(vec![options.error(
                        "kind",
                        "this stage writes to the pipeline's repository: set `repository:`",
                    )]);
                }
                if o.retry.as_ref().is_some_and(|r| r.count > 10) {
                    return Err(vec![options.error("retry", "at most 10 retries")]);
                }
                if o.path.as_deref() == Some(std::path::Path::new("/")) {
                    return Err(vec![options.error("path", "not the root directory")]);
                }
                self.record(kind, o);
                io(Some(CompressedChunk), None)
            }
            "discard" => {
                self.record(kind, options.deserialize::<Empty>()?);
                io(Some(Any), None)
            }
            other => panic!("build_stage called with unknown kind {other}"),
        };
        Ok(Arc::new(Fake(io)))
    }

    fn build_finaliser(
        &self,
        kind: &str,
        options: &Options<'_>,
    ) -> Result<Arc<dyn Finaliser>, Vec<SpecError>> {
        assert_eq!(kind, "cleanup");
        self.record(kind, options.deserialize::<CleanupOptions>()?);
        Ok(Arc::new(NoopFinaliser))
    }
}

const FILE: &str = "specs/test.yaml";

fn load(text: &str, vars: &[(&str, &str)]) -> Result<Pipeline, SpecErrors> {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    spec::load_str(FILE, text, &vars, &TestCatalog::default())
}

/// The error lines of a spec that must fail.
fn errors(text: &str, vars: &[(&str, &str)]) -> Vec<String> {
    match load(text, vars) {
        Ok(_) => panic!("spec loaded but should have failed:\n{text}"),
        Err(e) => e.to_string().lines().map(str::to_owned).collect(),
    }
}

fn error(text: &str, vars: &[(&str, &str)]) -> String {
    let all = errors(text, vars);
    assert_eq!(all.len(), 1, "expected one error, got {all:#?}");
    all.into_iter().next().unwrap()
}

const GOOD: &str = "\
name: backup-test
description: A test pipeline.
variables:
  size: ~
  repo: /tmp/repo
  w: 2
repository: ${repo}
channel_capacity: 8
stages:
  - kind: generate
    size: ${size}
  - kind: hash
    workers: ${w}
    capacity: 3
  - kind: zstd
    name: compress
    level: 3
  - kind: store
cleanup:
  kind: cleanup
  keep: true
";

#[test]
fn valid_spec_builds_the_pipeline() {
    let catalog = TestCatalog::default();
    let vars = vec![("size".to_string(), "1024".to_string())];
    let pipeline = spec::load_str(FILE, GOOD, &vars, &catalog).unwrap();
    assert_eq!(pipeline.name, "backup-test");
    assert_eq!(pipeline.repository, Some(PathBuf::from("/tmp/repo").into()));
    assert!(pipeline.finaliser.is_some());
    let summary: Vec<(&str, &str, usize, usize)> = pipeline
        .stages
        .iter()
        .map(|s| (s.name.as_str(), s.kind.as_str(), s.workers, s.capacity))
        .collect();
    assert_eq!(
        summary,
        [
            ("generate", "generate", 1, 8),
            ("hash", "hash", 2, 3),
            ("compress", "zstd", 1, 8),
            ("store", "store", 1, 8),
        ]
    );
    assert_eq!(
        *catalog.built.lock().unwrap(),
        [
            "generate: GenerateOptions { size: 1024, pattern: None, label: None }",
            "hash: Empty",
            "zstd: ZstdOptions { level: 3 }",
            "store: StoreOptions { path: None, retry: None }",
            "cleanup: CleanupOptions { keep: true }",
        ]
    );
}

#[test]
fn defaults_apply_without_optional_keys() {
    let text = "name: p\nstages:\n  - kind: generate\n    size: 1\n  - kind: discard\n";
    let pipeline = load(text, &[]).unwrap();
    assert_eq!(pipeline.repository, None);
    assert!(pipeline.finaliser.is_none());
    assert_eq!(
        pipeline.stages[1].capacity,
        backflow_pipeline::DEFAULT_CHANNEL_CAPACITY
    );
    assert_eq!(pipeline.stages[1].workers, 1);
}

#[test]
fn relative_repository_stays_relative() {
    let text =
        "name: p\nrepository: ./repo\nstages:\n  - {kind: generate, size: 1}\n  - kind: discard\n";
    assert_eq!(
        load(text, &[]).unwrap().repository,
        Some(PathBuf::from("./repo").into())
    );
}

#[test]
fn s3_repository_is_a_location_not_a_path() {
    let text = "name: p\nrepository: s3://backups/site-a\nstages:\n  - {kind: generate, size: 1}\n  - kind: discard\n";
    let repository = load(text, &[]).unwrap().repository.unwrap();
    assert!(!repository.is_local(), "{repository:?}");
    assert_eq!(repository.to_string(), "s3://backups/site-a");
}

#[test]
fn malformed_s3_repository_is_located_at_its_value() {
    let text = "name: p\nvariables: {repo: ~}\nrepository: ${repo}\nstages:\n  - {kind: generate, size: 1}\n  - kind: discard\n";
    assert_eq!(
        error(text, &[("repo", "s3:/backups")]),
        "specs/test.yaml:3:13: repository: \"s3:/backups\" is not a repository location: an S3 \
         location is written s3://BUCKET or s3://BUCKET/PREFIX"
    );
}

const SHAPE: &str = "name: p\nrepository: /r\nstages:\n  - kind: generate\n    size: 1\n";

#[test]
fn unknown_option_is_located_at_its_key_and_lists_valid_options() {
    let text = format!("{SHAPE}  - kind: hash\n  - kind: zstd\n    levl: 3\n  - kind: store\n");
    assert_eq!(
        error(&text, &[]),
        "specs/test.yaml:8:5: stages[2] (zstd).levl: unknown option `levl` (did you mean `level`?); \
         valid options: level, kind, name, workers, capacity"
    );
}

#[test]
fn wrong_type_of_generic_key_is_located_at_its_value() {
    let text =
        format!("{SHAPE}  - kind: hash\n    workers: many\n  - kind: zstd\n  - kind: store\n");
    assert_eq!(
        error(&text, &[]),
        "specs/test.yaml:7:14: stages[1] (hash).workers: expected an integer 1..=64, found string \"many\""
    );
    let text = format!(
        "{SHAPE}  - kind: hash\n    workers: 65\n    capacity: 0\n  - kind: zstd\n  - kind: store\n"
    );
    assert_eq!(
        errors(&text, &[]),
        [
            "specs/test.yaml:7:14: stages[1] (hash).workers: expected an integer 1..=64, found integer 65",
            "specs/test.yaml:8:15: stages[1] (hash).capacity: expected an integer 1..=65536, found integer 0",
        ]
    );
}

#[test]
fn wrong_type_of_option_is_located_at_its_value() {
    let text = format!("{SHAPE}  - kind: hash\n  - kind: zstd\n    level: [1]\n  - kind: store\n");
    assert_eq!(
        error(&text, &[]),
        "specs/test.yaml:8:12: stages[2] (zstd).level: expected an integer -128..=127, found a sequence"
    );
    let text = format!("{SHAPE}  - kind: hash\n  - kind: zstd\n    level: 300\n  - kind: store\n");
    assert_eq!(
        error(&text, &[]),
        "specs/test.yaml:8:12: stages[2] (zstd).level: expected an integer -128..=127, found integer 300"
    );
}

#[test]
fn nested_option_errors_carry_the_whole_path() {
    let text = "name: p\nrepository: /r\nstages:\n  - {kind: generate, size: 1}\n  - kind: hash\n  - kind: zstd\n  - kind: store\n    retry:\n      count: -1\n      wait: 2\n";
    assert_eq!(
        errors(text, &[]),
        [
            "specs/test.yaml:9:14: stages[3] (store).retry.count: expected an integer 0..=4294967295, found integer -1"
        ]
    );
    let text = text.replace("count: -1", "count: 1");
    assert_eq!(
        error(&text, &[]),
        "specs/test.yaml:10:7: stages[3] (store).retry.wait: unknown field `wait`; valid fields: count"
    );
    let text = text.replace("      count: 1\n", "");
    assert_eq!(
        error(&text, &[]),
        "specs/test.yaml:9:7: stages[3] (store).retry.wait: unknown field `wait`; valid fields: count"
    );
}

#[test]
fn missing_option_is_located_at_the_stage() {
    let text = "name: p\nstages:\n  - kind: generate\n    name: gen\n  - kind: discard\n";
    assert_eq!(
        error(text, &[]),
        "specs/test.yaml:3:5: stages[0] (gen): missing required option `size`"
    );
}

#[test]
fn enum_option_lists_valid_values() {
    let text = "name: p\nstages:\n  - kind: generate\n    size: 1\n    pattern: zeroes\n  - kind: discard\n";
    assert_eq!(
        error(text, &[]),
        "specs/test.yaml:5:14: stages[0] (generate).pattern: unknown value `zeroes` (did you mean `zeros`?); valid values: zeros, random"
    );
    let ok = text.replace("zeroes", "random");
    assert!(load(&ok, &[]).is_ok());
}

#[test]
fn every_bad_option_of_one_stage_is_reported() {
    let text = "name: p\nstages:\n  - kind: generate\n    sise: 1\n    size: big\n    pattern: 3\n    label: ok\n  - kind: discard\n";
    assert_eq!(
        errors(text, &[]),
        [
            "specs/test.yaml:4:5: stages[0] (generate).sise: unknown option `sise` (did you mean `size`?); valid options: size, pattern, label, kind, name, workers, capacity",
            "specs/test.yaml:5:11: stages[0] (generate).size: expected a non-negative integer, found string \"big\"",
            "specs/test.yaml:6:14: stages[0] (generate).pattern: unknown value `3`; valid values: zeros, random",
        ]
    );
}

#[test]
fn catalog_errors_use_the_option_or_the_stage_position() {
    let text = "name: p\nstages:\n  - kind: generate\n    size: 0\n  - kind: store\n";
    assert_eq!(
        errors(text, &[]),
        [
            "specs/test.yaml:4:11: stages[0] (generate).size: must be at least 1",
            "specs/test.yaml:5:11: stages[1] (store).kind: this stage writes to the pipeline's repository: set `repository:`",
        ]
    );
    let text = "name: p\nrepository: r\nstages:\n  - kind: generate\n    size: 1\n    label: patterned\n  - kind: store\n    path: /\n";
    assert_eq!(
        errors(text, &[]),
        [
            "specs/test.yaml:4:5: stages[0] (generate).pattern: required with this label",
            "specs/test.yaml:8:11: stages[1] (store).path: not the root directory",
        ]
    );
}

#[test]
fn unknown_kind_suggests_the_closest() {
    let text = format!("{SHAPE}  - kind: hash\n  - kind: zsdt\n  - kind: store\n");
    assert_eq!(
        error(&text, &[]),
        "specs/test.yaml:7:11: stages[2].kind: unknown stage kind `zsdt` (did you mean `zstd`?); \
         valid kinds: generate, hash, zstd, store, discard"
    );
    let text = format!("{SHAPE}  - kind: compressor\n    name: c\n  - kind: discard\n");
    assert_eq!(
        error(&text, &[]),
        "specs/test.yaml:6:11: stages[1] (c).kind: unknown stage kind `compressor`; \
         valid kinds: generate, hash, zstd, store, discard"
    );
}

#[test]
fn missing_kind_and_non_mapping_stage() {
    let text = "name: p\nstages:\n  - {kind: generate, size: 1}\n  - workers: 2\n  - just-a-string\n  - kind: discard\n";
    assert_eq!(
        errors(text, &[]),
        [
            "specs/test.yaml:4:5: stages[1]: missing required key `kind`; valid kinds: generate, hash, zstd, store, discard",
            "specs/test.yaml:5:5: stages[2]: expected a stage (a mapping with `kind` and its options), found string \"just-a-string\"",
        ]
    );
}

#[test]
fn message_types_must_fit() {
    let text = "name: p\nstages:\n  - kind: generate\n    size: 1\n    name: reader\n  - kind: zstd\n  - kind: discard\n";
    assert_eq!(
        error(text, &[]),
        "specs/test.yaml:6:11: stages[1] (zstd): consumes hashed-chunk but the previous stage `reader` (generate) produces chunk"
    );
}

#[test]
fn sources_first_and_sinks_last() {
    let text = "name: p\nstages:\n  - kind: hash\n  - kind: discard\n  - kind: generate\n    size: 1\n  - kind: hash\n    name: h2\n";
    assert_eq!(
        errors(text, &[]),
        [
            "specs/test.yaml:3:11: stages[0] (hash): the first stage must be a source (consume nothing), but `hash` consumes chunk",
            "specs/test.yaml:4:11: stages[1] (discard): `discard` is a sink (it produces nothing): only the last stage may be a sink",
            "specs/test.yaml:5:11: stages[2] (generate): `generate` is a source (it consumes nothing): only the first stage may be a source",
            "specs/test.yaml:7:11: stages[3] (h2): the last stage must be a sink (produce nothing), but `hash` produces hashed-chunk",
        ]
    );
}

#[test]
fn fit_is_checked_around_a_stage_that_failed() {
    // Stage 1 fails to build: its neighbours are not compared with it, but 2 -> 3 still is.
    let text = "name: p\nstages:\n  - {kind: generate, size: 1}\n  - {kind: hash, x: 1}\n  - kind: zstd\n  - {kind: hash, name: again}\n  - kind: discard\n";
    assert_eq!(
        errors(text, &[]),
        [
            "specs/test.yaml:4:18: stages[1] (hash).x: unknown option `x`; valid options: kind, name, workers, capacity",
            "specs/test.yaml:6:12: stages[3] (again): consumes chunk but the previous stage `zstd` (zstd) produces compressed-chunk",
        ]
    );
}

#[test]
fn several_errors_in_one_file_are_all_reported_in_order() {
    let text = "\
name: [p]
stagse: 1
channel_capacity: 0
stages:
  - kind: generate
    size: 1
    workers: 0
  - kind: zstd
    level: high
  - kind: hash
    name: generate
  - kind: sotre
cleanup:
  kind: cleanup
  keep: maybe
";
    assert_eq!(
        errors(text, &[]),
        [
            "specs/test.yaml:1:7: name: expected a string, found a sequence",
            "specs/test.yaml:2:1: stagse: unknown key `stagse` (did you mean `stages`?); valid keys: name, description, variables, repository, channel_capacity, stages, cleanup",
            "specs/test.yaml:3:19: channel_capacity: expected an integer 1..=65536, found integer 0",
            "specs/test.yaml:7:14: stages[0] (generate).workers: expected an integer 1..=64, found integer 0",
            "specs/test.yaml:9:12: stages[1] (zstd).level: expected an integer -128..=127, found string \"high\"",
            "specs/test.yaml:11:11: stages[2] (generate).name: stage name `generate` is already used by stages[0]: names must be unique; give this stage another `name:`",
            "specs/test.yaml:12:11: stages[3].kind: unknown stage kind `sotre` (did you mean `store`?); valid kinds: generate, hash, zstd, store, discard",
            "specs/test.yaml:15:9: cleanup.keep: expected a boolean, found string \"maybe\"",
        ]
    );
}

#[test]
fn top_level_shape_errors() {
    assert_eq!(
        errors("description: x\n", &[]),
        [
            "specs/test.yaml:1:1: name: missing required key `name` (the pipeline's name)",
            "specs/test.yaml:1:1: stages: missing required key `stages` (the list of stages, a source first and a sink last)",
        ]
    );
    assert_eq!(
        error("name: p\nstages: []\n", &[]),
        "specs/test.yaml:2:9: stages: expected at least one stage"
    );
    assert_eq!(
        error("name: p\nstages: {kind: generate}\n", &[]),
        "specs/test.yaml:2:9: stages: expected a list of stages, found a mapping"
    );
    assert_eq!(
        error("- a\n- b\n", &[]),
        "specs/test.yaml:1:1: expected a mapping with keys name, description, variables, repository, \
         channel_capacity, stages, cleanup, found a sequence"
    );
    assert_eq!(
        error("", &[]),
        "specs/test.yaml:1:1: the spec is empty: expected a mapping with at least `name` and `stages`"
    );
    assert_eq!(
        error("# only a comment\n", &[]),
        "specs/test.yaml:1:1: the spec is empty: expected a mapping with at least `name` and `stages`"
    );
}

#[test]
fn unknown_finaliser_kind() {
    let text = "name: p\nstages:\n  - {kind: generate, size: 1}\n  - kind: discard\ncleanup:\n  kind: clean\n";
    assert_eq!(
        error(text, &[]),
        "specs/test.yaml:6:9: cleanup.kind: unknown finaliser kind `clean` (did you mean `cleanup`?); valid kinds: cleanup"
    );
    let text = text.replace("kind: clean\n", "kind: cleanup\n  kep: true\n");
    assert_eq!(
        error(&text, &[]),
        "specs/test.yaml:7:3: cleanup.kep: unknown option `kep` (did you mean `keep`?); valid options: keep, kind"
    );
}

#[test]
fn yaml_level_errors() {
    // Syntax error: one error, where the parser stopped.
    let text = "name: p\nstages: [1, 2\nx: 3\n";
    let e = error(text, &[]);
    assert!(e.starts_with("specs/test.yaml:3:2: invalid YAML: "), "{e}");

    let text =
        "name: p\nname: q\nstages:\n  - {kind: generate, size: 1, size: 2}\n  - kind: discard\n";
    assert_eq!(
        errors(text, &[]),
        [
            "specs/test.yaml:2:1: name: duplicate key `name` (first set at line 1, column 1)",
            "specs/test.yaml:4:31: stages[0] (generate).size: duplicate key `size` (first set at line 4, column 22)",
        ]
    );

    let text =
        "name: &n p\nstages:\n  - kind: generate\n    size: 1\n    label: *n\n  - kind: discard\n";
    assert_eq!(
        errors(text, &[]),
        [
            "specs/test.yaml:1:10: name: YAML anchors (`&name`) are not supported in specs; repeat the value or use a variable",
            "specs/test.yaml:5:12: stages[0] (generate).label: YAML aliases (`*name`) are not supported in specs; repeat the value or use a variable",
        ]
    );

    let text = "name: !custom p\nstages:\n  - {kind: generate, size: !!str 1}\n  - kind: discard\n";
    let all = errors(text, &[]);
    assert_eq!(
        all,
        [
            "specs/test.yaml:1:15: name: unsupported YAML tag `!custom`: specs use plain values (`!!str` may force a string)",
            "specs/test.yaml:3:34: stages[0] (generate).size: expected a non-negative integer, found string \"1\"",
        ]
    );

    let text = "name: p\nstages:\n  - {kind: generate, size: 1}\n  - kind: discard\n---\nname: q\n";
    assert_eq!(
        error(text, &[]),
        "specs/test.yaml:5:1: a spec is one YAML document; remove the second one (after `---`)"
    );
}

const VARS: &str = "\
name: ${name}-backup
variables:
  name: ~
  size: 4096
  w: 2
  label: ~
stages:
  - kind: generate
    size: ${size}
    label: ${label}
    workers: ${w}
  - kind: discard
";

fn build(text: &str, vars: &[(&str, &str)]) -> (Pipeline, Vec<String>) {
    let catalog = TestCatalog::default();
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match spec::load_str(FILE, text, &vars, &catalog) {
        Ok(p) => (p, catalog.built.into_inner().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn variables_defaults_overrides_and_types() {
    let (p, built) = build(VARS, &[("name", "vm1"), ("label", "disk 0")]);
    assert_eq!(p.name, "vm1-backup");
    assert_eq!(p.stages[0].workers, 2);
    assert_eq!(
        built[0],
        "generate: GenerateOptions { size: 4096, pattern: None, label: Some(\"disk 0\") }"
    );

    let (p, built) = build(
        VARS,
        &[
            ("name", "vm1"),
            ("label", "7"),
            ("w", "4"),
            ("size", "0x10"),
        ],
    );
    assert_eq!(p.stages[0].workers, 4);
    // A number substituted into a string option stays its text.
    assert_eq!(
        built[0],
        "generate: GenerateOptions { size: 16, pattern: None, label: Some(\"7\") }"
    );

    // An empty value is the empty string; `~` is null.
    let (_, built) = build(VARS, &[("name", "vm1"), ("label", "")]);
    assert_eq!(
        built[0],
        "generate: GenerateOptions { size: 4096, pattern: None, label: Some(\"\") }"
    );
    let (_, built) = build(VARS, &[("name", "vm1"), ("label", "~")]);
    assert_eq!(
        built[0],
        "generate: GenerateOptions { size: 4096, pattern: None, label: None }"
    );
}

#[test]
fn substitution_inside_strings_and_escapes() {
    let text = "name: a-${x}-$${x}-$5\nvariables: {x: 1}\nrepository: \"${x}\"\nstages:\n  - {kind: generate, size: 1, label: \"$${literal}\"}\n  - kind: discard\n";
    let (p, built) = build(text, &[]);
    assert_eq!(p.name, "a-1-${x}-$5");
    assert_eq!(p.repository, Some(PathBuf::from("1").into()));
    assert_eq!(
        built[0],
        "generate: GenerateOptions { size: 1, pattern: None, label: Some(\"${literal}\") }"
    );
}

#[test]
fn typed_substitution_reports_the_wrong_type_at_the_use() {
    let e = errors(
        VARS,
        &[
            ("name", "vm1"),
            ("label", "x"),
            ("w", "many"),
            ("size", "true"),
        ],
    );
    assert_eq!(
        e,
        [
            "specs/test.yaml:9:11: stages[0] (generate).size: expected a non-negative integer, found boolean true",
            "specs/test.yaml:11:14: stages[0] (generate).workers: expected an integer 1..=64, found string \"many\"",
        ]
    );
}

#[test]
fn required_variables_must_be_set() {
    assert_eq!(
        errors(VARS, &[("label", "x")]),
        [
            "specs/test.yaml:3:3: variables.name: variable `name` is required: set it with --var name=VALUE"
        ]
    );
    // Both missing: each reported once, at its declaration, and nothing about their uses.
    assert_eq!(
        errors(VARS, &[]),
        [
            "specs/test.yaml:3:3: variables.name: variable `name` is required: set it with --var name=VALUE",
            "specs/test.yaml:6:3: variables.label: variable `label` is required: set it with --var label=VALUE",
        ]
    );
}

#[test]
fn undeclared_variables() {
    let text = VARS.replace("size: ${size}", "size: ${sise}");
    assert_eq!(
        errors(&text, &[("name", "vm1"), ("label", "x"), ("colour", "red")]),
        [
            "specs/test.yaml:2:1: --var colour: `--var colour=...` sets a variable the spec does not declare; declared variables: name, size, w, label",
            "specs/test.yaml:9:11: stages[0] (generate).size: variable `sise` is not declared (did you mean `size`?); declared variables: name, size, w, label",
        ]
    );
    let text = "name: ${x}\nstages:\n  - {kind: generate, size: 1}\n  - kind: discard\n";
    assert_eq!(
        errors(text, &[("y", "1")]),
        [
            "specs/test.yaml:1:1: --var y: `--var y=...` sets a variable the spec does not declare; the spec declares no variables (declare them under `variables:`)",
            "specs/test.yaml:1:7: name: variable `x` is not declared; the spec declares no variables (declare them under `variables:`)",
        ]
    );
}

#[test]
fn malformed_references() {
    let text = "name: a-${x\nvariables: {x: 1}\nstages:\n  - {kind: generate, size: 1, label: \"${}\"}\n  - kind: discard\n";
    assert_eq!(
        errors(text, &[]),
        [
            "specs/test.yaml:1:7: name: unterminated `${` in \"a-${x\": close it with `}`, or write `$${` for a literal `${`",
            "specs/test.yaml:4:38: stages[0] (generate).label: invalid variable reference `${}`: a variable name starts with a letter or `_` and goes on with letters, digits, `_`, `-` or `.`",
        ]
    );
}

#[test]
fn bad_variable_declarations() {
    let text = "name: p\nvariables:\n  x: [1]\n  2bad: 1\nstages:\n  - {kind: generate, size: 1}\n  - kind: discard\n";
    assert_eq!(
        errors(text, &[]),
        [
            "specs/test.yaml:3:6: variables.x: expected a default value (a scalar), or `~` for a required variable, found a sequence",
            "specs/test.yaml:4:3: variables.2bad: invalid variable name `2bad`: a variable name starts with a letter or `_` and goes on with letters, digits, `_`, `-` or `.`",
        ]
    );
    assert_eq!(
        error(
            "name: p\nvariables: [x]\nstages:\n  - {kind: generate, size: 1}\n  - kind: discard\n",
            &[]
        ),
        "specs/test.yaml:2:12: variables: expected a mapping of variable names to default values (`~` for required), found a sequence"
    );
}

#[test]
fn files_that_cannot_be_read() {
    let catalog = TestCatalog::default();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    let e = spec::load_file(&missing, &[], &catalog).err().unwrap();
    assert_eq!(e.0.len(), 1);
    assert_eq!((e.0[0].line, e.0[0].column), (1, 1));
    assert!(e.to_string().starts_with(&format!(
        "{}:1:1: cannot read the spec: ",
        missing.display()
    )));

    let binary = dir.path().join("binary.yaml");
    std::fs::write(&binary, b"name: p\n\xff\xfe\n").unwrap();
    let e = spec::load_file(&binary, &[], &catalog).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:1:1: the spec is not valid UTF-8 (invalid byte at offset 8)",
            binary.display()
        )
    );

    let good = dir.path().join("good.yaml");
    std::fs::write(&good, GOOD).unwrap();
    let p = spec::load_file(&good, &[("size".into(), "1".into())], &catalog).unwrap();
    assert_eq!(p.stages.len(), 4);
}

#[test]
fn errors_display_sorted_by_position() {
    let errors = SpecErrors(vec![
        SpecError {
            file: "f".into(),
            line: 3,
            column: 1,
            field: "b".into(),
            message: "second".into(),
        },
        SpecError {
            file: "f".into(),
            line: 1,
            column: 9,
            field: "a".into(),
            message: "first".into(),
        },
    ]);
    assert_eq!(errors.to_string(), "f:1:9: a: first\nf:3:1: b: second");
}

#[test]
fn options_from_yaml_for_stage_tests() {
    let options = Options::from_yaml("level: 5\n", false).unwrap();
    let o: ZstdOptions = options.deserialize().unwrap();
    assert_eq!(o.level, 5);
    let e = Options::from_yaml("level: x\n", false)
        .unwrap()
        .deserialize::<ZstdOptions>()
        .unwrap_err();
    assert_eq!(
        e[0].to_string(),
        "<options>:1:8: options.level: expected an integer -128..=127, found string \"x\""
    );
}

/// A small deterministic generator (xorshift), so that the garbage is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn must_not_panic(text: &str, vars: &[(&str, &str)]) {
    let result = std::panic::catch_unwind(|| {
        let _ = load(text, vars).map(|_| ()).map_err(|e| e.to_string());
    });
    assert!(result.is_ok(), "panicked on input {text:?}");
}

#[test]
fn truncated_specs_never_panic() {
    for (i, _) in GOOD.char_indices() {
        must_not_panic(&GOOD[..i], &[("size", "1")]);
    }
    for (i, _) in VARS.char_indices() {
        must_not_panic(&VARS[i..], &[]);
    }
}

#[test]
fn garbage_never_panics() {
    const PIECES: &[&str] = &[
        "name",
        "stages",
        "kind",
        ":",
        " ",
        "\n",
        "  ",
        "- ",
        "${",
        "}",
        "$${",
        "[",
        "]",
        "{",
        "}",
        ",",
        "&a",
        "*a",
        "!!str",
        "!x",
        "\"",
        "'",
        "|",
        ">",
        "~",
        "0x",
        "-1",
        "99999999999999999999999",
        ".inf",
        "#",
        "---",
        "...",
        "?",
        "workers",
        "generate",
        "discard",
        "\t",
        "é",
        "\u{0}",
        "%YAML 1.2",
        "\\",
        "variables",
        "x",
        "size",
        "cleanup",
        "capacity",
        "1e400",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..3000 {
        let len = rng.below(40);
        let text: String = (0..len).map(|_| PIECES[rng.below(PIECES.len())]).collect();
        must_not_panic(&text, &[("x", "${")]);
    }
    // Mutations of a valid spec: a byte range replaced by a random piece.
    for _ in 0..2000 {
        let mut text = GOOD.to_owned();
        for _ in 0..=rng.below(3) {
            let mut at = rng.below(text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let mut end = (at + rng.below(8)).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.replace_range(at..end, PIECES[rng.below(PIECES.len())]);
        }
        must_not_panic(&text, &[("size", "${w}")]);
    }
    // Raw bytes, lossily decoded.
    for _ in 0..1000 {
        let bytes: Vec<u8> = (0..rng.below(200)).map(|_| rng.next() as u8).collect();
        must_not_panic(&String::from_utf8_lossy(&bytes), &[]);
    }
    // Deep nesting.
    must_not_panic(&"[".repeat(10_000), &[]);
    must_not_panic(
        &format!("name: {}{}", "[".repeat(200), "]".repeat(200)),
        &[],
    );
    must_not_panic(&"- ".repeat(300), &[]);
}

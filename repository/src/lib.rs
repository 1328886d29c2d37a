//! # Backflow repository format, version 1
//!
//! A repository stores restore points of virtual machine disks. Disks are cut into fixed-size chunks aligned
//! to the disk; each distinct chunk is stored once, compressed, in a pack file; each restore point (snapshot)
//! is a manifest listing, for every chunk of every disk, the digest of its contents. This crate is the only
//! code that reads or writes the format; this page is its design document.
//!
//! ## Where a repository lives
//! A repository is a set of *objects* named by `/`-separated keys (`config`, `packs/3f/3fa2….pack`), in a
//! [`store::Store`]: a local (or POSIX cluster) directory, where a key is a file ([`store::FsStore`]), or an
//! S3 bucket and prefix (`s3://BUCKET/PREFIX`), where it is an object. Everything below is written in keys and
//! holds on both; where a guarantee rests on something only one backend has, the section says how the other
//! keeps it. What a store promises (durable when a write returns, whole or absent, create never replaces,
//! listings see every completed write) is in the [`store`] module; its backends say how they keep it. Work in
//! progress (chunk tables, packs being filled, spilled sort runs) is never in the store but in local
//! *scratch* ([`store::Store::scratch_root`]: `tmp/` of a local repository, `$BACKFLOW_SCRATCH_DIR` or
//! `/var/tmp/backflow` for S3), and reaches the store only whole.
//!
//! How each guarantee of this page holds on each backend (the sections below have the details):
//!
//! | guarantee | local directory | S3 bucket |
//! |---|---|---|
//! | an object is whole or absent | written in scratch, fsynced, renamed or linked | an upload (multipart above 16 MiB) appears at once |
//! | a committed object is durable | fsync of the file and its directory | the PUT or CompleteMultipartUpload was acknowledged |
//! | a manifest never replaces another | `link(2)` fails on an existing name | HEAD, `If-None-Match: *`, and 24 random bits in the id (Garage ignores the header) |
//! | backups exclude an index rebuild; one gc at a time | `flock` on `lock`, `gc/run.lock` | leases under `locks/NAME/`, written then listed |
//! | gc waits for every open handle | a `flock`ed file in `users/`, freed by the kernel | a lease in `users/`, renewed every bound/4, gone after `BACKFLOW_LEASE_SECONDS` |
//! | a dead holder frees its locks | the kernel, at once | its lease expires (clocks within `BACKFLOW_MAX_CLOCK_SKEW_SECONDS`, checked) |
//! | a session whose handle the gc gave up on does not commit | cannot happen (a live process keeps its `flock`) | the lease is checked held right before the manifest |
//! | new index files are seen | the directory's mtime, then a listing | a listing at most once a second when a lookup misses |
//! | no plaintext at rest (encrypted repositories) | the sealing wrapper, the same on both | the same |
//!
//! ## Goals that shaped the format
//! - **Nothing committed is lost by a later failure.** Objects are written once, whole and durably
//!   ([`store::Store::publish`]: fs fsyncs and renames or links; S3 uploads), and never modified again. The
//!   manifest is written last, so it only names durable data.
//! - **Memory does not grow with the repository.** Index files and manifests are searched and read in place
//!   with positioned reads; only fixed-size tables (a 2 KiB fanout per index file) are held in memory.
//! - **Concurrent backups need no coordination.** Every object a session creates has a fresh random name;
//!   no object is shared and modified. Two hosts backing up into one repository only share a read lock.
//! - **Damage is found, named and contained.** Every file has a magic, a version and a checksum; every read
//!   checks lengths and offsets before using them; a damaged file affects the chunks it holds, not the rest.
//! - **Damage never spreads.** A restore point whose chunks can be read restores, whatever else is damaged;
//!   side files (damage marks, gc state, session records, one copy of `config`) never block a restore or a
//!   backup; a backup never takes over a chunk the repository cannot read ("Reading after damage").
//! - **The index is a cache.** Packs describe themselves, so the index can be rebuilt from packs alone.
//!
//! ## Layout
//! ```text
//! config                      JSON: format name, version, repository id, chunk size, pack target size
//! config.copy                 the same text and a checksum line: the second copy (see `config`)
//! damaged                     damage marks: copies of chunks that verify found damaged (see Damaged chunks)
//! keys/<id>.key               an encrypted repository's master key, sealed under one passphrase (JSON)
//! lock                        empty; flock'ed shared by backups, exclusively by gc / index rebuild (fs;
//!                             on S3 the lock is leases under locks/lock/, see Locking)
//! packs/XX/<pack id>.pack     immutable chunk containers (XX = first two hex digits of the id)
//! index/<session id>.idx      one per committed session: digest -> (pack, offset, lengths, codec)
//! index/rebuild-<hex>.idx     the single index written by `rebuild_index`, replacing all others
//! snapshots/<snapshot id>.snap  one manifest per restore point
//! tmp/<session id>/           scratch of a running session: chunk tables, unfinished packs, temp files
//! tmp/recovery-<hex>/         a handle's recovery index, while it lives (see Reading after damage)
//! tmp/put-<pid>-<hex>.tmp     fs: a small object (config, damage marks, gc state) being written; one left
//!                             by a killed process is removed after an hour by the next stale-scratch sweep
//! users/<pid>-<hex>           one per open repository handle, held while it is open (see gc)
//! sessions/<id>.json          job session records (see `history`)
//! locks/<name>/…              S3 only: the leases that stand in for flock (see Locking)
//! gc/                         garbage collection: run.lock, fence, and while a cycle is pending state.json,
//!                             condemned, doomed-packs, forgotten/<snapshot id>.snap
//! quarantine/packs/XX/<pack id>.pack  packs whose header, trailer or footer is damaged, moved here by a gc
//!                             after it salvaged what snapshots use; read by nothing, deleted only by
//!                             `gc --drop-quarantine`
//! ```
//! A local repository has these as files and directories (`packs/`, `index/`, `snapshots/` and `tmp/` exist
//! from `init` on); in S3 they are objects under the prefix, and "directories" are key prefixes. Pack ids are
//! 128 random bits (32 hex digits). Snapshot ids are `YYYYMMDDTHHMMSSZ-xxxxxx`: the UTC second
//! the backup began and 24 random bits, so `ls snapshots/` is chronological; the session id is the same string.
//! The 256 pack subdirectories keep directories small: a 100 TiB repository has about 3 million packs of
//! 32 MiB, 12,000 per directory.
//!
//! All integers are little-endian. Every binary file starts with an 8-byte magic and a `u32` version
//! ([`FORMAT_VERSION`]); readers refuse other versions with [`RepoError::UnsupportedVersion`]. Header sizes are
//! fixed and checked at compile time next to their encoders.
//!
//! ## `config`
//! JSON (`{"format":"backflow-repository","version":1,"id":…,"chunk_size":…,"pack_target_size":…}`), written
//! whole ([`store::Store::put`]) as the last step of `init`: a location without `config` is not a
//! repository, so an interrupted `init` can simply be repeated (`init` refuses a directory that is not
//! empty, or a prefix that holds objects). It is written twice: `config.copy` (first)
//! holds the same text followed by a line `checksum <BLAKE3 of the text, hex>`. A reader uses the copy whose
//! checksum holds when `config` is unreadable or differs from it (changed after it was written), and
//! `config` when the copy is damaged or missing (repositories of earlier releases), with a warning either
//! way; `verify` writes both again from the good one. The chunk size is a multiple of 64 KiB (the
//! QEMU dirty-bitmap granularity, so a dirty extent maps to whole chunks) from [`MIN_CHUNK_SIZE`] to
//! [`MAX_CHUNK_SIZE`]; [`DEFAULT_CHUNK_SIZE`] is 128 KiB. It applies to new disks: each disk records its own
//! chunk size in the manifest.
//!
//! ## Pack files
//! ```text
//! 0            header (32): magic "BFLWPACK" | version u32 | reserved u32 | pack id [16]
//! 32           blobs back to back, each exactly as its codec produced it
//! trailer_off  trailer: one 56-byte entry per blob, in blob order:
//!                digest [32] | offset u64 | stored_len u32 | raw_len u32 | codec u8 | reserved [7]
//! len - 64     footer (64): trailer_off u64 | entry_count u64 | version u32 | reserved u32
//!                | checksum [32] = BLAKE3(header ‖ trailer ‖ footer[0..24]) | magic "BFLWPEND"
//! ```
//! Chunks are compressed individually, so any chunk is read with one positioned read and no neighbours. The
//! entry's codec byte says how its blob is encoded: 0 ([`Codec::None`]) the plaintext itself, when compression
//! does not pay; 1 ([`Codec::Zstd`]) one zstd frame; 2 ([`Codec::Lz4`]) one LZ4 block in block format (no frame
//! and no size prefix: `raw_len` is the size). The codec is recorded per chunk, so one repository may hold
//! chunks of every codec (a backup spec picks its compressor stage) and a restore needs no setting:
//! [`decode`] dispatches on the byte. A reader that meets a codec byte it does not know reports the pack as
//! corrupt rather than guess. A writer streams blobs to the file and keeps
//! only the trailer entries in memory; it closes the pack at the target size ([`DEFAULT_PACK_TARGET_SIZE`],
//! 32 MiB: few files for object storage, bounded loss if one is damaged). The footer is found at a fixed
//! distance from the end, and `trailer_off + entry_count * 56 + 64 == length` is checked before anything else,
//! so a truncated pack is recognised at once. The checksum covers the header (pack id) and the trailer; blob
//! bytes are not covered because every blob is verified against its own digest when read. The trailer makes
//! the pack self-describing: [`read_pack_trailer`] and [`Repository::rebuild_index`] need nothing else.
//!
//! ## Index files
//! ```text
//! 0        header (32): magic "BFLWIDX\0" | version u32 | record_size u32 (56) | record_count u64
//!                       | pack_count u32 | reserved u32
//! 32       pack table: pack_count ids of 16 bytes
//! P        fanout: 256 u64; fanout[b] = number of records whose digest starts with a byte <= b
//! P+2048   records sorted by digest, 56 bytes each:
//!            digest [32] | pack u32 (position in the pack table) | codec u8 | reserved [3]
//!            | offset u64 | stored_len u32 | raw_len u32
//! end-32   BLAKE3 of everything before
//! ```
//! The design follows git's pack index. A lookup reads the digest's fanout bucket bounds from memory and
//! binary-searches that bucket with `pread` (about log2(n / 256) reads of 56 bytes), then reads the 16-byte
//! pack id: memory per index file is its 2 KiB fanout and a file descriptor, whatever its size. With 64 KiB
//! chunks a TiB of unique data is 16 Mi records, 900 MiB of index on disk and nothing of it in memory.
//!
//! Each committed session writes one index file for the packs it wrote. Index files are never modified, so
//! concurrent sessions need no lock to add theirs. A [`Repository`] lists `index/` on its first lookup, not at
//! open, and lists it again when a lookup misses and `index/` may have changed
//! ([`store::Store::change_hint`]): on fs, when the directory's modification time changed (or is so recent
//! that a coarse timestamp could hide a change); on S3, which has no such time, at most once a second. A
//! long-running backup dedups against chunks that other processes committed after it started, while a hit
//! costs no request beyond the search.
//! [`Repository::refresh`] lists at once. Opening an index checks header, length and fanout, not the checksum
//! (which would read the file); `verify` checks checksums, and an index that cannot be opened is skipped
//! with a warning (its chunks are not deduplicated against, and are reported by `verify`).
//!
//! A session's index entries are kept in memory up to 512 Ki records (28 MiB) and then spilled to sorted runs
//! in its scratch directory, merged into the index file at commit: a full backup of a 2 TiB disk costs the
//! same memory as a small one. A digest may appear twice (two writer threads raced to store it); either copy
//! is valid. A lookup costs one binary search per index file, so many small index files make lookups slower:
//! a gc merges them all into one (and so does an index rebuild).
//!
//! ## Snapshot manifests
//! ```text
//! 0          header (32): magic "BFLWSNAP" | version u32 | disk_count u32 | meta_len u64 | entry_count u64
//! 32         metadata: meta_len bytes of JSON (SnapshotMeta: id, vm, time, hostname, domain XML, disks with
//!            name, size, chunk size, source location and opaque changed-block-tracking state)
//! 32+meta    one chunk table per disk, in metadata order: ceil(size / chunk_size) entries of 32 bytes
//! end-32     BLAKE3 of everything before
//! ```
//! An entry is the BLAKE3 digest of the chunk's plaintext, or 32 zero bytes for a chunk that reads as zeros
//! (stored as nothing, restored as a hole). BLAKE3 yields the all-zero digest with probability 2^-256, and
//! the writer rejects it, so the encoding is unambiguous. The last chunk of a disk may be partial; its
//! plaintext is just shorter. Every snapshot is a logical full: an incremental references its parent's chunks
//! by digest ([`BackupSession::copy_chunks`] copies unchanged ranges), so any snapshot restores alone and
//! deleting one never breaks another.
//!
//! Opening a snapshot streams the whole file through BLAKE3 once with a bounded buffer and keeps only the
//! metadata; entries are then read by position ([`Snapshot::chunk`]) or sequentially ([`Snapshot::chunks`]),
//! so a 2 TiB disk's table (512 MiB at 128 KiB chunks) is never in memory. Listing reads header and metadata
//! only. Metadata readers ignore unknown JSON keys: an optional key may be added within version 1; any
//! change of meaning or binary layout is a new version.
//!
//! `vm` is the snapshot's identity (see [`check_identity`]): a libvirt domain's name, the name a spec gave an
//! image, or else the image's canonical absolute path, so that two images of one file name never share
//! retention, `latest` or a parent. Earlier releases named an unnamed image after its file; their manifests
//! are read unchanged and keep those names. A snapshot is named by its id, any prefix only its id starts
//! with, or `latest` of an identity ([`Repository::resolve_snapshot`]: one rule for every command and stage).
//!
//! During a session each disk's table is a sparse scratch file (`SCRATCH/SESSION/disk-N.table`) pre-sized to its
//! entry count, all zero, written with `pwrite` by any thread in any order; commit copies it into the manifest.
//!
//! ## Commit order and crash consistency
//! 1. Each pack: written in scratch (`SCRATCH/SESSION/ID.pack.tmp`) and published as `packs/XX/ID.pack`
//!    (fs: fsynced, linked into place, directory fsynced; S3: uploaded). Only then are its entries handed to
//!    the session.
//! 2. The index file: `SCRATCH/SESSION/index.tmp`, published as `index/SESSION.idx`.
//! 3. The manifest: `SCRATCH/SESSION/manifest.tmp`, published as `snapshots/ID.snap` in create mode (fs: a
//!    hard link, which never replaces an existing name; S3: `If-None-Match: *` after a HEAD; the id's 24
//!    random bits keep two sessions apart even on a store that ignores the header, as Garage does). Right
//!    before it the session checks that its handle's registration in `users/` is still held
//!    ([`store::Lease::is_held`]: always on fs; on S3, renewed within its bound), since a gc may have given up
//!    on a handle whose lease ran out and deleted chunks the manifest references; it fails cleanly otherwise.
//!    Publishing the manifest is the commit point.
//! 4. The scratch directory is removed.
//!
//! Every chunk a manifest references is either in this session's packs (durable before step 2) or was found
//! by a lookup in a committed index file (whose packs were durable before it existed). So a crash at any
//! moment leaves the repository valid: before step 3 there is no snapshot, only packs and perhaps an index
//! file that nothing references (they even serve as dedup targets for the next backup, and a gc removes
//! them); after step 3 the snapshot is complete. A dropped (uncommitted) session behaves the same way.
//! Leftover scratch directories are ignored by readers and removed by [`Repository::remove_stale_scratch`].
//! A session refuses to commit if a pack writer was dropped with chunks in its open pack, since those chunks
//! were never stored.
//!
//! ## Locking
//! - Backup sessions, `forget` and `gc` hold the repository lock `lock` shared; [`Repository::rebuild_index`]
//!   takes it exclusively, so it never re-indexes packs of a running session. All use
//!   [`store::Store::lock`] without waiting: a conflict is an immediate, retryable [`RepoError::Locked`], never
//!   a hang. One gc at a time: `gc/run.lock`.
//! - How a lock is held: on fs, a `flock` on the file of that name, which the kernel releases when the
//!   process dies however it dies. On S3, a lease: the taker writes its own object under `locks/NAME/`
//!   (fresh random name, a timestamp, shared or exclusive), then lists the prefix; a conflicting live lease
//!   makes it delete its own and fail. Of two racing takers the one that lists second sees the other, so
//!   read-after-write consistency of PUT and LIST is enough (no conditional write is trusted). A lease is
//!   renewed in the background and counts as gone when older than its holder's bound (`BACKFLOW_LEASE_SECONDS`,
//!   default 60; written in the lease's name, so that processes with other settings judge it alike), so a dead
//!   holder frees it; the store refuses leases when its clock and this host's differ by more than a bound.
//!   Handles register the same way in `users/`.
//! - Each session holds an exclusive `flock` on its scratch directory (local on every backend). The kernel
//!   releases it when the process dies, so a free lock means an abandoned directory.
//! - Readers (list, open, lookup, read, verify) take no lock: committed objects are immutable, and a gc
//!   deletes nothing a registered handle could have seen (below).
//!
//! ## Forgetting snapshots
//! [`Repository::forget`] deletes one manifest `snapshots/<id>.snap`, durably; nothing else changes. Every snapshot is a logical full, so no other snapshot depends on it; its chunks stay in their packs
//! (and keep serving as dedup targets) until a garbage collection removes what no manifest references. Forget
//! takes the shared lock like a backup and runs next to backups and gc ("Garbage collection" says how the two
//! meet). Which snapshots to forget is a pure policy, [`plan`] with a [`KeepPolicy`]
//! (keep-last and grandfather-father-son daily/weekly/monthly/yearly, per VM; the rules are at [`plan`]), or
//! the operator's choice by id ([`Repository::manifest_ids`] lists them all): forget never reads the manifest,
//! so it removes a damaged one too, which a gc needs (it stops on a manifest it cannot read).
//!
//! ## Garbage collection
//! [`Repository::gc`] removes what no snapshot references, while backups, restores and forgets go on. It never
//! takes the repository away from them, so it cannot simply delete: a backup that began earlier may have
//! found a chunk in the index (deduplication) or in its parent snapshot, and reference it in a manifest it
//! commits later. The gc therefore works in a cycle of two phases, with its state in `gc/`:
//!
//! 1. **Condemn.** Mark: every manifest's digests go through an external sort into a sorted list of
//!    referenced digests (a manifest that cannot be read stops the gc, which names the
//!    `backflow forget --snapshot ID` that removes it). Every index file is streamed (checksum and order
//!    checked: a damaged index stops the gc before it changes anything) into a second sort by digest, with
//!    the trailer entries of the packs no index names (orphans) and of the packs that may be damaged (below).
//!    Each digest's copies are settled together (see "Damage" below): a referenced digest keeps one copy
//!    live, every other copy and every unreferenced one is dead, and the records go into a third sort by
//!    pack. Per pack: no dead record, keep it; no live record, delete it; at least `repack_threshold`% (20 by
//!    default) of its bytes dead, rewrite it (its live chunks are read, verified against their digests and
//!    copied into new packs; a damaged chunk keeps the pack as it is); otherwise keep it, dead records
//!    included (they still serve deduplication; the report gives their bytes, `unused_bytes_kept`, what a
//!    lower threshold would free). An orphan with a live copy is kept and indexed again; one
//!    without is left for the sweep. Then, in this order, each step durable before the next: the new packs;
//!    one new index file `gc-<hex>.idx` holding every kept record; `gc/condemned` (the dead records of
//!    deleted, rewritten and quarantined packs, sorted by digest), `gc/doomed-packs` and `gc/state.json`;
//!    removal of the index files that were read; and the list of the handles registered in `users/` (see
//!    below), recorded in the state. Nothing is deleted yet, and lookups no longer find the condemned chunks,
//!    so no backup that begins from now on relies on them.
//! 2. **Sweep**, as soon as every handle listed in the state has closed (at once, when none was open; else at
//!    the next `gc`, which reports what it waits for). Snapshots committed since the mark (and those forgotten
//!    meanwhile, see below) are read; condemned chunks they reference are copied into a new pack and indexed
//!    again. The state becomes `sweeping`; then the doomed packs are deleted, the packs no index named (left
//!    by killed sessions: orphans) unless an index file written since names them, and the damaged packs
//!    moved to `quarantine/`. The state files go last.
//!
//! Why this is safe:
//! - Every [`Repository`] handle registers itself in `users/` ([`store::Store::register`]) until it is
//!   dropped (a long-lived one too: `backflow serve` holds its handle for as long as it serves, so a
//!   sweep waits for it and the served restore point's packs stay readable): on fs a file it holds `flock`ed, which the kernel frees when the process dies; on S3 a lease
//!   renewed in the background. A registration that is not live ([`store::Store::live`]: its `flock` is free,
//!   or its lease ran out) counts as gone, and a session whose own registration is no longer held does not
//!   commit (step 3 of the commit order), so a handle the gc stopped waiting for cannot commit a manifest
//!   that references what the sweep deletes. A backup's lookups, its parent snapshot and
//!   its unindexed packs all come through a handle. A handle open before the condemned chunks left the index
//!   is listed, and the sweep waits for it; whatever its backup committed by then is read by the sweep.
//!   A handle opened later cannot find condemned chunks through the index, only through a manifest committed
//!   by an earlier handle, which the sweep reads too.
//! - `forget` takes the lock `gc/fence` shared, the gc takes it exclusively while it publishes a cycle and while the
//!   sweep reads the new snapshots. While a cycle is pending, `forget` moves the manifest to `gc/forgotten/`
//!   instead of deleting it, so a snapshot a later backup took as its parent cannot vanish from the sweep's
//!   sight. (A forgotten manifest that cannot be read is skipped: no backup could have opened it either.)
//! - While a cycle is pending, restores and `verify` find condemned chunks in `gc/condemned`
//!   ([`Repository::locate`]; never deduplication), so a snapshot committed during the gc restores at once.
//!   A read that finds its pack gone (the sweep moved the chunk) lists the index again and retries.
//! - A kill at any step leaves a state the next `gc` finishes: before `state.json` exists, the old index
//!   files are all still there (the new one, if written, only duplicates records), and new packs are orphans
//!   (whose copies count only where no indexed copy is healthy); after, the state says what remains to do,
//!   and every step repeats harmlessly. [`RepoError::Locked`] refuses [`Repository::rebuild_index`] while a
//!   cycle is pending, since it would index doomed packs again.
//!
//! **The state cannot be trusted blindly.** `gc/state.json` is a first line `backflow-gc-state 2 <BLAKE3 of
//! the rest, hex>` and the state as JSON; the lists are `BFLWGCL2` files whose header carries the cycle's
//! random id (also in the state) and whose footer carries their count and BLAKE3 checksum. Before a pending
//! cycle goes on, the state is checked (checksum, names that are what a gc writes: no path leaves `index/`)
//! and both lists are read whole (checksum, cycle id, record size); before the sweep deletes anything, the
//! doomed packs (in order) are checked against the pack tables of every index file present: a pack an index
//! file names is never deleted, and a list that names one stops the gc. Anything wrong stops the gc with an
//! error naming the file; nothing is deleted. Restores and backups never depend on the state (a damaged
//! `gc/condemned` is ignored by restores, with a warning) and `verify` reports it among its side files. The
//! repair is `backflow gc --reset-state` ([`GcOptions::reset_state`]), refused while any other handle is
//! open: it removes the state, the lists and `gc/forgotten/`, deleting nothing, and collects again. That is
//! safe because the packs the abandoned cycle took out of the index are then orphans, and a condemnation reads
//! the trailers of orphans: what snapshots committed during the cycle use is kept and indexed again; and with
//! no handle open, no backup can still take a forgotten manifest as its parent. Version 1 state (without
//! checksums) is refused with the same repair.
//!
//! **Damage: gc never destroys what can be saved.** A copy is *healthy* when it is not marked damaged
//! (`damaged`, below) and its pack's frame is not known damaged. A referenced digest keeps a healthy copy,
//! an indexed one first. Without one, each copy (unmarked first) is read and checked against the digest, and
//! the first that checks out is *salvaged*: stored again in a new pack, so that all old copies become dead. A
//! marked copy that checks out was a false alarm or a frame problem; one that does not is never dropped
//! either: when no copy checks out, the chunk is *unsalvageable* and its best copy stays live with its mark, so
//! `verify` goes on naming the snapshots and the next backup of a VM that still has the data stores it again
//! (once it did, the damaged copy is dead like any other). The frames (header, trailer checksum, footer) of
//! the packs with damage marks and of the orphans are checked before the mark, and those of the packs about
//! to be deleted or rewritten before their decision. A pack whose frame is damaged is never deleted: its
//! candidates (the index records pointing into it, and its trailer entries read without trusting the
//! checksum, found by walking back from the footer's place when the footer itself is damaged) are settled
//! like any copy, its live copies salvaged, and the pack, its records out of the index, is moved to
//! `quarantine/packs/XX/ID.pack` by the sweep. The damage marks of a quarantined pack stay for its chunks that
//! have no healthy copy; `backflow gc --drop-quarantine` deletes the quarantine (and then those marks: the
//! chunks are missing, which `verify` and backups treat alike). The report counts salvaged and unsalvageable
//! chunks and names the quarantined packs.
//!
//! Memory is bounded whatever the repository size: the external sorts hold 8 MiB and spill sorted runs to the
//! gc's scratch directory; one pack's records, one digest's copies, the snapshot ids, the orphan list and the
//! packs with damage marks are in memory. Time is a few sequential passes over the manifests and the index,
//! plus reading the live chunks of rewritten packs, the frames of the packs deleted or rewritten, and the
//! trailers of orphans and damaged packs. Merging the many per-session index files into one is a side effect
//! that makes lookups cheaper.
//!
//! ## Reading after damage
//! One rule says where a chunk is read from, for deduplication, restores and `verify` alike: **the first copy
//! not marked damaged wins**, in the index files in the order a handle listed them, copies of one digest in
//! file order (they are adjacent). Restores ([`Repository::locate`], [`Repository::load_chunk`]) extend the
//! search, in this order, to the chunks a pending gc condemned, and then to a *recovery index*: the trailers
//! of the packs that no intact index file names, read when a lookup first misses (every index file is then
//! checked against its checksum, and one that fails is no longer used). So a damaged or lost index file costs
//! restores speed, not data, and the run says that `rebuild-index` makes them fast again; deduplication never
//! looks there, since a gc may delete an unindexed pack. A pack whose header, footer or trailer is damaged
//! stays readable: blobs are bounded by its length instead of its trailer offset. Every blob read is checked
//! against its digest; a restore whose first copy does not decode or verify takes the next good one.
//!
//! A backup takes chunks over from its parent snapshot only when the index has a healthy copy of each:
//! [`Repository::check_parent`] finds, with index lookups only, the parent's chunks that have no unmarked
//! copy in an existing pack, and the map stages read those from the source and store them again (a parent
//! with too many of them is not used: the disk is read in full, deduplicated, with a warning).
//!
//! ## What `verify` checks
//! `verify` follows the rule above, so that a snapshot it does not name restores and one it names does not.
//! It holds its index files open for the whole run (a gc that replaces them meanwhile cannot make them
//! vanish: the protection restores get) and skips snapshots forgotten while it runs. Without reading data:
//! every manifest's checksum and structure, every index file's checksum and order, that every pack the index
//! names (and every pack none names) exists with an intact footer and trailer (checksum) and covers the
//! records that point into it, the blobs of packs with a damaged frame (read and checked: restores read them
//! that way), and that every referenced digest has a copy the rule finds. With `read_data`, in addition, every
//! blob of every pack is read, decoded and hashed against its digest. Each damaged chunk is reported with its
//! digest, pack and offset, what is wrong, and the ids of the snapshots that use it (found by a second pass
//! over the manifests, so memory stays bounded); side files are reported with what was done about them. See
//! [`VerifyReport`].
//!
//! ## Encryption at rest
//! An encrypted repository (`config` has `encryption`, [`crypto::EncryptionConfig`]) stores every object
//! except `config`, `config.copy`, `keys/`, `locks/` and `users/` sealed: XChaCha20-Poly1305 in 64 KiB
//! segments, each bound to its index, to being the last or not, and to the object's name
//! ([`crypto`] has the layout). It is a [`store::Store`] wrapper ([`store::sealed::SealedStore`]), so
//! nothing above the seam changes: the formats below are the plaintext of sealed objects, positioned
//! reads stay positioned, and lengths are plaintext lengths. Chunk ids are BLAKE3 keyed with half of the
//! master key ([`Repository::digest_of`]; the all-zero digest still means zeros), so identical data in two
//! repositories has different ids and a digest reveals nothing. The master key is kept in `keys/<id>.key`,
//! sealed under a passphrase through Argon2id, one file per passphrase ([`keys`] has the file format and
//! the rules for adding and removing). Opening unlocks it with the process's passphrase
//! ([`keys::set_password_file`]) and keeps it for the process, so many handles pay Argon2id once. A
//! segment that fails authentication is damage like a checksum failure: the object was altered,
//! truncated, renamed or copied from another repository.
//!
//! `config` is version 2 ([`CONFIG_VERSION`]); version 1, which cannot carry `encryption`, is read as a
//! plain version 2 (no migration). Binary files keep [`FORMAT_VERSION`] 1: encryption changed none.
//!
//! ## Limits
//! Chunk sizes 64 KiB..=16 MiB; encoded blobs at most [`MAX_STORED_LEN`]; pack target 64 KiB..=1 GiB;
//! manifest metadata at most 16 MiB; snapshot and session ids are `[A-Za-z0-9_-]{1,64}`. Disk names are
//! 1 to [`MAX_NAME_LEN`] characters from `A-Z a-z 0-9 . _ -`, the first a letter, a digit or `_`, and VM names
//! 1 to [`MAX_NAME_LEN`] characters without `/`, control characters or a space at either end, so that a name is
//! never a path or a second line (see [`check_disk_name`], [`check_vm_name`]; a snapshot's identity may also be
//! a canonical absolute path of at most [`MAX_PATH_IDENTITY_LEN`] bytes, [`check_identity`]): a session refuses others, and
//! restores refuse a manifest holding one before they write a file of that name. Each open
//! [`Repository`] keeps one file descriptor per index file and up to 16 open packs. Reading never allocates
//! more than a chunk's bounded length from a value read on disk.
//!
//! ## Damaged chunks
//! `verify` finds damaged *copies* of chunks: a blob that does not decode or hash to its digest, or one in a
//! pack that is missing, truncated or damaged. [`Repository::verify_and_mark`] (what `backflow verify` and
//! health-check jobs run) records each as `digest pack offset` in the text file `damaged` at the root (header
//! `backflow-damaged 2`, one mark per line, sorted, then a checksum line), merged with the marks already there
//! under the exclusive lock `damaged.lock`, written whole and durably like every other object. Marks are locations, never digests. `verify` adds them, and with `read_data` drops those whose
//! copy reads back whole; a gc drops the marks of the packs it deleted and of quarantined copies whose chunk
//! it salvaged, and keeps those of chunks it could not salvage.
//!
//! [`Repository::lookup`] never returns a marked copy: it goes on to the next index file, where a later
//! backup may have stored the chunk again. That is the whole of self-healing:
//! - dedup's lookup misses a chunk whose only copies are marked, so a backup that reads the data stores it;
//! - the map stages ask [`Repository::check_parent`] once per disk, and an incremental reads the parent's
//!   chunks without a healthy copy instead of referencing them unchanged;
//! - older snapshots reference the same digest, so they restore from the new copy; no manifest changes.
//!
//! A handle reads `damaged` at its first lookup and checks at most once a second whether it was replaced
//! ([`store::Store::stat`]),
//! so a running backup sees new marks within a second. `verify` reports a damaged
//! copy that has a healthy copy elsewhere as healed ([`ChunkProblem::healed`]): it affects no restore point
//! and does not fail the check. A `damaged` file that is damaged blocks nothing: readers go on with the marks
//! they could read (a lost mark costs what it did before marks existed, until the next `verify --read-data`
//! marks it again), `verify` reports it and writes it again.
//!
//! ## Code layout
//! The format's files, one module each: `config`, `pack` (pack files, read), `index`, `snapshot`, `damaged`
//! (marks), `history` (session records). Writing: `session` (a backup's scratch, index and commit) with
//! `session/pack_writer` (packs written and published). Reading: `repository` (the handle: lookups, reads,
//! forget, index rebuild), `recovery` (the index of packs no index file names), `readable` (parent checks).
//! `gc` is the collection's run; `gc_state` what it shares with every handle (the registry of open handles,
//! the pending cycle's state and lists, the fence, the quarantine) and `lock` the repository's locks: neither
//! uses the handle or the gc, so that those depend on them and not on each other. `verify` runs its passes
//! one method each. `copy` copies restore points from another repository through a session that keeps their
//! id, time and host (a commit that finds the id taken fails instead of choosing another). `sort` (external
//! sort), `scratch`, `format` (binary helpers), `ids`, `names`, `retention`, `types` and `error` serve them
//! all. `store` is the seam to the storage: the traits, a backend per kind of storage (`store/fs.rs` is the
//! only module that touches a repository's files), and where a location string leads. Encryption: `crypto`
//! (keys, keyed ids, the sealed layout), `keys` (key files, the passphrase), `store/sealed` (the wrapper).

mod config;
mod copy;
pub mod crypto;
mod damaged;
mod error;
mod format;
mod gc;
mod gc_state;
mod history;
#[cfg(feature = "test-hooks")]
mod hooks;
mod ids;
mod index;
pub mod keys;
mod lock;
mod names;
mod pack;
mod readable;
mod recovery;
mod repository;
mod resolve;
mod retention;
mod scratch;
mod session;
mod snapshot;
mod sort;
pub mod store;
mod types;
mod verify;

pub use config::{
    CHUNK_SIZE_ALIGN, CONFIG_VERSION, DEFAULT_CHUNK_SIZE, DEFAULT_PACK_TARGET_SIZE, InitOptions,
    MAX_CHUNK_SIZE, MAX_PACK_TARGET_SIZE, MAX_STORED_LEN, MIN_CHUNK_SIZE, MIN_PACK_TARGET_SIZE,
    RepositoryConfig,
};
#[cfg(feature = "test-hooks")]
pub use copy::KILL_AFTER as COPY_KILL_AFTER;
pub use copy::{
    COPY_BATCH, COPY_QUEUE_BATCHES, ChunkEncoder, CopiedSnapshot, CopyCounts, CopyError,
    CopyOptions, CopyReport, DEFAULT_COPY_WORKERS, RECENT_SENT, copy,
};
pub use damaged::{DamageMarks, DamagedCopy};
pub use error::{RepoError, Result};
pub use format::FORMAT_VERSION;
pub use gc::{DEFAULT_REPACK_THRESHOLD, GcOptions};
#[cfg(feature = "test-hooks")]
pub use gc::{KILL_AT as GC_KILL_AT, KILL_POINTS as GC_KILL_POINTS};
pub use gc_state::{GcReport, QUARANTINE_DIR};
pub use ids::rfc3339;
pub use names::{
    BadName, IDENTITY_RULE, MAX_NAME_LEN, MAX_PATH_IDENTITY_LEN, NAME_RULE, NameKind, VM_NAME_RULE,
    check_disk_name, check_identity, check_vm_name, identity_for_path, is_valid_name,
};
pub use pack::{
    PackEntry, PackTrailer, decode, decode_into, read_pack_trailer, read_stored_pack_trailer,
};
pub use readable::ParentCheck;
pub use repository::{RebuildReport, Repository};
pub use resolve::LATEST;
pub use retention::{Decision, KeepPolicy, plan};
pub use session::{BackupSession, PackWriter};
pub use snapshot::{DiskInfo, DiskMeta, Snapshot, SnapshotInfo, SnapshotMeta};
pub use store::{BadLocation, Location, S3Location};
pub use types::{
    BadDigest, ChunkLocation, ChunkRef, Codec, DamagedFile, Digest, PackId, StoredChunk, Usage,
};
pub use verify::{ChunkProblem, ProblemKind, VerifyReport};

impl Repository {
    /// Checks the repository; see "What `verify` checks" above. Problems are in the report, not an `Err`: an
    /// `Err` means verify itself could not run (the repository directory is unreadable).
    pub fn verify(&self, read_data: bool) -> Result<VerifyReport> {
        verify::verify(self, read_data).map(|(report, _)| report)
    }

    /// Removes what no snapshot references; see "Garbage collection" above. Runs next to backups, forgets and
    /// restores; refused with a retryable [`RepoError::Locked`] while another gc or an index rebuild runs.
    pub fn gc(&self, options: &GcOptions) -> Result<GcReport> {
        gc::gc(self, options)
    }
}

#[cfg(test)]
mod crash_tests;

//! Fleet files (`kvmerge run --fleet FILE`): one TOML file describing a heterogeneous set of VMs,
//! parsed into the same `VmConfig`s the command line produces.
//!
//! ```toml
//! # Values for every [[vm]] that does not set them (the whole table and each key are optional).
//! [defaults]
//! kernel = "guest-images/out/bzImage"
//! initrd = "guest-images/out/initramfs.cpio.gz"
//! cmdline = "console=ttyS0 reboot=k panic=-1"
//! memory = "256M"
//! vcpus = 1
//! dedup = "full"
//! group = "default"
//!
//! # One table per kind of VM; `count` identical copies of each, in file order.
//! [[vm]]
//! name = "web"                     # a label for error messages only
//! count = 4
//! cmdline = "console=ttyS0 kvmerge.fill=64 id={index}"
//!
//! [[vm]]
//! name = "batch"
//! vcpus = 2
//! memory = 512                     # a bare integer is MiB, as with --memory
//!
//! [[vm]]
//! name = "tenant-b"
//! kernel = "/srv/images/payload.elf"
//! initrd = ""                      # no initrd, whatever [defaults] says
//! cmdline = "fill=16 then=exit:0"
//! memory = "64M"
//! dedup = "zero"
//! group = "tenant-b"
//! ```
//!
//! Keys (all optional in `[defaults]`; in `[[vm]]` a key overrides the default):
//!
//! | key       | meaning                                                   | when unset               |
//! |-----------|-----------------------------------------------------------|--------------------------|
//! | `kernel`  | bzImage, ELF vmlinux or payload ELF; required somewhere   | —                        |
//! | `initrd`  | initial ramdisk; `""` means none                          | none                     |
//! | `cmdline` | kernel command line; `{index}` is the guest's fleet index | `--cmdline`'s default    |
//! | `memory`  | `"256M"`, `"1G"`, `"1.5G"` (as `--memory`) or integer MiB | `"128M"`                 |
//! | `vcpus`   | 1 to 254                                                  | 1                        |
//! | `dedup`   | `"full"`, `"zero"` or `"off"` (as `--dedup`)              | `"full"`                 |
//! | `group`   | trust group: the VMs that may share contents through KSM  | `"default"`              |
//! | `count`   | `[[vm]]` only: identical copies, 1 to 65536 (also in all) | 1                        |
//! | `name`    | `[[vm]]` only: a label for error messages                 | `#N` for the Nth `[[vm]]` |
//!
//! Relative `kernel` and `initrd` paths are resolved against the directory of the fleet file, so
//! a fleet file keeps working from any working directory; `~` is not expanded. Guest indices
//! (`vmK` on the console, `{index}` in the command line) run across the whole expanded fleet:
//! above, the four `web` guests are 0-3, `batch` is 4 and `tenant-b` is 5.
//!
//! Unknown keys, wrong types and out-of-range values are errors of one line, `FILE:LINE: message`.
//! Rules that involve several values at once (guest RAM a multiple of 4 KiB and at least 2 MiB, at
//! most one trust group in `full`, because the kernel has a single KSM pool per host) are
//! `Config::validate`'s, which runs on fleets and command lines alike.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, Unexpected, Visitor};
use toml::Spanned;

use crate::config::{self, DEFAULT_GROUP, DedupMode, VmConfig};

/// The same bound as `--count`, both per `[[vm]]` and for the whole fleet: far above what fits in
/// a host's memory, low enough that a typo does not allocate a billion VM descriptions.
pub const MAX_VMS: u32 = 65536;
/// Fleet files take the same vCPU bound as `--vcpus` (one constant, in config).
pub use crate::config::MAX_VCPUS;
/// The largest fleet file kvmerge reads: a fleet of thousands of distinct kinds fits in a few
/// hundred KiB, and a wrong path (a log, /dev/zero) is refused before it is read.
pub const MAX_FLEET_FILE: u64 = 1 << 20;
/// Most bytes of text (command line, paths, group) the expanded fleet may hold: every VM of a
/// `[[vm]]` with `count` gets its own copy, so without a bound a small file could make kvmerge
/// allocate gigabytes before any other check (65536 VMs with 2 KiB command lines fit).
pub const MAX_FLEET_TEXT: u64 = 256 << 20;
/// What a fleet VM gets without `memory`: the `--memory` default.
pub const DEFAULT_MEMORY: u64 = 128 << 20;
/// What a fleet VM gets without `cmdline`: the `--cmdline` default.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read fleet file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not a regular file, too large, not UTF-8.
    #[error("{0}")]
    File(String),
    /// A command-line value that is wrong whatever the host.
    #[error("{0}")]
    Usage(String),
    /// `line` is 1-based; `None` when the problem is the file as a whole.
    #[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        file: String,
        line: Option<usize>,
        message: String,
    },
}

/// Reads the fleet file at `path` and expands it into one `VmConfig` per guest, in index order.
pub fn load(path: &Path) -> Result<Vec<VmConfig>, Error> {
    let bytes = crate::loader::read_regular_file("fleet file", path, MAX_FLEET_FILE).map_err(
        |e| match e {
            crate::loader::Error::Read { source, .. } => Error::Read {
                path: path.to_path_buf(),
                source,
            },
            other => Error::File(other.to_string()),
        },
    )?;
    let text = String::from_utf8(bytes).map_err(|_| {
        Error::File(format!(
            "fleet file {} is not UTF-8 text: give a TOML fleet file (docs/fleet.md)",
            path.display()
        ))
    })?;
    // `fleet.toml` has the parent "", which joins to paths relative to the working directory:
    // the file's own directory again.
    let base = path.parent().unwrap_or(Path::new(""));
    parse(&text, base, &path.display().to_string())
}

/// Parses fleet-file `text`; relative paths are resolved against `base_dir` and errors name
/// `file_name`.
pub fn parse(text: &str, base_dir: &Path, file_name: &str) -> Result<Vec<VmConfig>, Error> {
    let error = |span: Option<Range<usize>>, message: &str| Error::Invalid {
        file: file_name.to_string(),
        line: span.map(|s| line_of(text, s.start)),
        // Messages may quote the user's values; keep the error one line whatever they hold.
        message: message.replace(['\n', '\r'], " "),
    };
    let fleet: FleetFile = toml::from_str(text).map_err(|e| error(e.span(), e.message()))?;
    if fleet.vm.0.is_empty() {
        return Err(error(
            None,
            "no [[vm]] tables: a fleet file describes its VMs with one [[vm]] table each",
        ));
    }
    let defaults = fleet.defaults;
    let mut vms = Vec::new();
    let mut text_bytes = 0u64;
    for (index, entry) in fleet.vm.0.into_iter().enumerate() {
        let span = entry.span();
        let vm = entry.into_inner();
        let label = match &vm.name {
            Some(name) => format!("[[vm]] '{name}'"),
            None => format!("[[vm]] #{}", index + 1),
        };
        let kernel = vm
            .kernel
            .or_else(|| defaults.kernel.clone())
            .ok_or_else(|| {
                error(
                    Some(span.clone()),
                    &format!("{label} has no kernel: set `kernel` in it or in [defaults]"),
                )
            })?;
        let count = vm.count.map_or(1, |c| c.0);
        let total = vms.len() as u64 + u64::from(count);
        if total > u64::from(MAX_VMS) {
            return Err(error(
                Some(span),
                &format!("{label} brings the fleet to {total} VMs; at most {MAX_VMS} per run"),
            ));
        }
        let config = VmConfig {
            kernel: base_dir.join(kernel.0),
            // `initrd = ""` clears an initrd set in [defaults] (payload guests take none).
            initrd: vm
                .initrd
                .or_else(|| defaults.initrd.clone())
                .filter(|p| !p.is_empty())
                .map(|p| base_dir.join(p)),
            cmdline: vm
                .cmdline
                .or_else(|| defaults.cmdline.clone())
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            memory: vm
                .memory
                .or(defaults.memory)
                .map_or(DEFAULT_MEMORY, |m| m.0),
            vcpus: vm.vcpus.or(defaults.vcpus).map_or(1, |v| v.0),
            dedup: vm.dedup.or(defaults.dedup).map_or(DedupMode::Full, |d| d.0),
            group: vm
                .group
                .or_else(|| defaults.group.clone())
                .map_or_else(|| DEFAULT_GROUP.to_string(), |g| g.0),
        };
        let text = config.kernel.as_os_str().len()
            + config.initrd.as_ref().map_or(0, |p| p.as_os_str().len())
            + config.cmdline.len()
            + config.group.len();
        text_bytes += u64::from(count) * text as u64;
        if text_bytes > MAX_FLEET_TEXT {
            return Err(error(
                Some(span),
                &format!(
                    "{label} brings the fleet's command lines and paths to {} MiB (each of its \
                     {count} VMs holds a copy); at most {} MiB per run: shorten them or lower count",
                    text_bytes >> 20,
                    MAX_FLEET_TEXT >> 20
                ),
            ));
        }
        vms.extend(std::iter::repeat_n(config, count as usize));
    }
    Ok(vms)
}

/// One VM described in JSON (`kvmerge serve`'s create call): the keys and checks of a `[[vm]]`
/// table of a fleet file, without `[defaults]`; paths must be absolute (the server's working
/// directory is not the client's). Returns the table's `name` and `count` with the VM.
pub fn vm_from_json(value: serde_json::Value) -> Result<(Option<String>, u32, VmConfig), String> {
    let vm: VmTable = serde_json::from_value(value.clone()).map_err(|e| {
        // serde_json does not say which key was wrong: find it, one key at a time.
        let culprit = value.as_object().and_then(|map| {
            map.iter().find_map(|(k, v)| {
                let one = serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect());
                serde_json::from_value::<VmTable>(one)
                    .err()
                    .map(|e| format!("{}: {e}", k.escape_debug()))
            })
        });
        culprit.unwrap_or_else(|| e.to_string())
    })?;
    let kernel = vm
        .kernel
        .ok_or("no kernel: give \"kernel\": \"/absolute/path/to/kernel\"")?;
    let absolute = |what: &str, p: String| {
        if Path::new(&p).is_absolute() {
            Ok(PathBuf::from(p))
        } else {
            Err(format!(
                "{what} '{}' is not an absolute path (the server does not know the client's \
                 working directory)",
                p.escape_debug()
            ))
        }
    };
    let config = VmConfig {
        kernel: absolute("kernel", kernel.0)?,
        initrd: match vm.initrd.filter(|p| !p.is_empty()) {
            Some(p) => Some(absolute("initrd", p)?),
            None => None,
        },
        cmdline: vm.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
        memory: vm.memory.map_or(DEFAULT_MEMORY, |m| m.0),
        vcpus: vm.vcpus.map_or(1, |v| v.0),
        dedup: vm.dedup.map_or(DedupMode::Full, |d| d.0),
        group: vm.group.map_or_else(|| DEFAULT_GROUP.to_string(), |g| g.0),
    };
    Ok((vm.name, vm.count.map_or(1, |c| c.0), config))
}

/// The 1-based line holding byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

// The file as written. `Option` everywhere so that a [[vm]] key can be told apart from an unset
// one that falls back to [defaults]; the newtypes check each value where toml still knows its
// line. `[defaults]` and `[[vm]]` are separate structs because `deny_unknown_fields` does not
// combine with `#[serde(flatten)]`.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    vm: VmTables,
}

/// The `[[vm]]` tables, by hand so that a `[vm]` written with single brackets is told how to fix it.
#[derive(Default)]
struct VmTables(Vec<Spanned<VmTable>>);

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    kernel: Option<Kernel>,
    initrd: Option<String>,
    cmdline: Option<String>,
    memory: Option<Memory>,
    vcpus: Option<Vcpus>,
    dedup: Option<Dedup>,
    group: Option<Group>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmTable {
    name: Option<String>,
    count: Option<Count>,
    kernel: Option<Kernel>,
    initrd: Option<String>,
    cmdline: Option<String>,
    memory: Option<Memory>,
    vcpus: Option<Vcpus>,
    dedup: Option<Dedup>,
    group: Option<Group>,
}

#[derive(Clone)]
struct Kernel(String);

#[derive(Clone, Copy)]
struct Memory(u64);

#[derive(Clone, Copy)]
struct Vcpus(u8);

#[derive(Clone, Copy)]
struct Count(u32);

#[derive(Clone, Copy)]
struct Dedup(DedupMode);

#[derive(Clone)]
struct Group(String);

impl<'de> Deserialize<'de> for Kernel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        non_empty(d, "a kernel path").map(Kernel)
    }
}

impl<'de> Deserialize<'de> for Group {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        non_empty(d, "a trust group name").map(Group)
    }
}

impl<'de> Deserialize<'de> for Vcpus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = d.deserialize_i64(Ranged("a vCPU count", 1, MAX_VCPUS.into()))?;
        Ok(Vcpus(n as u8))
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = d.deserialize_i64(Ranged("a VM count", 1, MAX_VMS.into()))?;
        Ok(Count(n as u32))
    }
}

impl<'de> Deserialize<'de> for Dedup {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const MODES: &[&str] = &["full", "zero", "off"];
        let mode = d.deserialize_str(Text("a dedup mode"))?;
        match mode.as_str() {
            "full" => Ok(Dedup(DedupMode::Full)),
            "zero" => Ok(Dedup(DedupMode::Zero)),
            "off" => Ok(Dedup(DedupMode::Off)),
            other => Err(de::Error::unknown_variant(other, MODES)),
        }
    }
}

impl<'de> Deserialize<'de> for Memory {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MemoryVisitor).map(Memory)
    }
}

fn non_empty<'de, D: Deserializer<'de>>(d: D, what: &'static str) -> Result<String, D::Error> {
    let s = d.deserialize_str(Text(what))?;
    if s.is_empty() {
        return Err(de::Error::invalid_value(Unexpected::Str(&s), &what));
    }
    Ok(s)
}

/// A string, with `.0` naming what it is in type errors ("expected a dedup mode").
struct Text(&'static str);

impl Visitor<'_> for Text {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
}

/// An integer in `.1..=.2` (so callers may narrow it with `as`), with `.0` naming what it is.
struct Ranged(&'static str, i64, i64);

impl Visitor<'_> for Ranged {
    type Value = i64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} from {} to {}", self.0, self.1, self.2)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
        if (self.1..=self.2).contains(&v) {
            Ok(v)
        } else {
            Err(E::invalid_value(Unexpected::Signed(v), &self))
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
        match i64::try_from(v) {
            Ok(v) => self.visit_i64(v),
            Err(_) => Err(E::invalid_value(Unexpected::Unsigned(v), &self)),
        }
    }
}

impl<'de> Deserialize<'de> for VmTables {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(VmTablesVisitor).map(VmTables)
    }
}

struct VmTablesVisitor;

impl<'de> Visitor<'de> for VmTablesVisitor {
    type Value = Vec<Spanned<VmTable>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of [[vm]] tables (double brackets)")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut tables = Vec::new();
        while let Some(table) = seq.next_element()? {
            tables.push(table);
        }
        Ok(tables)
    }
}

/// `memory`: a `--memory` string, or a bare integer of MiB like a bare `--memory` number.
struct MemoryVisitor;

impl Visitor<'_> for MemoryVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a size such as \"256M\" or \"1G\", or a whole number of MiB")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v)
            .ok()
            .and_then(|mib| mib.checked_mul(1 << 20))
            .ok_or_else(|| E::invalid_value(Unexpected::Signed(v), &self))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        v.checked_mul(1 << 20)
            .ok_or_else(|| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        config::parse_size(v).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = "/srv/fleets";

    fn fleet(text: &str) -> Result<Vec<VmConfig>, Error> {
        parse(text, Path::new(BASE), "fleet.toml")
    }

    /// The one-line message of a fleet that must be rejected.
    fn rejected(text: &str) -> String {
        let msg = fleet(text)
            .expect_err("the fleet should be rejected")
            .to_string();
        assert!(!msg.contains('\n'), "one line, got {msg:?}");
        msg
    }

    fn validate(vms: Vec<VmConfig>) -> Result<(), config::Error> {
        Config::new(vms).validate()
    }

    #[test]
    fn heterogeneous_fleet_expands_in_order() {
        let vms = fleet(
            r#"
            [defaults]
            kernel = "images/bzImage"
            initrd = "images/initramfs.cpio.gz"
            memory = "256M"
            dedup = "full"

            [[vm]]
            name = "web"
            count = 3
            cmdline = "console=ttyS0 id={index}"

            [[vm]]
            vcpus = 2
            memory = 512

            [[vm]]
            kernel = "/abs/payload.elf"
            initrd = ""
            memory = "64M"
            dedup = "zero"
            group = "tenant-b"
            "#,
        )
        .unwrap();
        assert_eq!(vms.len(), 5);
        for vm in &vms[..3] {
            assert_eq!(vm.kernel, Path::new("/srv/fleets/images/bzImage"));
            assert_eq!(
                vm.initrd.as_deref(),
                Some(Path::new("/srv/fleets/images/initramfs.cpio.gz"))
            );
            assert_eq!(vm.memory, 256 << 20);
            assert_eq!(vm.vcpus, 1);
            assert_eq!(vm.dedup, DedupMode::Full);
            assert_eq!(vm.group, DEFAULT_GROUP);
        }
        assert_eq!(vms[2].cmdline_for(2), "console=ttyS0 id=2");
        assert_eq!(vms[3].memory, 512 << 20, "bare integers are MiB");
        assert_eq!(vms[3].vcpus, 2);
        assert_eq!(vms[3].cmdline, DEFAULT_CMDLINE);
        assert_eq!(vms[4].kernel, Path::new("/abs/payload.elf"));
        assert_eq!(vms[4].initrd, None, "an empty initrd clears the default");
        assert_eq!(vms[4].memory, 64 << 20);
        assert_eq!(vms[4].dedup, DedupMode::Zero);
        assert_eq!(vms[4].group, "tenant-b");
        // One KSM group plus a zero-only group is the supported way to isolate a tenant.
        assert_eq!(validate(vms), Ok(()));
    }

    #[test]
    fn unset_keys_take_the_command_line_defaults() {
        let vms = fleet("[[vm]]\nkernel = 'k'\n").unwrap();
        assert_eq!(vms.len(), 1);
        let vm = &vms[0];
        assert_eq!(vm.kernel, Path::new("/srv/fleets/k"));
        assert_eq!(vm.initrd, None);
        assert_eq!(vm.cmdline, DEFAULT_CMDLINE);
        assert_eq!(vm.memory, DEFAULT_MEMORY);
        assert_eq!(vm.vcpus, 1);
        assert_eq!(vm.dedup, DedupMode::Full);
        assert_eq!(vm.group, DEFAULT_GROUP);
    }

    #[test]
    fn a_fleet_needs_vms() {
        for text in ["", "# nothing\n", "[defaults]\nkernel = 'k'\n", "vm = []\n"] {
            assert_eq!(
                rejected(text),
                "fleet.toml: no [[vm]] tables: a fleet file describes its VMs with one [[vm]] \
                 table each"
            );
        }
    }

    #[test]
    fn every_vm_needs_a_kernel() {
        let text = "[[vm]]\nkernel = 'k'\n\n[[vm]]\nname = 'db'\ncount = 2\n\n[[vm]]\nvcpus = 2\n";
        let msg = rejected(text);
        assert_eq!(
            msg,
            "fleet.toml:4: [[vm]] 'db' has no kernel: set `kernel` in it or in [defaults]"
        );
        let text = "[[vm]]\nkernel = 'k'\n[[vm]]\nvcpus = 2\n";
        assert!(rejected(text).starts_with("fleet.toml:3: [[vm]] #2 has no kernel"));
        assert!(rejected("[[vm]]\nkernel = ''\n").starts_with("fleet.toml:2: invalid value"));
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let msg = rejected("[[vm]]\nkernel = 'k'\nmemroy = '64M'\n");
        assert!(
            msg.starts_with("fleet.toml:3: unknown field `memroy`, expected one of `name`"),
            "{msg}"
        );
        let msg = rejected("[defaults]\ncount = 2\n[[vm]]\nkernel = 'k'\n");
        assert!(
            msg.starts_with("fleet.toml:2: unknown field `count`, expected one of `kernel`"),
            "{msg}"
        );
        assert_eq!(
            rejected("[vm]\nkernel = 'k'\n"),
            "fleet.toml:1: invalid type: map, expected an array of [[vm]] tables (double brackets)"
        );
        let msg = rejected("[default]\nmemory = 1\n[[vm]]\nkernel = 'k'\n");
        assert!(
            msg.starts_with("fleet.toml:1: unknown field `default`, expected `defaults` or `vm`"),
            "{msg}"
        );
    }

    #[test]
    fn bad_values_name_the_line() {
        for (value, expected) in [
            (
                "memory = 'lots'",
                "fleet.toml:3: invalid size 'lots': use a number with an optional K, M, G or T \
                 suffix (bare numbers are MiB)",
            ),
            (
                "memory = true",
                "fleet.toml:3: invalid type: boolean `true`, expected a size such as \"256M\" or \
                 \"1G\", or a whole number of MiB",
            ),
            (
                "memory = -64",
                "fleet.toml:3: invalid value: integer `-64`, expected a size such as \"256M\" or \
                 \"1G\", or a whole number of MiB",
            ),
            (
                "count = 0",
                "fleet.toml:3: invalid value: integer `0`, expected a VM count from 1 to 65536",
            ),
            (
                "vcpus = 0",
                "fleet.toml:3: invalid value: integer `0`, expected a vCPU count from 1 to 254",
            ),
            (
                "vcpus = 300",
                "fleet.toml:3: invalid value: integer `300`, expected a vCPU count from 1 to 254",
            ),
            (
                "vcpus = '2'",
                "fleet.toml:3: invalid type: string \"2\", expected a vCPU count from 1 to 254",
            ),
            (
                "dedup = 'maybe'",
                "fleet.toml:3: unknown variant `maybe`, expected one of `full`, `zero`, `off`",
            ),
            (
                "dedup = 1",
                "fleet.toml:3: invalid type: integer `1`, expected a dedup mode",
            ),
            (
                "group = ''",
                "fleet.toml:3: invalid value: string \"\", expected a trust group name",
            ),
        ] {
            assert_eq!(
                rejected(&format!("[[vm]]\nkernel = 'k'\n{value}\n")),
                expected
            );
        }
    }

    #[test]
    fn toml_syntax_errors_are_one_line() {
        let msg = rejected("[[vm]]\nkernel = 'k'\ncmdline = \"quiet\nvcpus = 1\n");
        assert!(msg.starts_with("fleet.toml:3: "), "{msg}");
        let msg = rejected("[[vm]]\nkernel = 'k'\nkernel = 'j'\n");
        assert!(msg.starts_with("fleet.toml:3: "), "{msg}");
    }

    #[test]
    fn fleet_size_is_bounded() {
        let text = "[defaults]\nkernel = 'k'\n[[vm]]\ncount = 65536\n[[vm]]\nname = 'one-more'\n";
        assert_eq!(
            rejected(text),
            "fleet.toml:5: [[vm]] 'one-more' brings the fleet to 65537 VMs; at most 65536 per run"
        );
    }

    #[test]
    fn expanded_text_is_bounded() {
        // Found with tests/fuzz (fleet): a 100 KB file asked for 6.5 GB of VM descriptions.
        let long = "x".repeat(100_000);
        let text = format!("[[vm]]\nkernel = 'k'\ncount = 65536\ncmdline = '{long}'\n");
        assert_eq!(
            rejected(&text),
            "fleet.toml:1: [[vm]] #1 brings the fleet's command lines and paths to 6251 MiB (each \
             of its 65536 VMs holds a copy); at most 256 MiB per run: shorten them or lower count"
        );
        let text = "[[vm]]\nkernel = 'k'\ncount = 65536\ncmdline = 'console=ttyS0 quiet'\n";
        assert_eq!(fleet(text).unwrap().len(), 65536);
    }

    #[test]
    fn memory_rules_stay_with_config_validate() {
        // 1.5K parses as a size; that guest RAM must be whole pages is Config::validate's rule.
        let vms = fleet("[[vm]]\nkernel = 'k'\nmemory = '1.5K'\n").unwrap();
        assert_eq!(vms[0].memory, 1536);
        assert_eq!(
            validate(vms).unwrap_err().to_string(),
            "--memory 1536 bytes: must be a multiple of 4 KiB"
        );
    }

    #[test]
    fn two_trust_groups_cannot_both_use_ksm() {
        let vms = fleet(
            "[defaults]\nkernel = 'k'\n\
             [[vm]]\ngroup = 'tenant-a'\n\
             [[vm]]\ngroup = 'tenant-b'\ndedup = 'full'\n",
        )
        .unwrap();
        let msg = validate(vms).unwrap_err().to_string();
        assert!(
            msg.contains("'tenant-a'")
                && msg.contains("'tenant-b'")
                && msg.contains("one KSM pool"),
            "{msg}"
        );
        // Same group in full, or a second group without KSM, is accepted.
        for second in [
            "group = 'tenant-a'",
            "group = 'tenant-b'\ndedup = 'zero'",
            "dedup = 'off'",
        ] {
            let text =
                format!("[defaults]\nkernel = 'k'\n[[vm]]\ngroup = 'tenant-a'\n[[vm]]\n{second}\n");
            assert_eq!(validate(fleet(&text).unwrap()), Ok(()), "{second}");
        }
    }

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fleet")
    }

    fn fixture(name: &str) -> PathBuf {
        fixtures().join(name)
    }

    #[test]
    fn load_resolves_paths_against_the_file() {
        let vms = load(&fixture("mixed.toml")).unwrap();
        let dir = fixtures();
        assert_eq!(vms.len(), 6);
        assert_eq!(vms[0].kernel, dir.join("../../../guest-images/out/bzImage"));
        assert_eq!(
            vms[0].initrd,
            Some(dir.join("../../../guest-images/out/initramfs.cpio.gz"))
        );
        assert!(vms[..4].iter().all(|vm| vm.memory == 256 << 20));
        assert_eq!(vms[4].vcpus, 2);
        assert_eq!(
            vms[5].kernel,
            dir.join("../../../guest-images/out/payload.elf")
        );
        assert_eq!(vms[5].initrd, None);
        assert_eq!(vms[5].dedup, DedupMode::Zero);
        assert_eq!(validate(vms), Ok(()));
    }

    #[test]
    fn load_reports_the_file_path() {
        let path = fixture("typo.toml");
        let msg = load(&path).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("{}:7: unknown field `memroy`", path.display())),
            "{msg}"
        );
        let vms = load(&fixture("two-full-groups.toml")).unwrap();
        assert!(matches!(
            validate(vms),
            Err(config::Error::GroupsShareKsm(a, b)) if a == "tenant-a" && b == "tenant-b"
        ));
        let path = fixture("missing.toml");
        let msg = load(&path).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "cannot read fleet file {}: No such file or directory (os error 2)",
                path.display()
            )
        );
    }
}

//! The views' JSON (feature `serde`) and OpenAPI schemas (feature `openapi`), in the
//! shapes of the inspector's HTTP API models, so that a view can be served as it is.
//!
//! Most views derive `Serialize` and `Deserialize` where they are defined, with field
//! attributes where the API's names or forms differ from the struct's. The views whose
//! JSON has fields computed from others (a process's `args` and `exited`, a memory
//! area's `perms`, a report's `clean`) are serialized through the shapes here. A
//! [`Process`] has no `Deserialize`: its `cmdline_error` is an [`crate::Error`], which
//! text cannot be turned back into; deserialize a [`DecodedProcess`], which keeps the text.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::checks::{CheckReport, CheckRun, Finding};
use crate::wire::DecodedProcess;
use crate::{Process, Vma};

/// [`Finding::id`]: a number where the finding has one, `null` where it has none (-1).
pub(crate) mod finding_id {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(crate) fn serialize<S: Serializer>(id: &i64, s: S) -> Result<S::Ok, S::Error> {
        (*id >= 0).then_some(*id).serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        Ok(Option::<i64>::deserialize(d)?.filter(|id| *id >= 0).unwrap_or(-1))
    }

    /// An absent `id` is no id.
    pub(crate) fn none() -> i64 {
        -1
    }
}

// The JSON of `Process` and `DecodedProcess`; its doc is the API's description.
/// A process of the source.
#[derive(Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Process))]
pub(crate) struct ProcessJson {
    pid: i32,
    tgid: i32,
    /// `real_parent->tgid` (0 for children of the idle task).
    ppid: i32,
    uid: u32,
    euid: u32,
    gid: u32,
    comm: String,
    /// Arguments, read from the process's own memory (split at NULs, lossy UTF-8).
    args: Vec<String>,
    /// `__state` (6.x) or `state` (older), as stored (0 = running).
    state: u64,
    /// Nanoseconds of monotonic time at fork.
    start_time: u64,
    kernel_thread: bool,
    /// `exit_state` is not 0: a zombie or a dead task.
    exited: bool,
    /// Physical address of its page-table root.
    pgd: Option<u64>,
    /// Kernel address of its task_struct.
    task: u64,
    /// Why the command line could not be read.
    cmdline_error: Option<String>,
    /// `task_struct.flags`.
    flags: u64,
    /// 0 while alive, EXIT_ZOMBIE (0x20) or EXIT_DEAD (0x10) after exit.
    exit_state: u64,
    /// Kernel address of its `mm_struct` (0 for kernel threads).
    mm: u64,
    arg_start: u64,
    arg_end: u64,
    /// The command line was longer than the bytes kept.
    cmdline_truncated: bool,
}

impl ProcessJson {
    fn new(p: Process, cmdline_error: Option<String>) -> Self {
        ProcessJson {
            args: p.args(),
            pid: p.pid,
            tgid: p.tgid,
            ppid: p.ppid,
            uid: p.uid,
            euid: p.euid,
            gid: p.gid,
            comm: p.comm,
            state: p.state,
            start_time: p.start_time,
            kernel_thread: p.kernel_thread,
            exited: p.exit_state != 0,
            pgd: p.pgd,
            task: p.task,
            cmdline_error,
            flags: p.flags,
            exit_state: p.exit_state,
            mm: p.mm,
            arg_start: p.arg_start,
            arg_end: p.arg_end,
            cmdline_truncated: p.cmdline_truncated,
        }
    }
}

impl From<Process> for ProcessJson {
    fn from(mut p: Process) -> Self {
        let error = p.cmdline_error.take().map(|e| e.to_string());
        ProcessJson::new(p, error)
    }
}

impl From<DecodedProcess> for ProcessJson {
    fn from(d: DecodedProcess) -> Self {
        // On the host the error is the agent's text; one in the view itself goes too.
        let error = d.cmdline_error.or_else(|| d.process.cmdline_error.as_ref().map(|e| e.to_string()));
        ProcessJson::new(d.process, error)
    }
}

impl From<ProcessJson> for DecodedProcess {
    /// The command line comes back as the arguments, each NUL-terminated: what
    /// [`Process::args`] splits back into the same arguments.
    fn from(j: ProcessJson) -> Self {
        let mut cmdline = Vec::new();
        for arg in &j.args {
            cmdline.extend_from_slice(arg.as_bytes());
            cmdline.push(0);
        }
        DecodedProcess {
            process: Process {
                task: j.task,
                pid: j.pid,
                tgid: j.tgid,
                ppid: j.ppid,
                uid: j.uid,
                euid: j.euid,
                gid: j.gid,
                comm: j.comm,
                state: j.state,
                start_time: j.start_time,
                flags: j.flags,
                kernel_thread: j.kernel_thread,
                exit_state: j.exit_state,
                mm: j.mm,
                pgd: j.pgd,
                arg_start: j.arg_start,
                arg_end: j.arg_end,
                cmdline,
                cmdline_truncated: j.cmdline_truncated,
                cmdline_error: None,
            },
            cmdline_error: j.cmdline_error,
        }
    }
}

// The JSON of `Vma`.
/// A memory area of a process.
#[derive(Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Vma))]
pub(crate) struct VmaJson {
    start: u64,
    end: u64,
    /// `rwxp` as in /proc/PID/maps.
    perms: String,
    /// Offset in the file, in pages.
    pgoff: u64,
    /// The mapped file's name (its dentry's, without directories).
    file: Option<String>,
    /// Kernel address of the `vm_area_struct`.
    vma: u64,
    /// `vm_flags`.
    flags: u64,
    /// Kernel address of the mapped `struct file` (0 for anonymous memory).
    file_address: u64,
}

impl From<Vma> for VmaJson {
    fn from(v: Vma) -> Self {
        VmaJson {
            perms: v.perms(),
            start: v.start,
            end: v.end,
            pgoff: v.pgoff,
            file: v.file_name,
            vma: v.vma,
            flags: v.flags,
            file_address: v.file,
        }
    }
}

impl From<VmaJson> for Vma {
    /// `perms` is not read back: `flags` has it all.
    fn from(j: VmaJson) -> Self {
        Vma {
            vma: j.vma,
            start: j.start,
            end: j.end,
            flags: j.flags,
            pgoff: j.pgoff,
            file: j.file_address,
            file_name: j.file,
        }
    }
}

// The JSON of `CheckReport`.
/// The rootkit checks' report.
#[derive(Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = CheckReport))]
pub(crate) struct CheckReportJson {
    /// True when every check ran and none found anything.
    clean: bool,
    /// Each check: what it looked at, or why it could not run.
    checks: Vec<CheckRun>,
    findings: Vec<Finding>,
}

impl From<CheckReport> for CheckReportJson {
    fn from(r: CheckReport) -> Self {
        CheckReportJson {
            clean: r.findings.is_empty() && r.runs.iter().all(|r| r.error.is_none()),
            checks: r.runs,
            findings: r.findings,
        }
    }
}

impl From<CheckReportJson> for CheckReport {
    /// `clean` is not read back: the runs and findings have it all.
    fn from(j: CheckReportJson) -> Self {
        CheckReport { runs: j.checks, findings: j.findings }
    }
}

/// `ToSchema` for a view serialized through one of the shapes here: the shape's schema,
/// under the view's name.
#[cfg(feature = "openapi")]
macro_rules! schema_of {
    ($($view:ty => $json:ty),* $(,)?) => {$(
        impl utoipa::PartialSchema for $view {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                <$json as utoipa::PartialSchema>::schema()
            }
        }

        impl utoipa::ToSchema for $view {
            fn name() -> alloc::borrow::Cow<'static, str> {
                <$json as utoipa::ToSchema>::name()
            }

            fn schemas(
                schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>,
            ) {
                <$json as utoipa::ToSchema>::schemas(schemas)
            }
        }
    )*};
}

// A decoded process is a process in JSON: one schema, named `Process`.
#[cfg(feature = "openapi")]
schema_of!(Process => ProcessJson, DecodedProcess => ProcessJson, Vma => VmaJson, CheckReport => CheckReportJson);

#[cfg(test)]
mod tests;

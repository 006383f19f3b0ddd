//! What a subsystem says about its own health: findings, each a check, a verdict and a message
//! for the operator. The redirect, trust, the hub and the cache each judge their own state with a
//! `diagnose()` that returns these; `pullproxy doctor` ([`crate::doctor`]) only orders and prints
//! them. This vocabulary imports nothing, so no subsystem needs the doctor to speak it. No
//! message carries a credential.

use std::fmt;

/// What was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Kernel,
    BpfPrograms,
    Cgroup2,
    Privileges,
    Bpffs,
    Runtimes,
    Attached,
    Guard,
    Trust,
    Hub,
    Cache,
}

impl Check {
    fn label(self) -> &'static str {
        match self {
            Check::Kernel => "kernel",
            Check::BpfPrograms => "bpf",
            Check::Cgroup2 => "cgroup",
            Check::Privileges => "privileges",
            Check::Bpffs => "bpffs",
            Check::Runtimes => "runtimes",
            Check::Attached => "attached",
            Check::Guard => "guard",
            Check::Trust => "trust",
            Check::Hub => "hub",
            Check::Cache => "cache",
        }
    }
}

/// How a finding came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Something the operator must fix; the message says how.
    Problem,
    /// Could not be checked from here; the message says why and where to check instead.
    Note,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub check: Check,
    pub verdict: Verdict,
    pub message: String,
}

impl Finding {
    pub(crate) fn new(check: Check, verdict: Verdict, message: impl Into<String>) -> Self {
        Self {
            check,
            verdict,
            message: message.into(),
        }
    }

    pub(crate) fn ok(check: Check, message: impl Into<String>) -> Self {
        Self::new(check, Verdict::Ok, message)
    }

    pub(crate) fn problem(check: Check, message: impl Into<String>) -> Self {
        Self::new(check, Verdict::Problem, message)
    }

    pub(crate) fn note(check: Check, message: impl Into<String>) -> Self {
        Self::new(check, Verdict::Note, message)
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.verdict {
            Verdict::Ok => "ok",
            Verdict::Problem => "PROBLEM",
            Verdict::Note => "note",
        };
        write!(f, "{tag:<7} {:<10} {}", self.check.label(), self.message)
    }
}

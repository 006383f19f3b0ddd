//! The subcommands of the `pullproxy` binary, one file each; `main.rs` parses the command line
//! and hands each command to its file. These modules belong to the binary, not to the library.

pub(crate) mod ca;
pub(crate) mod check_config;
pub(crate) mod doctor;
pub(crate) mod run;
pub(crate) mod uninstall;
pub(crate) mod warm;

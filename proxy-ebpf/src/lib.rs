//! Empty library target: lets `proxy` name this crate as a build dependency, so cargo rebuilds the
//! kernel object when this crate or `proxy-common` changes. The programs are in `main.rs`.
#![no_std]

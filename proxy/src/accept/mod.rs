//! Where a redirected connection arrives: the listeners and the connection loop, the kernel's
//! record of where the connection was going, the port holder, the ClientHello peek that decides
//! terminate or splice, per-connection deadlines and limits with sendfile, and kernel TLS for
//! the connections pullproxy serves.

pub mod client_hello;
pub mod conn;
pub mod ktls;
pub(crate) mod listen;
pub mod original_dst;
pub(crate) mod port_holder;
pub(crate) mod server;

//! The `husk` command line: a CRI client of huskd, like crictl.

pub mod bench;
pub mod density;
pub mod images;
pub mod runtime;
pub mod stream;
pub mod table;

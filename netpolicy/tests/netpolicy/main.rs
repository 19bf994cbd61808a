//! Tests of the netpolicy crate through its public API: the document, the compiler, the filter,
//! the queries, the field cases and the properties.

mod common;
mod field_cases;
mod filter;
mod handles;
mod parse;
mod properties;
mod queries;
mod reach;

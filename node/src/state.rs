//! See lib.rs (stub; filled in by its issue).

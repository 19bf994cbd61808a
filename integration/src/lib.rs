//! Network-namespace harness for ztnet end-to-end tests.
